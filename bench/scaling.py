"""Benchmark how the time and peak memory of trace capture and batched generation grow with the number of items.

Each point (1x, 2x and 4x a base number of items) runs in a fresh process. The process loads the
model and warms up on one item. Then it resets the peak RSS to the current RSS (the baseline) and
runs the work ``--repeats`` times. The time is the median of those runs. The peak is the process's peak RSS
during the work, and the working memory is that peak minus the baseline.
Capture traces the arith train prompts of all five languages (``capture_traces``, both Parquet
files); generation is ``generate_greedy`` over arith prompts in one language.

Target: the peak memory of capture, and its working memory, grow by at most 1.2x when the items
double, because the traces stream to disk in row groups instead of being held in memory.

Writes the figure bench/scaling.png (or ``--figure``).

Usage: python bench/scaling.py [--results results] [--repeats 5] [--quick] [--figure FILE] [--output FILE]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import harness  # noqa: E402

STAGE = "scaling"
FACTORS = (1, 2, 4)
LANGS = "en,xa,xb,xc,xd"
# Base sizes: 100 items per language for capture (500 texts, about 7 row groups of token rows at
# 4x) and 150 prompts for generation, so 4x stays within the 402 train and 600 total items.
CAPTURE_BASE = 100
GENERATION_BASE = 150
QUICK_BASE = 8
WORKING_MEMORY_NOTES = {
    "capture": (
        "the part of the peak that the work adds. The token writer buffers up to rows_per_group rows "
        "(65536 by default) and the sequence writer up to rows_per_group // experts rows (4096 for the 16 experts of the default model) "
        "before each writes a row group"
    ),
    "generation": "the part of the peak that the work adds; batches of 64 prompts bound it, the outputs kept are short strings",
}


def parse_args(argv: list[str] | None = None):
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--rows-per-group", type=int, help="Parquet row group size for capture (default: capture_traces's own, as the trace rule)"
    )
    parser.add_argument("--figure", default=str(harness.BENCH_DIR / "scaling.png"), help="figure path (default: bench/scaling.png)")
    return parser.parse_args(argv)


def capture_point(args, items: int, repeats: int) -> dict:
    argv = [str(harness.BENCH_DIR / "capture.py"), "--worker", "ours", "--results", str(Path(args.results).resolve()),
            "--model", args.model, "--langs", LANGS, "--items", str(items), "--threads", str(args.threads),
            "--repeats", str(repeats)]
    if args.rows_per_group is not None:
        argv += ["--rows-per-group", str(args.rows_per_group)]
    return harness.run_worker(argv)


def generation_point(args, items: int, repeats: int) -> dict:
    argv = [str(harness.BENCH_DIR / "evaluation.py"), "--worker", "generate", "--results",
            str(Path(args.results).resolve()), "--model", args.model, "--items", str(items),
            "--threads", str(args.threads), "--repeats", str(repeats)]
    return harness.run_worker(argv)


def summarize(kind: str, factor: int, result: dict) -> dict:
    count = result.get("texts", result.get("items"))
    return {
        "kind": kind,
        "factor": factor,
        "items": count,
        "seconds": statistics.median(result["seconds"]),
        "seconds_min": min(result["seconds"]),
        "seconds_max": max(result["seconds"]),
        "peak_mib": result["peak_mib"],
        "growth_mib": harness.working_memory_mib(result),
    }


def growth_entries(kind: str, points: list[dict], repeats: int, *, memory_target: bool) -> list[dict]:
    """Ratios of time and peak memory between consecutive points (each doubles the items)."""
    entries = []
    for smaller, larger in zip(points, points[1:]):
        span = f"{larger['items']} vs {smaller['items']} items"
        entries.append(harness.entry(
            f"{kind} peak memory (process RSS), {span}", stage=STAGE, ours=larger["peak_mib"],
            reference=smaller["peak_mib"], unit="MiB", target=("ratio", "<=", 1.2) if memory_target else None,
            ours_label=f"{kind} of {larger['items']} items", reference_label=f"{kind} of {smaller['items']} items",
        ))
        entries.append(harness.entry(
            f"{kind} working memory (peak RSS above the loaded model), {span}", stage=STAGE,
            ours=larger["growth_mib"], reference=smaller["growth_mib"], unit="MiB",
            target=("ratio", "<=", 1.2) if memory_target else None,
            ours_label=f"{kind} of {larger['items']} items", reference_label=f"{kind} of {smaller['items']} items",
            note=WORKING_MEMORY_NOTES[kind],
        ))
        entries.append(harness.entry(
            f"{kind} time, {span}", stage=STAGE, ours=larger["seconds"], reference=smaller["seconds"], unit="s",
            ours_label=f"{kind} of {larger['items']} items", reference_label=f"{kind} of {smaller['items']} items",
            note=f"median of {repeats} runs each; time proportional to the items gives ratio 2",
        ))
    entries[0]["points"] = points
    return entries


def draw(points: dict[str, list[dict]], path: str) -> None:
    """Time and peak memory against the number of items, with proportional growth from 1x drawn dashed."""
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
    for (kind, series), color in zip(points.items(), ("tab:blue", "tab:orange")):
        items = [point["items"] for point in series]
        seconds = [point["seconds"] for point in series]
        time_axis.errorbar(
            items, seconds, marker="o", color=color, label=kind,
            yerr=[[s - p["seconds_min"] for s, p in zip(seconds, series)],
                  [p["seconds_max"] - s for s, p in zip(seconds, series)]],
        )
        time_axis.plot(items, [seconds[0] * n / items[0] for n in items], linestyle="--", color=color, alpha=0.5)
        memory_axis.plot(items, [point["peak_mib"] for point in series], marker="o", color=color, label=f"{kind}: peak RSS")
        memory_axis.plot(items, [point["growth_mib"] for point in series], marker="s", linestyle=":", color=color,
                         label=f"{kind}: peak above the loaded model")
    time_axis.set(xlabel="items", ylabel="seconds (median, min-max)", title="time (dashed: proportional to items)")
    memory_axis.set(xlabel="items", ylabel="MiB", title="peak memory", ylim=(0, None))
    time_axis.legend(fontsize=8)
    memory_axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = harness.repeats_of(args)
    capture_base = QUICK_BASE if args.quick else CAPTURE_BASE
    generation_base = QUICK_BASE if args.quick else GENERATION_BASE
    points = {
        "capture": [summarize("capture", factor, capture_point(args, capture_base * factor, repeats)) for factor in FACTORS],
        "generation": [
            summarize("generation", factor, generation_point(args, generation_base * factor, repeats)) for factor in FACTORS
        ],
    }
    draw(points, args.figure)
    entries = growth_entries("capture", points["capture"], repeats, memory_target=True)
    entries += growth_entries("generation", points["generation"], repeats, memory_target=False)
    harness.emit(entries, args.output)


if __name__ == "__main__":
    sys.exit(main())
