"""The Snakemake workflow end to end on the tiny config: outputs, no-op rerun, selective rerun."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO, TINY_CONFIG

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Job counts from the 'Job stats' table that ``snakemake -n`` prints."""
    stats = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, flags=re.M)}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    shutil.copy(TINY_CONFIG, workdir / "config.yaml")
    result = snakemake(workdir, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_tables_filled(finished_run):
    accuracy = pl.read_csv(finished_run / "results/tables/accuracy_base.csv")
    assert accuracy.columns == ["model", "task", "lang", "split", "n", "accuracy", "parse_failure_rate"]
    assert set(accuracy["lang"]) == {"en", "xa", "xd"}
    assert set(accuracy["task"]) == {"arith", "cause"}
    assert accuracy.height == 2 * 3 * 2
    assert accuracy.filter(pl.col("split") == "train")["n"].unique().to_list() == [16]
    categories = pl.read_csv(finished_run / "results/tables/categories.csv")
    assert categories.columns == ["model", "task", "lang", "n", "cc", "ci", "ic", "ii"]
    assert set(categories["lang"]) == {"xa", "xd"}
    sums = categories.select(pl.sum_horizontal("cc", "ci", "ic", "ii")).to_series()
    assert all(abs(s - 1.0) < 1e-9 for s in sums)


def test_routing_tables_filled(finished_run):
    divergence = pl.read_csv(finished_run / "results/tables/divergence.csv")
    assert {"model", "task", "lang", "layer", "hjsd", "jsd", "entropy", "comparison"} <= set(divergence.columns)
    assert set(divergence["comparison"]) == {"parallel", "control_nonparallel", "control_english"}
    assert set(divergence["layer"]) == {0, 1}
    zone = pl.read_csv(finished_run / "results/tables/alignment_zone.csv")
    assert set(zone["task"]) == {"arith", "cause"}
    assert set(zone["method"]) <= {"data", "fallback", "override"}
    experts = pl.read_csv(finished_run / "results/tables/task_experts.csv")
    assert experts.height == 2 * 2 * 4  # tasks x layers x experts
    mask = json.loads((finished_run / "results/experts/test-olmoe/arith.json").read_text())
    assert mask["num_experts"] == 4
    assert set(mask["layers"]) == {"0", "1"}
    assert all(len(experts) <= 2 for experts in mask["layers"].values())
    tokens = pl.read_parquet(finished_run / "results/traces/test-olmoe/arith/en.tokens.parquet")
    assert set(tokens["rank"]) == {0, 1}
    for name in ("divergence_by_layer", "task_experts"):
        assert (finished_run / f"results/figures/{name}.png").stat().st_size > 1000


def test_per_example_tables(finished_run):
    examples = pl.read_parquet(finished_run / "results/eval/test-olmoe/base/arith/xd.parquet")
    assert examples.height == 24
    assert {"item_id", "lang", "prompt", "raw_output", "parsed_answer", "gold", "parse_failure", "correct"} <= set(
        examples.columns
    )
    assert set(examples["lang"]) == {"xd"}


def test_figures_and_logs(finished_run):
    for suffix in ("pdf", "png"):
        assert (finished_run / f"results/figures/categories.{suffix}").stat().st_size > 1000
    assert "step 6/6" in (finished_run / "results/logs/pretrain/test-olmoe.log").read_text()
    assert (finished_run / "results/benchmarks/pretrain/test-olmoe.tsv").is_file()
    assert (finished_run / "results/models/test-olmoe/metrics.jsonl").is_file()


def test_method_comparison_tables(finished_run):
    main = pl.read_csv(finished_run / "results/tables/main_results.csv")
    assert main.columns[:7] == ["model", "task", "lang", "train_lang", "method", "seed", "n"]
    assert set(main["method"]) == {"base", "steering", "sft", "ramoe", "rise"}
    trained = main.filter(pl.col("method").is_in(["sft", "ramoe", "rise"]))
    assert set(trained["seed"]) == {0, 1}
    # each (task, method, seed) model trained on xa or xd is evaluated there and in English
    assert trained.height == 2 * 3 * 2 * 2 * 2
    assert set(trained.filter(pl.col("lang") == "en")["train_lang"]) == {"xa", "xd"}
    assert (main["n"] == 8).all()  # 24 items, a third of them test
    gain = pl.read_csv(finished_run / "results/tables/ci_vs_gain.csv")
    assert {"ci_share", "n_ci", "gain", "gain_ci_low", "gain_ci_high", "p_value", "pearson_r", "spearman_r"} <= set(
        gain.columns
    )
    assert gain.height == 4
    for name in ("main_results", "ci_vs_gain"):
        assert (finished_run / f"results/figures/{name}.png").stat().st_size > 1000


def test_checkpoints_and_training_logs(finished_run):
    folder = finished_run / "results/checkpoints/test-olmoe/ramoe/seed1/cause/xd"
    assert {"config.json", "model.safetensors", "metrics.jsonl", "finetune_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    record = json.loads((folder / "finetune_config.json").read_text())
    assert record["seed"] == 1
    assert record["settings"]["alignment"]["lambda"] == 1.0
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "lm_loss", "align_loss", "ci_rows", "lr"} <= set(metrics[0])
    rise = json.loads((finished_run / "results/checkpoints/test-olmoe/rise/seed0/arith/xa/finetune_config.json").read_text())
    assert rise["rise_budget"] == 2  # 25% of 2 layers x 4 experts
    assert sum(len(experts) for experts in rise["rise_experts"].values()) == 2


def test_report_has_every_figure(finished_run):
    report = finished_run / "report.html"
    result = snakemake(finished_run, "--report", str(report), "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    text = report.read_text(errors="replace")
    for name in ("main_results", "ci_vs_gain", "divergence_by_layer", "categories", "task_experts"):
        assert f"{name}.png" in text


def test_alignment_change_reruns_ramoe_only(finished_run):
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["finetune"].setdefault("alignment", {})["lambda"] = 2.0
    changed = finished_run / "changed-lambda"
    changed.mkdir()
    (changed / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(finished_run / "results", changed / "results")
    shutil.copytree(finished_run / ".snakemake", changed / ".snakemake", ignore=shutil.ignore_patterns("locks"))
    result = snakemake(changed, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = planned_jobs(result.stdout)
    assert jobs["finetune"] == 2 * 2 * 2  # ramoe x tasks x languages x seeds; sft and rise stay
    assert jobs["evaluate_finetuned"] == 2 * 2
    assert set(jobs) == {"finetune", "evaluate_finetuned", "main_results", "plot_results", "all"}


def test_finished_tree_is_noop(finished_run):
    result = snakemake(finished_run, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_evaluation_change_reruns_evaluation_only(finished_run):
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    config["evaluation"]["max_new_tokens"] = 4
    changed = finished_run / "changed"
    changed.mkdir()
    (changed / "config.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(finished_run / "results", changed / "results")
    shutil.copytree(finished_run / ".snakemake", changed / ".snakemake", ignore=shutil.ignore_patterns("locks"))
    result = snakemake(changed, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = planned_jobs(result.stdout)
    assert "pretrain" not in jobs
    assert "synthetic_world" not in jobs
    assert "trace" not in jobs
    assert jobs["evaluate_base"] == 6
    assert {"accuracy_base", "categories", "categories_table", "plot_categories"} <= set(jobs)


def test_misspelt_key_stops_run(tmp_path):
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["evaluation"]["batch_sise"] = config["evaluation"].pop("batch_size")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--cores", "1")
    assert result.returncode != 0
    assert "unknown key 'evaluation.batch_sise'" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()
