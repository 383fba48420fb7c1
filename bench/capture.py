"""Benchmark routing-trace capture against the common research way, and the cost of capture over a plain forward.

Comparisons (each checks first that both sides compute the same routing):

* trace capture: ``capture_traces`` (batched forward passes, router hooks, Parquet streamed in row
  groups) against one sequence at a time with ``model(..., output_router_logits=True)`` and one
  float32 NumPy array of router logits per sequence saved with ``np.save``. Compared: time, peak
  memory (each side once in a fresh process, from ``ru_maxrss``) and bytes on disk;
* capture overhead, one batch: a batched forward under ``RouterCapture`` that also computes the
  top-k and the routing distribution of every layer, against the same forward without hooks;
* capture overhead, end to end: ``capture_traces`` against plain forward passes over the same batches.

Usage: python bench/capture.py [--results results] [--task arith] [--langs en,xd] [--repeats 5]
                               [--quick] [--output capture.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

import harness
from ramoe.data.schema import read_parallel
from ramoe.models.loading import load_model
from ramoe.routing.adapters import SELECTION_SOFTMAX_TOP_K, describe_moe
from ramoe.routing.capture import RouterCapture
from ramoe.routing.traces import _encode_batch, _forward, capture_traces, read_sequence_trace, trace_texts

STAGE = "trace capture"
QUICK_ITEMS = 24
# Batched and single-sequence forwards sum in another order, so their float32 routing differs
# by about 1e-7. 1e-5 is far above that noise and far below any real difference in routing.
PROBABILITY_TOLERANCE = 1e-5
# The token trace stores weights as float16: rounding a weight in [0, 1] moves it by at most half
# a float16 ulp below 1, 2^-12 (2.4e-4), on top of the float32 noise above.
WEIGHT_TOLERANCE = 2.0**-12 + PROBABILITY_TOLERANCE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--task", default="arith", help="task whose train prompts are traced (default: arith)")
    parser.add_argument("--langs", default="en,xd", help="comma-separated languages to trace (default: en,xd)")
    parser.add_argument("--items", type=int, help="items per language (default: every train item; 24 under --quick)")
    parser.add_argument("--batch-size", type=int, default=64, help="capture_traces batch size (default: 64, as routing.batch_size)")
    parser.add_argument(
        "--rows-per-group", type=int, help="Parquet row group size of capture_traces (default: its own, as the trace rule)"
    )
    parser.add_argument(
        "--worker", choices=("ours", "reference"),
        help="internal: trace with one side --repeats times in this process and print times and peak memory as JSON",
    )
    return parser.parse_args(argv)


def load_texts(results: Path, task: str, langs: list[str], items: int | None) -> list[tuple[str, str, str]]:
    """(item_id, lang, prompt) of the first ``items`` train items of ``task`` in each language, language by language."""
    rows = [row for row in read_parallel(results / "data" / f"{task}.parquet").to_pylist() if row["split"] == "train"]
    texts = []
    for lang in langs:
        in_lang = sorted((row for row in rows if row["lang"] == lang), key=lambda row: row["item_id"])
        if not in_lang:
            raise SystemExit(f"{task} has no train rows in language {lang!r}; check --langs.")
        texts.extend(trace_texts(in_lang[:items], "prompt"))
    return texts


def file_name(item_id: str, lang: str) -> str:
    return f"{lang}-{item_id}.npy"


# ---------------------------------------------------------------------------------------------
# The two ways of tracing


def trace_ours(model, tokenizer, texts, folder: Path, batch_size: int, rows_per_group: int | None = None) -> dict:
    """Trace with capture_traces into ``folder``; ``rows_per_group=None`` keeps its default, as the trace rule does."""
    options = {} if rows_per_group is None else {"rows_per_group": rows_per_group}
    return capture_traces(
        model, tokenizer, texts,
        token_path=folder / "tokens.parquet", sequence_path=folder / "sequences.parquet", batch_size=batch_size,
        **options,
    )


@torch.inference_mode()
def trace_reference(model, tokenizer, texts, folder: Path) -> None:
    """Run one forward per sequence with output_router_logits=True and np.save its (layers, tokens, experts) float32 logits."""
    for item_id, lang, text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        output = model(**encoded, output_router_logits=True)
        logits = torch.stack([layer_logits.float() for layer_logits in output.router_logits])  # (L, T, E)
        np.save(folder / file_name(item_id, lang), logits.numpy())


# ---------------------------------------------------------------------------------------------
# Equality check


def check_traces(ours_folder: Path, reference_folder: Path, texts, top_k: int) -> str:
    """Compare our Parquet traces with the reference logits: routing distributions, top-k ids and weights.

    Raises ResultMismatch on a difference and returns a one-line summary of the agreement.
    """
    reference_means, reference_ids, reference_weights, reference_probabilities = [], [], [], []
    for item_id, lang, _ in texts:
        logits = torch.from_numpy(np.load(reference_folder / file_name(item_id, lang)))  # (L, T, E)
        probabilities = torch.softmax(logits, dim=-1)
        weights, ids = probabilities.topk(top_k, dim=-1)  # sorted by weight, descending
        reference_means.append(probabilities.mean(dim=1).numpy())  # (L, E)
        reference_ids.append(ids.reshape(-1, top_k).numpy())  # (L * T, k) in layer, token order
        reference_weights.append(weights.reshape(-1, top_k).numpy())
        reference_probabilities.append(probabilities.reshape(-1, probabilities.shape[-1]).numpy())

    sequences = read_sequence_trace(ours_folder / "sequences.parquet")
    keys = list(zip(sequences["item_id"], sequences["lang"], strict=True))
    expected_keys = [(item_id, lang) for item_id, lang, _ in texts for _ in range(reference_means[0].shape[0])]
    if keys != expected_keys:
        raise harness.ResultMismatch("sequence trace rows are not one per (text, layer) in input order.")
    ours_means = np.stack(sequences["probs"].to_list())
    probability_gap = harness.check_close(
        "mean routing distribution per sequence and layer", ours_means, np.concatenate(reference_means),
        atol=PROBABILITY_TOLERANCE,
    )

    tokens = pl.from_arrow(pq.read_table(ours_folder / "tokens.parquet", columns=["expert", "weight"]))
    ours_ids = tokens["expert"].to_numpy().reshape(-1, top_k)
    ours_weights = tokens["weight"].to_numpy().astype(np.float32).reshape(-1, top_k)
    all_reference_ids = np.concatenate(reference_ids)
    flips = harness.check_same_top_k(
        "top-k expert ids per token and layer", ours_ids, all_reference_ids, np.concatenate(reference_probabilities),
        tie_gap=PROBABILITY_TOLERANCE,
    )
    same = (ours_ids == all_reference_ids).all(axis=1)
    weight_gap = harness.check_close(
        "top-k routing weights", ours_weights[same], np.concatenate(reference_weights)[same], atol=WEIGHT_TOLERANCE
    )
    return (
        f"mean routing distributions of {len(ours_means)} (sequence, layer) pairs agree within {probability_gap:.1e}; "
        f"top-k ids agree on {int(same.sum())} of {len(same)} (token, layer) pairs ({flips} differ at near-ties); "
        f"top-k weights (stored as float16) within {weight_gap:.1e}"
    )


# ---------------------------------------------------------------------------------------------
# Worker: one side once, in its own process, for its peak memory


def run_worker(args: argparse.Namespace) -> None:
    """Trace ``--repeats`` times in this process and print the times, the baseline and the peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    texts = load_texts(results, args.task, args.langs.split(","), args.items)

    def trace(folder: Path, subset) -> None:
        if args.worker == "ours":
            trace_ours(model, tokenizer, subset, folder, args.batch_size, args.rows_per_group)
        else:
            trace_reference(model, tokenizer, subset, folder)

    seconds = []
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-") as root:
        folder = Path(root) / "trace"
        folder.mkdir()
        # A one-text warm-up first, so lazily loaded kernels count in the baseline, not in the peak.
        trace(folder, texts[:1])
        baseline = harness.reset_peak_rss()
        for _ in range(max(args.repeats, 1)):
            shutil.rmtree(folder)
            folder.mkdir()
            start = time.perf_counter()
            trace(folder, texts)
            seconds.append(time.perf_counter() - start)
        size = harness.directory_bytes(folder)
    print(json.dumps({"side": args.worker, "texts": len(texts), "seconds": seconds, "baseline_mib": baseline,
                      "peak_mib": harness.max_rss_mib(), "bytes": size}))


