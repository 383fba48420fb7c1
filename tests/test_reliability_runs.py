"""Interrupted runs: atomic outputs, resumable training and deterministic tables.

The fast tests interrupt pretraining and fine-tuning (by an exception right after a save, or by
SIGKILL of a subprocess) and check that the resumed run ends with the same weights, bit for bit,
as an uninterrupted one. The slow tests run the tiny workflow under Snakemake: twice
uninterrupted (identical tables), and once with SIGKILLs of a pretraining, a trace, a
fine-tuning and an evaluation job, whose rerun must reach the same tables.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import polars.testing
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, TINY_CONFIG
from ramoe.config import load_config
from ramoe.io import RECORDED_PACKAGES, atomic_path
from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.adapters import describe_moe
from ramoe.synthetic.world import World, WorldConfig
from ramoe.training.finetune import RoutingAligner, build_examples, set_trainable, train
from ramoe.training.pretrain import pretrain
from ramoe.training.resume import STATE_FILE, TrainingState, resume_folder

MODEL = "test-olmoe"


class Interrupted(Exception):
    """Raised by the test in place of a kill, right after a training state was saved."""


def interrupt_after_saves(patch: pytest.MonkeyPatch, count: int) -> list[int]:
    """Make the ``count``-th save of a training state raise ``Interrupted``; return the saved steps."""
    original = TrainingState.save
    saved_steps: list[int] = []

    def save_then_interrupt(self, state):
        original(self, state)
        saved_steps.append(state["step"])
        if len(saved_steps) == count:
            raise Interrupted(f"interrupted after the save at step {state['step']}")

    patch.setattr(TrainingState, "save", save_then_interrupt)
    return saved_steps


def without_timing(records: list[dict]) -> list[dict]:
    """Metric records without tokens_per_s, the only field that depends on the machine's speed."""
    return [{key: value for key, value in record.items() if key != "tokens_per_s"} for record in records]


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --- atomic outputs --------------------------------------------------------------------------


