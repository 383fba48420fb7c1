"""Benchmark the workflow's own overhead: the no-op dry run and the jobs a setting change reruns.

Comparisons:

* ``snakemake -n`` on a finished tiny-config tree, against ``snakemake -n`` of a one-rule
  Snakefile with nothing to do (the fixed cost of starting Snakemake). Target: at most 3 s;
* the same on the finished default run under ``--results``, in a mirror of hard links, because a dry
  run writes ``.snakemake/iocache/latest.pkl`` even with ``--nolock`` and nothing may be written there;
* after ``finetune.alignment.lambda`` changes in a copy of the tiny tree, the jobs that ``-n``
  plans must be exactly the ramoe ``finetune`` jobs, their ``evaluate_finetuned`` jobs,
  ``main_results``, ``plot_results`` and ``all``.

The tiny tree is built once with ``snakemake --cores 2`` on tests/configs/tiny.yaml (about
3 minutes on 2 cores) in ``--tree DIR``, or in a temporary folder that is deleted at the end.
A tree that ``-n`` already finds finished is reused.

Usage: python bench/workflow.py [--results results] [--tree DIR] [--repeats 5] [--quick] [--output FILE]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

import harness

STAGE = "workflow overhead"
TINY_CONFIG = harness.REPO / "tests" / "configs" / "tiny.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
NOTHING_TO_DO = "Nothing to be done"
EMPTY_SNAKEFILE = 'rule all:\n    input: []\n'


def parse_args(argv: list[str] | None = None):
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tree", help="folder of a finished tiny-config run, built there if missing (default: a temporary folder)")
    return parser.parse_args(argv)


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """Job counts per rule from the 'Job stats' table that ``snakemake -n`` prints; empty when nothing is planned."""
    if "Job stats:" not in dry_run_output:
        return {}
    table = dry_run_output.split("Job stats:", 1)[1].split("total", 1)[0]
    return {match.group(1): int(match.group(2)) for match in re.finditer(r"^(\w+)\s+(\d+)$", table, flags=re.M)}


def expected_lambda_reruns(config: dict) -> dict[str, int]:
    """The jobs a change of finetune.alignment.lambda must rerun: ramoe training and everything after it only."""
    tasks = config["tasks"]
    seeds = config["finetune"]["seeds"]
    languages = config["target_languages"]
    return {
        "finetune": len(tasks) * len(languages) * len(seeds),
        "evaluate_finetuned": len(tasks) * len(seeds),
        "main_results": 1,
        "plot_results": 1,
        "all": 1,
    }


def snakemake_command(tree: Path, *options: str) -> list[str]:
    return [*SNAKEMAKE, "--snakefile", str(harness.REPO / "Snakefile"), "--directory", str(tree),
            "--configfile", str(tree / "config.yaml"), *options]


def dry_run(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(tree, "-n", "--cores", "1"), capture_output=True, text=True, check=False)


def ensure_tiny_tree(tree: Path) -> None:
    """Build the finished tiny-config tree in ``tree`` unless ``-n`` finds one there already."""
    if (tree / "config.yaml").is_file() and NOTHING_TO_DO in _output(dry_run(tree)):
        print(f"reusing the finished tiny tree in {tree}")
        return
    tree.mkdir(parents=True, exist_ok=True)
    shutil.copy(TINY_CONFIG, tree / "config.yaml")
    print(f"building the tiny tree in {tree} (about 3 minutes on 2 cores)")
    built = subprocess.run(snakemake_command(tree, "--cores", "2"), capture_output=True, text=True, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"building the tiny tree in {tree} failed:\n{built.stderr[-3000:]}")


def _output(completed: subprocess.CompletedProcess) -> str:
    return completed.stdout + completed.stderr


def startup_floor(repeats: int) -> harness.Timing:
    """Wall time of ``snakemake -n`` on a one-rule Snakefile with nothing to do."""
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-") as folder:
        Path(folder, "Snakefile").write_text(EMPTY_SNAKEFILE, encoding="utf-8")
        timing, _ = harness.time_command([*SNAKEMAKE, "-n", "--cores", "1", "--nolock"], repeats, cwd=folder)
    return timing


def compare_tiny_noop(tree: Path, repeats: int, floor: harness.Timing) -> dict:
    timing, output = harness.time_command(snakemake_command(tree, "-n", "--cores", "1"), repeats)
    if NOTHING_TO_DO not in output:
        raise harness.ResultMismatch(f"the tiny tree in {tree} is not finished; -n planned {planned_jobs(output)}.")
    jobs = len(list((tree / "results" / "logs").rglob("*.log")))
    return harness.entry(
        "no-op dry run, finished tiny-config tree", stage=STAGE, ours=timing, reference=floor, unit="s",
        target=("ours", "<=", 3.0), ours_label=f"snakemake -n on the finished tests/configs/tiny.yaml tree ({jobs} job logs)",
        reference_label="snakemake -n of a one-rule Snakefile with nothing to do (Snakemake's start-up)",
        check="-n reports 'Nothing to be done'",
    )


def mirror_tree(root: Path, mirror: Path) -> None:
    """Mirror a finished run into ``mirror``: results/ as hard links, .snakemake/ (without locks) and config.yaml as copies.

    Hard links share the files' inodes, so every output keeps its mtime, and nothing of ``root``
    is written. Snakemake 9.27 writes .snakemake/iocache/latest.pkl on every dry run, even with
    --nolock, so a dry run in ``root`` itself would write there.
    """
    try:
        shutil.copytree(root / "results", mirror / "results", copy_function=os.link)
    except OSError as error:
        raise RuntimeError(
            f"cannot hard-link {root / 'results'} into {mirror}: {error}. Set TMPDIR to a folder on the same "
            "file system as the results."
        ) from error
    shutil.copytree(root / ".snakemake", mirror / ".snakemake", ignore=shutil.ignore_patterns("locks"))
    shutil.copy(root / "config.yaml", mirror / "config.yaml")


def compare_default_noop(results: Path, repeats: int, floor: harness.Timing) -> dict:
    """Time ``-n`` on a hard-link mirror of the finished run whose output folder is ``results``."""
    root = results.resolve().parent
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-default-") as folder:
        mirror = Path(folder)
        mirror_tree(root, mirror)
        timing, output = harness.time_command(snakemake_command(mirror, "-n", "--cores", "1"), repeats)
    planned = planned_jobs(output)
    jobs = len(list((results / "logs").rglob("*.log")))
    reference_label = "snakemake -n of a one-rule Snakefile with nothing to do (Snakemake's start-up)"
    if NOTHING_TO_DO in output:
        return harness.entry(
            "no-op dry run, finished default tree", stage=STAGE, ours=timing, reference=floor, unit="s",
            target=("ours", "<=", 3.0),
            ours_label=f"snakemake -n on a hard-link mirror of the finished default tree ({jobs} job logs)",
            reference_label=reference_label, check="-n reports 'Nothing to be done'",
        )
    # A dry run of an unfinished or outdated tree plans jobs, so its time is reported without the target.
    return harness.entry(
        f"dry run of the default tree, {sum(planned.values())} jobs planned", stage=STAGE, ours=timing,
        reference=floor, unit="s",
        ours_label=f"snakemake -n on a hard-link mirror of the default tree ({jobs} job logs)",
        reference_label=reference_label, check=f"-n plans {planned}",
    )


def compare_lambda_change(tree: Path) -> dict:
    """Plan the jobs after finetune.alignment.lambda changes, in a copy of the tiny tree."""
    config = yaml.safe_load((tree / "config.yaml").read_text(encoding="utf-8"))
    alignment = config["finetune"].setdefault("alignment", {})
    alignment["lambda"] = 2.0 if alignment.get("lambda", 1.0) != 2.0 else 3.0
    expected = expected_lambda_reruns(config)
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-") as folder:
        changed = Path(folder)
        (changed / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        shutil.copytree(tree / "results", changed / "results")
        shutil.copytree(tree / ".snakemake", changed / ".snakemake", ignore=shutil.ignore_patterns("locks"))
        completed = dry_run(changed)
    if completed.returncode != 0:
        raise RuntimeError(f"snakemake -n after the lambda change failed:\n{completed.stderr[-3000:]}")
    planned = planned_jobs(_output(completed))
    record = harness.entry(
        "jobs rerun after finetune.alignment.lambda changes, tiny-config tree", stage=STAGE, ours=sum(planned.values()),
        reference=sum(expected.values()), unit="jobs", ours_label=f"snakemake -n plans {planned}",
        reference_label=f"ramoe training and what follows it: {expected}",
    )
    record["target"] = "planned jobs == expected jobs, rule by rule"
    record["met"] = planned == expected
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = harness.repeats_of(args)
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-tree-") as scratch:
        tree = Path(args.tree).resolve() if args.tree else Path(scratch)
        ensure_tiny_tree(tree)
        floor = startup_floor(repeats)
        entries = [compare_tiny_noop(tree, repeats, floor)]
        if (Path(args.results) / "logs").is_dir():
            entries.append(compare_default_noop(Path(args.results), repeats, floor))
        else:
            print(f"{args.results} holds no finished run, so the default-tree dry run is skipped")
        entries.append(compare_lambda_change(tree))
    harness.emit(entries, args.output)


if __name__ == "__main__":
    sys.exit(main())
