"""Shared helpers of the benchmark scripts: timing, peak memory, result checks and the result entries.

Every comparison times our way of doing a stage against the reference way of doing the same work.
Both run in the same process, in alternating repetitions, so load from other jobs on the machine
slows both sides alike and their ratio stays meaningful. Before timing, each script checks that
both sides produce the same result with the ``check_*`` functions below, which raise
``ResultMismatch`` on a difference.

The scripts in this folder put it on ``sys.path`` (Python does when it runs ``bench/<script>.py``),
so they import this module as ``harness``.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
REQUIRED_KEYS = ("name", "ours", "reference", "unit", "ratio", "target", "met")
_OPERATORS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


class ResultMismatch(AssertionError):
    """Our way and the reference way produced different results, so timing them would compare different work."""


# ---------------------------------------------------------------------------------------------
# Command line


def base_parser(description: str, *, default_repeats: int = 5) -> argparse.ArgumentParser:
    """Build an argument parser with the options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--results", default="results", help="finished default run to read (default: results)")
    parser.add_argument("--model", default="tiny-olmoe", help="model name under RESULTS/models (default: tiny-olmoe)")
    parser.add_argument(
        "--repeats", type=int, default=default_repeats, help=f"timed repetitions per side (default: {default_repeats})"
    )
    parser.add_argument("--quick", action="store_true", help="few items and 2 repetitions, for a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1, as the workflow jobs)")
    parser.add_argument("--output", help="write the result entries as JSON to this file")
    return parser


def repeats_of(args: argparse.Namespace) -> int:
    """Return the number of timed repetitions: 2 under --quick, otherwise --repeats."""
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}.")
    return 2 if args.quick else args.repeats


def command_line() -> str:
    """Return the command that ran this script, relative to the repository root, for the report."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO))
    except ValueError:
        script_name = str(script)
    arguments = list(sys.argv[1:])
    if "--output" in arguments:  # a temporary file of run_all.py, meaningless in the report
        index = arguments.index("--output")
        del arguments[index : index + 2]
    arguments = [argument.replace(f"{REPO}/", "") for argument in arguments]
    return " ".join(["python", script_name, *arguments])


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one side of a comparison, in one unit."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)


def time_alternating(
    functions: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    before_each: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time each function ``repeats`` times in seconds, alternating between them.

    Every round runs each function once, so a slow phase of the machine hits all sides. The order
    inside a round flips every round, so neither side always runs right after the other.
    ``before_each`` runs untimed before every call (for example to delete the previous outputs).
    """
    for _ in range(warmup):
        for function in functions.values():
            if before_each is not None:
                before_each()
            function()
    values: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            functions[name]()
            values[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(times)) for name, times in values.items()}


def time_command(argv: Sequence[str], repeats: int, *, cwd: str | Path | None = None) -> tuple[Timing, str]:
    """Wall time in seconds of a command run ``repeats`` times, and its output of the last run.

    Raises CalledProcessError when the command fails, with its output in the message.
    """
    values = []
    output = ""
    for _ in range(repeats):
        start = time.perf_counter()
        completed = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
        values.append(time.perf_counter() - start)
        output = completed.stdout + completed.stderr
        if completed.returncode != 0:
            raise subprocess.CalledProcessError(completed.returncode, argv, output=output[-3000:])
    return Timing(tuple(values)), output


# ---------------------------------------------------------------------------------------------
# Peak memory


def max_rss_mib() -> float:
    """Peak resident set size of this process so far (or since ``reset_peak_rss``), in MiB.

    tracemalloc cannot see torch's allocations, but the operating system's peak RSS counts them.
    On Linux this reads VmHWM, the peak that ``reset_peak_rss`` resets. ru_maxrss is no
    substitute there: it also keeps the peak of any thread that exited before the reset (the
    weight-loading threads, for example). Elsewhere it falls back to ru_maxrss.
    """
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak_rss() -> float:
    """Reset this process's peak RSS to its current RSS and return that, in MiB.

    Loading a model peaks above the memory the loaded model then holds, and that earlier peak
    would hide the peak of the work measured after it. Linux resets the peak when "5" is written
    to /proc/self/clear_refs. Where that is not possible, the peak so far is returned instead,
    so the growth measured from it is a lower bound.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return max_rss_mib()
    current = _proc_status_mib("VmRSS")
    return current if current is not None else max_rss_mib()


def working_memory_mib(result: Mapping) -> float:
    """Return the peak RSS a worker's work added above its baseline (``peak_mib - baseline_mib``), at least 0.

    Linux sums its RSS counters from per-CPU parts only approximately, so a peak read after the
    baseline can come out a few pages below it.
    """
    return max(0.0, result["peak_mib"] - result["baseline_mib"])


def _proc_status_mib(field: str) -> float | None:
    """Read a memory field of /proc/self/status in MiB; return None where the file or field is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024.0  # the kernel writes kB
    return None


