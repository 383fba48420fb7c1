"""The benchmark scripts on a tiny model and data: they run, write complete entries, and their checks catch differences."""

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from conftest import REPO, TINY_CONFIG

sys.path.insert(0, str(REPO / "bench"))

import capture  # noqa: E402
import evaluation  # noqa: E402
import harness  # noqa: E402
import run_all  # noqa: E402
import scaling  # noqa: E402
import train_step  # noqa: E402
import workflow  # noqa: E402

MODEL = "bench-olmoe"


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    """A results tree with what the scripts read: data, a briefly pretrained model, categories, expert mask, English trace."""
    from ramoe.config import load_config
    from ramoe.models.loading import load_model
    from ramoe.models.tokenizer import build_word_tokenizer
    from ramoe.routing.traces import capture_traces, trace_texts
    from ramoe.synthetic.world import write_world
    from ramoe.training.pretrain import pretrain

    config = load_config(TINY_CONFIG)
    results = tmp_path_factory.mktemp("bench") / "results"
    data = results / "data"
    data.mkdir(parents=True)
    # 60 items: 40 train items per language, enough for --quick scaling points of 8, 16 and 32 items.
    section = dict(config["data"]["synthetic"], items_per_task=60)
    world = write_world(
        section, tasks=["arith", "cause"], target_languages=["xa", "xb", "xc", "xd"],
        task_paths={"arith": str(data / "arith.parquet"), "cause": str(data / "cause.parquet")},
        corpus_path=str(data / "corpus.txt"), general_path=str(data / "general.txt"),
    )
    model_dir = results / "models" / MODEL
    pretrain(world.pretraining_lines(), build_word_tokenizer(world.vocabulary()),
             dict(config["model"]["pretrain"], steps=4), model_dir)

    rows = pl.read_parquet(data / "arith.parquet")
    train = rows.filter(pl.col("split") == "train")
    categories = train.filter(pl.col("lang") == "xa").select("item_id", "lang").with_columns(
        category=pl.when(pl.col("item_id").rank("ordinal") % 2 == 0).then(pl.lit("ci")).otherwise(pl.lit("cc"))
    )
    (results / "categories" / MODEL).mkdir(parents=True)
    categories.write_parquet(results / "categories" / MODEL / "arith.parquet")
    (results / "experts" / MODEL).mkdir(parents=True)
    mask = {"layers": {"0": [0, 1], "1": [2]}, "zone": {"first_layer": 0, "last_layer": 1}}
    (results / "experts" / MODEL / "arith.json").write_text(json.dumps(mask))

    model, tokenizer = load_model({"kind": "local", "path": str(model_dir), "dtype": "float32"})
    traces = results / "traces" / MODEL / "arith"
    traces.mkdir(parents=True)
    english = trace_texts(train.filter(pl.col("lang") == "en").to_dicts(), "prompt")
    capture_traces(model, tokenizer, english, token_path=None, sequence_path=traces / "en.sequences.parquet",
                   batch_size=16)
    return results


@pytest.fixture
def workers_in_process(monkeypatch):
    """Run the peak-memory workers inside the test process: a fresh Python per worker costs ~10 s of imports here."""

    def run_worker(argv):
        script = {"capture.py": capture, "evaluation.py": evaluation}[Path(argv[0]).name]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            script.main(list(argv[1:]))
        return json.loads(buffer.getvalue().strip().splitlines()[-1])

    monkeypatch.setattr(harness, "run_worker", run_worker)


def common_args(results: Path, output: Path) -> list[str]:
    return ["--results", str(results), "--model", MODEL, "--quick", "--output", str(output)]


def read_entries(path: Path) -> list[dict]:
    entries = json.loads(path.read_text())
    for record in entries:
        assert set(harness.REQUIRED_KEYS) <= set(record), record["name"]
        # In-process workers may add no measurable memory, so only times must be positive.
        assert record["ours"] >= 0, record["name"]
        assert record["reference"] >= 0, record["name"]
        if record["unit"] == "s":
            assert record["ours"] > 0, record["name"]
            assert record["reference"] > 0, record["name"]
        if record["reference"] > 0:
            assert record["ratio_of_medians"] == pytest.approx(record["ours"] / record["reference"]), record["name"]
            # A memory ratio is 0 when the smaller run added no measurable memory (clamped at 0).
            assert record["ratio"] > 0 if record["unit"] == "s" else record["ratio"] >= 0, record["name"]
        else:
            assert record["ratio"] is None, record["name"]
        assert (record["met"] is None) == (record["target"] is None), record["name"]
    return entries