def worker_argv(args: argparse.Namespace, side: str, items: int | None, repeats: int = 1) -> list[str]:
    """Build the command line of a worker that traces ``items`` items per language ``repeats`` times with ``side``'s way."""
    argv = [str(Path(__file__).resolve()), "--worker", side, "--results", str(Path(args.results).resolve()), "--model", args.model,
            "--task", args.task, "--langs", args.langs, "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--repeats", str(repeats)]
    if items is not None:
        argv += ["--items", str(items)]
    if args.rows_per_group is not None:
        argv += ["--rows-per-group", str(args.rows_per_group)]
    return argv


# ---------------------------------------------------------------------------------------------
# The comparisons


def compare_capture(args, model, tokenizer, texts, items: int | None, repeats: int, layout) -> list[dict]:
    """Time, peak memory and bytes on disk of capture_traces against one-at-a-time capture with np.save."""
    with tempfile.TemporaryDirectory(prefix="ramoe-bench-") as root:
        ours_folder, reference_folder = Path(root) / "ours", Path(root) / "reference"
        ours_folder.mkdir()
        reference_folder.mkdir()
        summary = trace_ours(model, tokenizer, texts, ours_folder, args.batch_size, args.rows_per_group)
        trace_reference(model, tokenizer, texts, reference_folder)
        check = check_traces(ours_folder, reference_folder, texts, layout.top_k)
        ours_bytes = summary["token_bytes"] + summary["sequence_bytes"]
        reference_bytes = harness.directory_bytes(reference_folder)
        logits_bytes = summary["tokens"] * len(layout.moe_layers) * layout.num_experts * 4

        def clear() -> None:
            for folder in (ours_folder, reference_folder):
                shutil.rmtree(folder)
                folder.mkdir()

        timings = harness.time_alternating(
            {
                "ours": lambda: trace_ours(model, tokenizer, texts, ours_folder, args.batch_size, args.rows_per_group),
                "reference": lambda: trace_reference(model, tokenizer, texts, reference_folder),
            },
            repeats,
            before_each=clear,
        )

    memory = {side: harness.run_worker(worker_argv(args, side, items)) for side in ("ours", "reference")}

    workload = f"{len(texts)} {args.task} train prompts ({args.langs}), {summary['tokens']} tokens"
    ours_label = f"capture_traces, batch {args.batch_size}, token + sequence Parquet; {workload}"
    reference_label = f"model(output_router_logits=True) per sequence, np.save of float32 logits; {workload}"
    return [
        harness.entry(
            "trace capture time", stage=STAGE, ours=timings["ours"], reference=timings["reference"], unit="s",
            target=("ratio", "<=", 0.2), ours_label=ours_label, reference_label=reference_label, check=check,
            note="target: at least 5x faster than one sequence at a time",
        ),
        harness.entry(
            "trace capture peak memory (process RSS)", stage=STAGE, ours=memory["ours"]["peak_mib"],
            reference=memory["reference"]["peak_mib"], unit="MiB", ours_label=ours_label,
            reference_label=reference_label,
            note=(
                f"each side once in a fresh process; growth over the loaded model: ours "
                f"{harness.working_memory_mib(memory['ours']):.1f} MiB, reference "
                f"{harness.working_memory_mib(memory['reference']):.1f} MiB"
            ),
        ),
        harness.entry(
            "trace bytes on disk: token + sequence Parquet vs float32 logits", stage=STAGE, ours=ours_bytes,
            reference=logits_bytes, unit="bytes", target=("ratio", "<=", 0.1), ours_label=ours_label,
            reference_label="the float32 router logits of every token and MoE layer (tokens x layers x experts x 4 bytes)",
            note=(
                f"token trace {summary['token_bytes']} bytes, sequence trace {summary['sequence_bytes']} bytes; "
                f"the .npy files with their headers take {reference_bytes} bytes"
            ),
        ),
        harness.entry(
            "trace bytes on disk: sequence Parquet alone vs float32 logits", stage=STAGE,
            ours=summary["sequence_bytes"], reference=logits_bytes, unit="bytes", target=("ratio", "<=", 0.1),
            ours_label="sequence trace only (routing.token_traces: false)",
            reference_label="the float32 router logits of every token and MoE layer",
        ),
    ]