def run_worker(argv: Sequence[str]) -> dict:
    """Run a worker in a fresh Python process and return the JSON object it prints on its last stdout line.

    A fresh process per measurement keeps the peak RSS of one side from hiding the other's.
    """
    completed = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, check=False, cwd=REPO,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"benchmark worker {' '.join(argv)} failed with exit status {completed.returncode}:\n"
            f"{completed.stderr[-3000:]}"
        )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"benchmark worker {' '.join(argv)} printed no result line.")
    return json.loads(lines[-1])


def directory_bytes(path: str | Path) -> int:
    """Total size in bytes of the files under ``path`` (file sizes, not disk blocks)."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


# ---------------------------------------------------------------------------------------------
# Result checks: both sides must do the same work before their times are compared.


def check_close(name: str, ours: np.ndarray, reference: np.ndarray, *, atol: float) -> float:
    """Raise ResultMismatch unless both arrays have one shape and differ by at most ``atol``; return the max difference."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise ResultMismatch(f"{name}: our shape {ours.shape} differs from the reference shape {reference.shape}.")
    if ours.size == 0:
        return 0.0
    difference = np.abs(ours - reference)
    worst = float(np.nanmax(difference)) if np.isfinite(difference).any() else float("inf")
    if not np.array_equal(np.isnan(ours), np.isnan(reference)) or worst > atol:
        index = np.unravel_index(int(np.nanargmax(difference)), difference.shape)
        raise ResultMismatch(
            f"{name}: max difference {worst:.3g} at index {tuple(int(i) for i in index)} "
            f"(ours {ours[index]!r}, reference {reference[index]!r}) exceeds the tolerance {atol:g}."
        )
    return worst


def check_same_top_k(
    name: str, ours: np.ndarray, reference: np.ndarray, reference_probabilities: np.ndarray, *, tie_gap: float
) -> int:
    """Raise ResultMismatch unless the top-k expert ids agree on every token whose top-k choice is not a near-tie.

    ``ours`` and ``reference`` are (tokens, top_k) expert ids sorted by weight. ``reference_probabilities``
    is (tokens, experts). A token counts as a near-tie, where batched and single-sequence float
    sums may pick differently, when two of its probabilities that decide the top-k order (ranks
    1 to k + 1) are less than ``tie_gap`` apart. Returns the number of near-tie tokens that differ.
    """
    ours = np.asarray(ours)
    reference = np.asarray(reference)
    if ours.shape != reference.shape:
        raise ResultMismatch(f"{name}: our top-k shape {ours.shape} differs from the reference shape {reference.shape}.")
    top_k = ours.shape[1]
    ordered = -np.sort(-np.asarray(reference_probabilities, dtype=np.float64), axis=1)[:, : top_k + 1]
    near_tie = (np.diff(-ordered, axis=1) < tie_gap).any(axis=1)
    differs = (ours != reference).any(axis=1)
    hard = np.flatnonzero(differs & ~near_tie)
    if hard.size:
        token = int(hard[0])
        raise ResultMismatch(
            f"{name}: top-k expert ids differ on {hard.size} of {len(ours)} tokens that are not near-ties, "
            f"first at token {token}: ours {ours[token].tolist()}, reference {reference[token].tolist()}."
        )
    return int((differs & near_tie).sum())