def test_capture_entries(bench_results, tmp_path, workers_in_process):
    output = tmp_path / "capture.json"
    capture.main([*common_args(bench_results, output), "--langs", "en,xa"])
    entries = read_entries(output)
    names = [record["name"] for record in entries]
    assert names == [
        "trace capture time",
        "trace capture peak memory (process RSS)",
        "trace bytes on disk: token + sequence Parquet vs float32 logits",
        "trace bytes on disk: sequence Parquet alone vs float32 logits",
        "capture overhead, one batch: forward + RouterCapture + top-k vs plain forward",
        "capture overhead, end to end: capture_traces vs plain batched forwards",
    ]
    timed = entries[0]
    assert timed["repeats"] == 2
    assert timed["ours_min"] <= timed["ours"] <= timed["ours_max"]
    assert "96 (sequence, layer) pairs" in timed["check"]  # 24 items x 2 languages x 2 MoE layers


def test_train_step_entries(bench_results, tmp_path):
    output = tmp_path / "train.json"
    train_step.main([*common_args(bench_results, output), "--lang", "xa", "--batch-size", "8"])
    entries = read_entries(output)
    assert [record["name"] for record in entries] == [
        "RA-MoE step vs SFT step",
        "RA-MoE step vs concatenated English + target step",
    ]
    assert "over 8 ci rows" in entries[0]["check"]  # half the items are ci, and ci rows come first
    assert entries[0]["target"] == "ratio <= 1.1"


def test_evaluation_entries(bench_results, tmp_path):
    output = tmp_path / "evaluation.json"
    evaluation.main([*common_args(bench_results, output), "--lang", "xa"])
    entries = read_entries(output)
    assert [record["stage"] for record in entries] == ["evaluation", "evaluation"]
    assert entries[0]["check"] == "all 24 decoded outputs identical"


def test_scaling_points_and_figure(bench_results, tmp_path, workers_in_process):
    output, figure = tmp_path / "scaling.json", tmp_path / "scaling.png"
    scaling.main([*common_args(bench_results, output), "--figure", str(figure)])
    entries = read_entries(output)
    points = entries[0]["points"]
    assert [point["items"] for point in points] == [5 * 8, 5 * 16, 5 * 32]  # 5 languages
    assert entries[0]["target"] == "ratio <= 1.2"
    assert figure.stat().st_size > 10_000


def test_trace_check_catches_changed_logit(bench_results, tmp_path):
    from ramoe.models.loading import load_model

    model, tokenizer = load_model({"kind": "local", "path": str(bench_results / "models" / MODEL), "dtype": "float32"})
    texts = capture.load_texts(bench_results, "arith", ["en"], 4)
    ours, reference = tmp_path / "ours", tmp_path / "reference"
    ours.mkdir()
    reference.mkdir()
    capture.trace_ours(model, tokenizer, texts, ours, batch_size=4)
    capture.trace_reference(model, tokenizer, texts, reference)
    assert "agree" in capture.check_traces(ours, reference, texts, top_k=2)

    path = reference / capture.file_name(texts[2][0], "en")
    logits = np.load(path)
    logits[1, 3, 0] += 0.01  # layer 1, token 3, expert 0
    np.save(path, logits)
    with pytest.raises(harness.ResultMismatch, match="mean routing distribution"):
        capture.check_traces(ours, reference, texts, top_k=2)


def test_run_worker_reads_last_line():
    result = harness.run_worker(["-c", "import json; print('progress'); print(json.dumps({'peak_mib': 1.5}))"])
    assert result == {"peak_mib": 1.5}
    with pytest.raises(RuntimeError, match="exit status 3"):
        harness.run_worker(["-c", "raise SystemExit(3)"])