def compare_overhead_one_batch(args, model, tokenizer, texts, repeats: int) -> dict:
    """Time one batched forward under RouterCapture, top-k and distributions included, against the same forward alone."""
    prompts = [text for _, _, text in texts[: args.batch_size]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(**batch, use_cache=False).logits

    def forward_with_capture() -> torch.Tensor:
        with RouterCapture(model) as capture, torch.inference_mode():
            logits = model(**batch, use_cache=False).logits
            capture.all_layers(call=0)  # distributions and top-k of every layer, as capture_traces reads them
        return logits

    # Hooks only observe: the model's output must be bit-identical with and without them.
    if not torch.equal(forward(), forward_with_capture()):
        raise harness.ResultMismatch("the LM logits differ with router hooks registered.")
    timings = harness.time_alternating({"ours": forward_with_capture, "reference": forward}, repeats)
    tokens = int(batch["attention_mask"].sum())
    return harness.entry(
        "capture overhead, one batch: forward + RouterCapture + top-k vs plain forward", stage="capture overhead",
        ours=timings["ours"], reference=timings["reference"], unit="s", target=("ratio", "<=", 1.1),
        ours_label=f"forward of {len(prompts)} prompts ({tokens} tokens) under RouterCapture, with the distributions and top-k of all layers",
        reference_label="the same forward without hooks",
        check="LM logits bit-identical with and without hooks",
    )


def compare_overhead_end_to_end(args, model, tokenizer, texts, repeats: int) -> dict:
    """capture_traces against plain forward passes over the same batches, encoded and called the same way."""
    def plain() -> None:
        with torch.inference_mode():
            for start in range(0, len(texts), args.batch_size):
                input_ids, attention_mask, _ = _encode_batch(tokenizer, texts[start : start + args.batch_size], None)
                _forward(model, input_ids, attention_mask)

    with tempfile.TemporaryDirectory(prefix="ramoe-bench-") as folder:
        timings = harness.time_alternating(
            {
                "ours": lambda: trace_ours(model, tokenizer, texts, Path(folder), args.batch_size, args.rows_per_group),
                "reference": plain,
            },
            repeats,
        )
    return harness.entry(
        "capture overhead, end to end: capture_traces vs plain batched forwards", stage="capture overhead",
        ours=timings["ours"], reference=timings["reference"], unit="s", target=("ratio", "<=", 1.1),
        ours_label=f"capture_traces over {len(texts)} prompts, batch {args.batch_size}, both Parquet files",
        reference_label="the same batches through the same forward call (ramoe.routing.traces._forward), nothing kept",
        check="same encoding and forward call as capture_traces (its own helpers)",
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    repeats = harness.repeats_of(args)
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    layout = describe_moe(model)
    if layout.selection != SELECTION_SOFTMAX_TOP_K:
        # The reference recomputes top-k as softmax then top-k, the rule of OLMoE, Qwen-MoE and Mixtral.
        raise SystemExit(f"{layout.family} selects experts by {layout.selection!r}; this benchmark needs softmax_top_k.")
    items = args.items
    if items is None and args.quick:
        items = QUICK_ITEMS
    texts = load_texts(results, args.task, args.langs.split(","), items)

    entries = compare_capture(args, model, tokenizer, texts, items, repeats, layout)
    entries.append(compare_overhead_one_batch(args, model, tokenizer, texts, max(repeats, 7 if not args.quick else 2)))
    entries.append(compare_overhead_end_to_end(args, model, tokenizer, texts, repeats))
    harness.emit(entries, args.output)


if __name__ == "__main__":
    sys.exit(main())