def check_same_texts(name: str, ours: Sequence[str], reference: Sequence[str]) -> None:
    """Raise ResultMismatch unless both lists hold the same strings in the same order."""
    if len(ours) != len(reference):
        raise ResultMismatch(f"{name}: {len(ours)} outputs against {len(reference)} reference outputs.")
    different = [index for index, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b]
    if different:
        index = different[0]
        raise ResultMismatch(
            f"{name}: {len(different)} of {len(ours)} outputs differ, first at item {index}: "
            f"ours {ours[index]!r}, reference {reference[index]!r}."
        )


# ---------------------------------------------------------------------------------------------
# Result entries


def entry(
    name: str,
    *,
    stage: str,
    ours: float | Timing,
    reference: float | Timing,
    unit: str,
    target: tuple[str, str, float] | None = None,
    ours_label: str,
    reference_label: str,
    check: str = "",
    note: str = "",
) -> dict:
    """Build one comparison entry of results.json.

    ``ratio`` is ours / reference. When both sides are timings from ``time_alternating``, it is the
    median over rounds of the two sides' ratio within a round. A slow phase of the machine can
    shift one side's median more than the other's, but it cancels out of a round's ratio because
    a round runs both sides back to back. ``ratio_of_medians`` keeps the plain quotient. ``target`` is (quantity, operator, bound) with quantity
    ``ratio`` or ``ours`` and operator ``<=``, ``>=`` or ``==``; without it the entry is
    informational, and ``target`` and ``met`` are None.
    """
    ours_median = ours.median if isinstance(ours, Timing) else float(ours)
    reference_median = reference.median if isinstance(reference, Timing) else float(reference)
    # A reference of 0 (a working memory too small to register, say) has no ratio, and a ratio
    # target on it counts as missed.
    ratio = ours_median / reference_median if reference_median else None
    ratio_of_medians = ratio
    paired = isinstance(ours, Timing) and isinstance(reference, Timing) and len(ours.values) == len(reference.values)
    if paired:
        ratio = statistics.median(a / b for a, b in zip(ours.values, reference.values, strict=True))
    record = {
        "name": name,
        "stage": stage,
        "ours": ours_median,
        "reference": reference_median,
        "unit": unit,
        "ratio": ratio,
        "ratio_of_medians": ratio_of_medians,
        "target": None,
        "met": None,
        "ours_label": ours_label,
        "reference_label": reference_label,
    }
    for side, value in (("ours", ours), ("reference", reference)):
        if isinstance(value, Timing):
            record[f"{side}_min"] = value.min
            record[f"{side}_max"] = value.max
            record["repeats"] = len(value.values)
    if target is not None:
        quantity, symbol, bound = target
        if quantity not in ("ratio", "ours") or symbol not in _OPERATORS:
            raise ValueError(f"target {target!r} must be ('ratio' or 'ours', one of {sorted(_OPERATORS)}, bound).")
        value = ratio if quantity == "ratio" else ours_median
        record["target"] = f"{quantity} {symbol} {bound:g}" + (f" {unit}" if quantity == "ours" else "")
        record["met"] = value is not None and bool(_OPERATORS[symbol](value, bound))
    if check:
        record["check"] = check
    if note:
        record["note"] = note
    record["command"] = command_line()
    record["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    record["load_average"] = [round(value, 2) for value in os.getloadavg()]
    return record


def emit(entries: Sequence[dict], output: str | None) -> None:
    """Print the entries as a table, and write them as JSON to ``output`` when given."""
    for record in entries:
        target = "" if record["target"] is None else f"  target {record['target']}: {'met' if record['met'] else 'MISSED'}"
        print(
            f"{record['name']}: ours {format_value(record['ours'], record['unit'])}, reference "
            f"{format_value(record['reference'], record['unit'])}, ratio {format_ratio(record['ratio'])}{target}"
        )
    if output:
        Path(output).write_text(json.dumps(list(entries), indent=2) + "\n", encoding="utf-8")


def format_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def format_value(value: float, unit: str) -> str:
    """Format a number with its unit: seconds below 1 in ms, bytes in kB or MB."""
    if unit == "s" and value < 1.0:
        return f"{value * 1e3:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / 1e6:.2f} MB" if value >= 1e6 else f"{value / 1e3:.1f} kB"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if float(value).is_integer():
        return f"{int(value)} {unit}"
    return f"{value:.3g} {unit}"


def machine_info() -> dict:
    """Describe the machine and software the numbers were measured on."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