def test_check_close_catches_difference():
    assert harness.check_close("loss", np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7]), atol=1e-5) == pytest.approx(1e-7)
    with pytest.raises(harness.ResultMismatch, match=r"max difference 0.001 at index \(1,\)"):
        harness.check_close("loss", np.array([1.0, 2.0]), np.array([1.0, 2.001]), atol=1e-5)
    with pytest.raises(harness.ResultMismatch, match="shape"):
        harness.check_close("loss", np.zeros(2), np.zeros(3), atol=1e-5)


def test_check_same_texts_catches_difference():
    harness.check_same_texts("outputs", ["1", "2"], ["1", "2"])
    with pytest.raises(harness.ResultMismatch, match="1 of 2 outputs differ, first at item 1"):
        harness.check_same_texts("outputs", ["1", "2"], ["1", "3"])


def test_check_same_top_k_allows_only_near_ties():
    probabilities = np.array([[0.5, 0.3, 0.2, 0.0], [0.4, 0.3, 0.3 - 1e-7, 0.0]])
    reference = np.array([[0, 1], [0, 1]])
    # Token 1's second and third experts are 1e-7 apart: a flip there is float noise.
    assert harness.check_same_top_k("ids", np.array([[0, 1], [0, 2]]), reference, probabilities, tie_gap=1e-5) == 1
    with pytest.raises(harness.ResultMismatch, match="differ on 1 of 2 tokens"):
        harness.check_same_top_k("ids", np.array([[0, 2], [0, 1]]), reference, probabilities, tie_gap=1e-5)


def test_entry_target_and_ratio():
    timing = harness.Timing((2.0, 1.0, 3.0))
    record = harness.entry("x", stage="s", ours=timing, reference=10.0, unit="s", target=("ratio", "<=", 0.2),
                           ours_label="a", reference_label="b")
    assert record["ours"] == 2.0
    assert record["ratio"] == 0.2
    assert record["met"] is True
    assert record["target"] == "ratio <= 0.2"
    assert (record["ours_min"], record["ours_max"]) == (1.0, 3.0)
    missed = harness.entry("y", stage="s", ours=3.5, reference=1.0, unit="s", target=("ours", "<=", 3.0),
                           ours_label="a", reference_label="b")
    assert missed["met"] is False
    assert missed["target"] == "ours <= 3 s"
    # Two timings pair up round by round: the rounds' ratios 2/1, 4/8 and 6/3 have the median 2,
    # while the quotient of the medians is 4/3.
    paired = harness.entry("p", stage="s", ours=harness.Timing((2.0, 4.0, 6.0)),
                           reference=harness.Timing((1.0, 8.0, 3.0)), unit="s", ours_label="a", reference_label="b")
    assert paired["ratio"] == 2.0
    assert paired["ratio_of_medians"] == pytest.approx(4.0 / 3.0)
    no_reference = harness.entry("z", stage="s", ours=1.0, reference=0.0, unit="MiB", target=("ratio", "<=", 1.2),
                                 ours_label="a", reference_label="b")
    assert no_reference["ratio"] is None
    assert no_reference["met"] is False


def test_planned_jobs_parsing():
    output = (
        "Building DAG of jobs...\nJob stats:\njob                   count\n------------------  -------\n"
        "all                       1\nevaluate_finetuned        4\nfinetune                  8\ntotal                    13\n"
    )
    assert workflow.planned_jobs(output) == {"all": 1, "evaluate_finetuned": 4, "finetune": 8}
    assert workflow.planned_jobs("Nothing to be done (all requested files are present and up to date).") == {}


def test_expected_lambda_reruns_tiny():
    config = yaml.safe_load(TINY_CONFIG.read_text())
    # 2 tasks x 2 target languages x 2 seeds ramoe runs; their evaluation is one job per task and seed.
    assert workflow.expected_lambda_reruns(config) == {
        "finetune": 8, "evaluate_finetuned": 4, "main_results": 1, "plot_results": 1, "all": 1,
    }


def test_markdown_keeps_hand_written_text(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text(f"# Benchmarks\n\nintro\n\n{run_all.BEGIN}\nold table\n{run_all.END}\n\n## Findings\n\nkept\n")
    run_all.write_markdown(page, f"{run_all.BEGIN}\nnew table\n{run_all.END}")
    text = page.read_text()
    assert "old table" not in text
    assert "new table" in text
    assert text.startswith("# Benchmarks\n\nintro\n\n")
    assert text.endswith("## Findings\n\nkept\n")