def test_failed_writer_leaves_no_output(tmp_path):
    target = tmp_path / "table.csv"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a table")
        raise RuntimeError("writer failed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_folder_output_replaced_whole(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "new.bin").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_killed_writer_leftover_removed_by_next_writer(tmp_path):
    target = tmp_path / "out.parquet"
    # a writer killed by SIGKILL inside the block: its temporary stays, the output never appears
    script = textwrap.dedent(f"""
        import sys, time
        from ramoe.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_text("partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait(timeout=30)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert not target.exists()
    assert len(leftovers) == 1
    assert re.fullmatch(r"\.tmp-[0-9a-f]{8}-out\.parquet", leftovers[0])

    unrelated = tmp_path / ".tmp-0123abcd-other.parquet"
    unrelated.write_text("another output's temporary")
    with atomic_path(target) as tmp:
        tmp.write_text("complete")
    assert target.read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == [unrelated.name, "out.parquet"]


# --- resumable pretraining -------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> World:
    config = load_config(TINY_CONFIG)
    languages = config["data"]["synthetic"]["languages"][:2]
    return World(WorldConfig.from_config(dict(config["data"]["synthetic"], tasks=["arith", "cause"], languages=languages)))


@pytest.fixture(scope="module")
def pretrain_settings() -> dict:
    return dict(load_config(TINY_CONFIG)["model"]["pretrain"], steps=10, log_every=2, save_every=3)


def test_pretrain_resumes_bit_identical(world, pretrain_settings, tmp_path, monkeypatch, caplog):
    tokenizer = build_word_tokenizer(world.vocabulary())
    lines = world.pretraining_lines()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(lines, tokenizer, pretrain_settings, straight)
    assert not resume_folder(straight).exists()

    with monkeypatch.context() as patch:
        saved_steps = interrupt_after_saves(patch, count=2)
        with pytest.raises(Interrupted):
            pretrain(lines, tokenizer, pretrain_settings, resumed)
    assert saved_steps == [3, 6]
    assert not resumed.exists()
    assert (resume_folder(resumed) / STATE_FILE).is_file()

    # another save interval is an execution setting: the state still applies
    with caplog.at_level("INFO", logger="ramoe.training.resume"):
        pretrain(lines, tokenizer, dict(pretrain_settings, save_every=4), resumed)
    assert "resuming from step 6" in caplog.text
    assert not resume_folder(resumed).exists()
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))
    assert [r["step"] for r in read_metrics(resumed)] == [2, 4, 6, 8, 10]
    assert (resumed / "pretrain_config.json").read_text() == (straight / "pretrain_config.json").read_text()


def test_pretrain_resumes_after_sigkill(world, pretrain_settings, tmp_path):
    settings = dict(pretrain_settings, steps=40, log_every=5, save_every=5)
    (tmp_path / "lines.txt").write_text("\n".join(world.pretraining_lines()))
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    script = textwrap.dedent(f"""
        import json, logging, sys
        from pathlib import Path
        from ramoe.models.tokenizer import build_word_tokenizer
        from ramoe.training.pretrain import pretrain
        logging.basicConfig(level=logging.INFO)
        folder = Path({str(tmp_path)!r})
        lines = (folder / "lines.txt").read_text().splitlines()
        tokenizer = build_word_tokenizer(sorted({{word for line in lines for word in line.split()}}))
        pretrain(lines, tokenizer, json.loads((folder / "settings.json").read_text()), folder / sys.argv[1])
    """)

    def run(output: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, output], stderr=subprocess.PIPE, text=True)

    assert run("straight").wait(timeout=300) == 0
    killed = run("resumed")
    state = resume_folder(tmp_path / "resumed") / STATE_FILE
    deadline = time.monotonic() + 300
    while not state.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.kill()
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, "pretraining ended before the kill; raise its step count"
    assert not (tmp_path / "resumed").exists()

    resumed = run("resumed")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert re.search(r"resuming from step [1-9]\d*", stderr), stderr[-2000:]
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    actual = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert not resume_folder(tmp_path / "resumed").exists()


# --- resumable fine-tuning -------------------------------------------------------------------


FINETUNE_SETTINGS = {"epochs": 2, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.25, "min_lr_ratio": 0.1,
                     "weight_decay": 0.01, "grad_clip": 1.0, "log_every": 1, "save_every": 3}


@pytest.fixture(scope="module")
def finetune_data(world):
    tokenizer = build_word_tokenizer(world.vocabulary())
    rows = sorted((r for r in world.task_rows("arith") if r["lang"] == "xa" and r["split"] == "train"),
                  key=lambda r: r["item_id"])
    ci_items = {row["item_id"] for row in rows[::2]}
    examples = build_examples(rows, tokenizer, ci_items=ci_items)
    assert len(examples) == 16  # 4 batches per epoch
    return tokenizer, examples


def base_model(tokenizer, seed: int = 0):
    """A fresh tiny MoE, identical for the same seed, as the base every fine-tuning run reloads."""
    arch = dict(family="olmoe", num_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, top_k=2, expert_size=16, max_position_embeddings=64, router_aux_loss_coef=0.01)
    torch.manual_seed(seed)
    config = tiny_moe_config(arch, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def aligner_for(examples) -> RoutingAligner:
    """An RA-MoE term over both layers with a fixed teacher routing for every ci item."""
    generator = torch.Generator().manual_seed(7)
    teacher = {e.item_id: {layer: torch.softmax(torch.randn(4, generator=generator), dim=0) for layer in (0, 1)}
               for e in examples if e.is_ci}
    return RoutingAligner(teacher, {0: [0, 1], 1: [2]}, [0, 1], loss="mass_split", beta=1.0, eps=1e-6)


def finetune(tokenizer, examples, settings, *, method: str, resume_dir=None, metrics_path=None, seed: int = 0):
    """Fine-tune a fresh base model; return it with its metric records."""
    model = base_model(tokenizer, seed)
    layout = describe_moe(model)
    parameters = set_trainable(model, layout, "all" if method == "sft" else "moe")
    aligner = aligner_for(examples) if method == "ramoe" else None
    records = train(model, examples, settings, seed=11, pad_id=tokenizer.pad_token_id, parameters=parameters,
                    aligner=aligner, align_weight=1.0 if aligner else 0.0, metrics_path=metrics_path,
                    resume_dir=resume_dir)
    return model, records


def assert_same_weights(expected, actual) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[name]), name


@pytest.mark.parametrize(
    ("method", "save_every", "saves", "step"),
    [
        ("sft", 3, 1, 3),  # mid-epoch: the rest of the first epoch's batch order
        ("sft", 4, 1, 4),  # at the epoch boundary: the next epoch's order is drawn after resuming
        ("ramoe", 3, 2, 6),  # mid-epoch in the second epoch, with the alignment term
    ],
)
def test_finetune_resumes_bit_identical(finetune_data, tmp_path, monkeypatch, caplog, method, save_every, saves, step):
    tokenizer, examples = finetune_data
    settings = dict(FINETUNE_SETTINGS, save_every=save_every)
    straight, straight_records = finetune(tokenizer, examples, settings, method=method)

    resume_dir = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        saved_steps = interrupt_after_saves(patch, count=saves)
        with pytest.raises(Interrupted):
            finetune(tokenizer, examples, settings, method=method, resume_dir=resume_dir,
                     metrics_path=tmp_path / "interrupted.jsonl")
    assert saved_steps[-1] == step

    with caplog.at_level("INFO", logger="ramoe.training.resume"):
        resumed, records = finetune(tokenizer, examples, dict(settings, save_every=5), method=method,
                                    resume_dir=resume_dir, metrics_path=tmp_path / "metrics.jsonl")
    assert f"resuming from step {step}" in caplog.text
    assert_same_weights(straight, resumed)
    assert without_timing(records) == without_timing(straight_records)
    assert [r["step"] for r in records] == list(range(1, 9))
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(written) == without_timing(straight_records)
    if method == "ramoe":
        assert sum(r["ci_rows"] for r in records) == 2 * 8  # every epoch sees the 8 ci items once
    assert not resume_dir.exists()


@pytest.mark.parametrize("change", ["lr", "base weights"])
def test_stale_resume_state_discarded(finetune_data, tmp_path, monkeypatch, caplog, change):
    tokenizer, examples = finetune_data
    resume_dir = tmp_path / "run.resume"
    with monkeypatch.context() as patch:
        interrupt_after_saves(patch, count=1)
        with pytest.raises(Interrupted):
            finetune(tokenizer, examples, FINETUNE_SETTINGS, method="sft", resume_dir=resume_dir)

    settings = dict(FINETUNE_SETTINGS, lr=1e-3) if change == "lr" else FINETUNE_SETTINGS
    seed = 1 if change == "base weights" else 0
    expected, _ = finetune(tokenizer, examples, settings, method="sft", seed=seed)
    with caplog.at_level("INFO", logger="ramoe.training.resume"):
        actual, records = finetune(tokenizer, examples, settings, method="sft", seed=seed, resume_dir=resume_dir)
    assert "discarding the resume state" in caplog.text
    assert "resuming" not in caplog.text
    assert_same_weights(expected, actual)
    assert len(records) == 8


def test_finetune_without_resume_dir_writes_nothing(finetune_data, tmp_path, monkeypatch):
    tokenizer, examples = finetune_data
    monkeypatch.chdir(tmp_path)
    finetune(tokenizer, examples, FINETUNE_SETTINGS, method="sft")
    assert list(tmp_path.iterdir()) == []


# --- the workflow under Snakemake ------------------------------------------------------------


def reliability_config() -> dict:
    """The tiny config with longer pretraining and fine-tuning, so that a kill can land after a save.

    Pretraining saves at steps 20 and 40 of 60, and each fine-tuning run at every even step of
    its 12. The tiny config's 6 steps and 1 epoch end too fast for a kill between save and end.
    """
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["pretrain"].update(steps=60, log_every=10, save_every=20)
    config["finetune"].update(epochs=3, save_every=2)
    return config


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), *args]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, timeout=1800)


def new_workdir(tmp_path_factory, name: str) -> Path:
    workdir = tmp_path_factory.mktemp(name)
    (workdir / "config.yaml").write_text(yaml.safe_dump(reliability_config()))
    return workdir


class Workflow:
    """One Snakemake process in its own session, so that the test can SIGKILL it with its jobs."""

    def __init__(self, workdir: Path, *args: str):
        self.workdir = workdir
        self.log_path = workdir / f"snakemake-{time.monotonic_ns()}.log"
        with self.log_path.open("w") as log_file:
            self.process = subprocess.Popen(snakemake_command(workdir, "--cores", "1", *args), stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait(self, timeout: float = 1800) -> int:
        return self.process.wait(timeout=timeout)

    def job_pids(self, rule: str) -> list[int]:
        """Python processes among this Snakemake's descendants that run the script of ``rule``."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
        descendants, frontier = [], [self.process.pid]
        while frontier:
            pid = frontier.pop()
            descendants.extend(children.get(pid, []))
            frontier.extend(children.get(pid, []))
        pids = []
        for pid in descendants:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [arg.decode(errors="replace") for arg in argv if arg]
            if (len(args) >= 2 and "python" in Path(args[0]).name and "/.snakemake/scripts/tmp" in args[-1]
                    and args[-1].endswith(f".{rule}.py")):
                pids.append(pid)
        return pids

    def stop_job_when(self, rule: str, ready: Callable[[], Path | None], timeout: float = 1200) -> tuple[list[int], Path]:
        """Poll until ``ready()`` names a path while a job of ``rule`` runs, then SIGSTOP that job.

        Returns the stopped pids and the path. ``ready`` is polled again after the stop, so the
        state it saw is still the state when the job froze.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"snakemake ended before a {rule} job reached the kill point:\n{self.log_tail()}")
            path = ready()
            pids = self.job_pids(rule) if path is not None else []
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                if ready() == path:
                    return pids, path
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        raise AssertionError(f"no {rule} job reached the kill point within {timeout} s:\n{self.log_tail()}")

    def kill_session(self) -> None:
        """SIGKILL Snakemake and every job it started, so that nothing cleans up after them."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


def final_name(temporary: Path) -> Path:
    """The output path of a ``.tmp-XXXXXXXX-<name>`` temporary."""
    return temporary.with_name(temporary.name[len(".tmp-12345678-"):])


def pretraining_after_a_save(results: Path) -> Callable[[], Path | None]:
    def ready() -> Path | None:
        if not (results / f"models/{MODEL}.resume" / STATE_FILE).exists():
            return None
        return next(iter((results / "models").glob(f".tmp-*-{MODEL}")), None)

    return ready


def trace_mid_write(results: Path) -> Callable[[], Path | None]:
    def ready() -> Path | None:
        return next(iter(sorted((results / f"traces/{MODEL}").glob("*/.tmp-*"))), None)

    return ready


def finetuning_after_a_save(results: Path) -> Callable[[], Path | None]:
    def ready() -> Path | None:
        for temporary in sorted((results / f"checkpoints/{MODEL}").glob("*/*/*/.tmp-*")):
            if (resume_folder(final_name(temporary)) / STATE_FILE).exists():
                return temporary
        return None

    return ready


def evaluation_mid_run(results: Path) -> Callable[[], Path | None]:
    """The output of the evaluate_finetuned job whose log shows a loaded checkpoint and which has no output yet."""

    def ready() -> Path | None:
        for log in sorted((results / f"logs/eval/{MODEL}").glob("*/seed*/*.log")):
            output = results / "eval" / log.relative_to(results / "logs/eval").with_suffix(".parquet")
            if not output.exists() and "loaded" in log.read_text(errors="replace"):
                return output
        return None

    return ready


def planned_outputs(workdir: Path) -> str:
    result = snakemake(workdir, "-n", "--cores", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_same_tables(expected: Path, actual: Path) -> None:
    """Every results/tables/*.csv and its .meta.json: the same files, rows and values."""
    names = sorted(p.name for p in (expected / "results/tables").glob("*.csv"))
    assert names == sorted(p.name for p in (actual / "results/tables").glob("*.csv"))
    assert len(names) >= 9
    for name in names:
        first, second = expected / "results/tables" / name, actual / "results/tables" / name
        polars.testing.assert_frame_equal(pl.read_csv(first), pl.read_csv(second), check_exact=True)
        assert first.read_bytes() == second.read_bytes(), name
        meta = Path(name).with_suffix(".meta.json")
        assert (expected / "results/tables" / meta).read_text() == (actual / "results/tables" / meta).read_text()


def assert_no_leftovers(workdir: Path) -> None:
    leftovers = [p for p in (workdir / "results").rglob("*") if p.name.startswith(".tmp-") or p.suffix == ".resume"]
    assert leftovers == []


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Two uninterrupted runs of the same config in separate folders, side by side (one core each)."""
    workdirs = [new_workdir(tmp_path_factory, f"uninterrupted-{i}") for i in (1, 2)]
    runs = [Workflow(workdir) for workdir in workdirs]
    for run in runs:
        assert run.wait() == 0, run.log_tail()
    return workdirs[0], workdirs[1]


@pytest.mark.slow
def test_same_seed_same_tables(uninterrupted_runs):
    first, second = uninterrupted_runs
    assert_same_tables(first, second)
    model = f"results/models/{MODEL}/model.safetensors"
    assert (first / model).read_bytes() == (second / model).read_bytes()
    for workdir in uninterrupted_runs:
        assert_no_leftovers(workdir)


@pytest.mark.slow
def test_every_output_records_seed_and_versions(uninterrupted_runs):
    results = uninterrupted_runs[0] / "results"
    records: dict[str, dict] = {}
    for table in (results / "tables").glob("*.csv"):
        records[str(table)] = json.loads(table.with_suffix(".meta.json").read_text())
    for parquet in results.rglob("*.parquet"):
        metadata = pq.read_schema(parquet).metadata or {}
        assert b"ramoe" in metadata, f"{parquet} has no ramoe schema metadata"
        records[str(parquet)] = json.loads(metadata[b"ramoe"])
    for config in [*results.glob("models/*/pretrain_config.json"), *results.glob("checkpoints/**/finetune_config.json")]:
        records[str(config)] = json.loads(config.read_text())
    for mask in results.glob("experts/*/*.json"):
        records[str(mask)] = json.loads(mask.read_text())["provenance"]
    assert len([name for name in records if name.endswith("finetune_config.json")]) == 3 * 2 * 2 * 2
    for name, record in records.items():
        assert isinstance(record.get("seed"), int), f"{name}: seed {record.get('seed')!r}"
        assert set(RECORDED_PACKAGES) <= set(record["versions"]), name
        assert record["versions"]["torch"] == torch.__version__, name


@pytest.mark.slow
def test_save_every_change_reruns_nothing(uninterrupted_runs, tmp_path):
    workdir = uninterrupted_runs[0]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["model"]["pretrain"]["save_every"] = 7
    config["finetune"]["save_every"] = None
    changed = tmp_path / "config.yaml"
    changed.write_text(yaml.safe_dump(config))
    command = snakemake_command(workdir, "-n", "--cores", "1")
    command[command.index("--configfile") + 1] = str(changed)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_killed_jobs_rerun_to_same_tables(uninterrupted_runs, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "killed")
    results = workdir / "results"

    # 1. pretraining, after a save: Snakemake dies with the job, so nothing but the atomic
    #    writes keeps the half-trained folder away from the output path
    run = Workflow(workdir)
    _, temporary = run.stop_job_when("pretrain", pretraining_after_a_save(results))
    run.kill_session()
    assert not (results / f"models/{MODEL}").exists()
    assert (temporary / "metrics.jsonl").exists()  # the partial output stays under its temporary name
    assert snakemake(workdir, "--unlock", "--cores", "1").returncode == 0
    assert f"results/models/{MODEL}\n" in planned_outputs(workdir)

    # 2. a trace, while it writes its Parquet files: Snakemake stays alive and reports the job as failed
    run = Workflow(workdir)
    pids, temporary = run.stop_job_when("trace", trace_mid_write(results))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert run.wait() != 0
    trace = final_name(temporary)
    assert not trace.exists()
    assert str(trace.relative_to(workdir)) in planned_outputs(workdir)

    # 3. a fine-tuning run, after a save of its training state
    run = Workflow(workdir)
    pids, temporary = run.stop_job_when("finetune", finetuning_after_a_save(results))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert run.wait() != 0
    checkpoint = final_name(temporary)
    assert not checkpoint.exists()
    assert (resume_folder(checkpoint) / STATE_FILE).exists()
    assert f"{checkpoint.relative_to(workdir)}\n" in planned_outputs(workdir)

    # 4. an evaluation, after it loaded a checkpoint, with Snakemake killed too
    run = Workflow(workdir)
    _, evaluation = run.stop_job_when("evaluate_finetuned", evaluation_mid_run(results))
    run.kill_session()
    assert not evaluation.exists()
    assert snakemake(workdir, "--unlock", "--cores", "1").returncode == 0
    assert str(evaluation.relative_to(workdir)) in planned_outputs(workdir)

    # 5. the rerun resumes both training runs and reaches the uninterrupted tables
    run = Workflow(workdir)
    assert run.wait() == 0, run.log_tail()
    pretrain_log = (results / f"logs/pretrain/{MODEL}.log").read_text()
    assert re.search(r"resuming from step (20|40) ", pretrain_log), pretrain_log[-2000:]
    finetune_log = results / "logs" / checkpoint.relative_to(results).with_suffix(".log")
    assert re.search(r"resuming from step \d*[02468] ", finetune_log.read_text())
    assert_same_tables(uninterrupted_runs[0], workdir)
    for folder in (f"models/{MODEL}", str(checkpoint.relative_to(results))):
        model = Path(folder) / "model.safetensors"
        assert (results / model).read_bytes() == (uninterrupted_runs[0] / "results" / model).read_bytes(), folder
    assert_no_leftovers(workdir)
