"""Benchmark batched evaluation against one call per item.

Comparisons (each checks first that both sides give the same result):

* generation: ``generate_greedy`` (batches with left padding and the KV cache) against one greedy
  ``model.generate`` call per prompt with the same ``max_new_tokens``. The decoded outputs must be
  identical.
* multiple-choice scoring: ``score_choices`` (batches of prompt-choice pairs, one forward each)
  against one forward per prompt-choice pair. The log-likelihoods must agree within 1e-4 nats and
  pick the same choice.

The workload is one evaluate_base job: every item (train and test) of a task in one language.

Usage: python bench/evaluation.py [--results results] [--lang xd] [--items N] [--repeats 5] [--quick]
                                  [--output FILE]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import harness
from ramoe.data.schema import read_parallel
from ramoe.evaluation.inference import generate_greedy, score_choices
from ramoe.models.loading import load_model

STAGE = "evaluation"
QUICK_ITEMS = 24
# Batched and single forwards sum in another order; their log-likelihoods differ by about 1e-6 nats.
SCORE_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None):
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--generative-task", default="arith", help="generative task (default: arith)")
    parser.add_argument("--choice-task", default="cause", help="multiple-choice task (default: cause)")
    parser.add_argument("--lang", default="xd", help="language evaluated (default: xd)")
    parser.add_argument("--items", type=int, help="items per task (default: all of them; 24 under --quick)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of our side (default: 64, as evaluation.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=3, help="generated tokens (default: 3, as evaluation.max_new_tokens)")
    parser.add_argument(
        "--worker", choices=("generate", "score"),
        help="internal: run our side --repeats times in this process and print times and peak memory as JSON",
    )
    return parser.parse_args(argv)


def load_rows(results: Path, task: str, lang: str, items: int | None) -> list[dict]:
    rows = [row for row in read_parallel(results / "data" / f"{task}.parquet").to_pylist() if row["lang"] == lang]
    if not rows:
        raise SystemExit(f"{task} has no rows in language {lang!r}; check --lang.")
    return sorted(rows, key=lambda row: row["item_id"])[:items]


# ---------------------------------------------------------------------------------------------
# The reference: one call per item


@torch.inference_mode()
def generate_one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy-decode each prompt alone: no padding, one generate call per prompt."""
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        outputs.append(tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
    return outputs


@torch.inference_mode()
def score_one_at_a_time(model, tokenizer, prompts: list[str], choices: list[list[str]]) -> list[list[float]]:
    """Sum of the log-probabilities of each choice's tokens after its prompt, one forward per prompt-choice pair."""
    scores = []
    for prompt, options in zip(prompts, choices, strict=True):
        context = tokenizer(prompt)["input_ids"]
        row = []
        for option in options:
            continuation = tokenizer(option, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([context + continuation])).logits[0]  # (T, V)
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            # The token at position t is predicted by the logits at position t - 1.
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
            row.append(float(log_probs[positions, torch.tensor(continuation)].sum()))
        scores.append(row)
    return scores


# ---------------------------------------------------------------------------------------------
# Worker: our side once, in its own process, for its peak memory


def run_worker(args) -> None:
    """Run our side ``--repeats`` times in this process and print the times, the baseline and the peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    if args.worker == "generate":
        rows = load_rows(results, args.generative_task, args.lang, args.items)
        prompts = [row["prompt"] for row in rows]

        def work(count: int) -> None:
            generate_greedy(model, tokenizer, prompts[:count], batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens)
    else:
        rows = load_rows(results, args.choice_task, args.lang, args.items)

        def work(count: int) -> None:
            score_choices(model, tokenizer, [row["prompt"] for row in rows[:count]],
                          [row["choices"] for row in rows[:count]], batch_size=args.batch_size)

    work(1)  # warm-up, so lazily loaded kernels count in the baseline
    baseline = harness.reset_peak_rss()
    seconds = []
    for _ in range(max(args.repeats, 1)):
        start = time.perf_counter()
        work(len(rows))
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"side": args.worker, "items": len(rows), "seconds": seconds, "baseline_mib": baseline,
                      "peak_mib": harness.max_rss_mib()}))


# ---------------------------------------------------------------------------------------------
# The comparisons


def compare_generation(args, model, tokenizer, rows: list[dict], repeats: int) -> dict:
    prompts = [row["prompt"] for row in rows]

    def ours() -> list[str]:
        return generate_greedy(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)

    def reference() -> list[str]:
        return generate_one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)

    harness.check_same_texts("greedy generations", ours(), reference())
    timings = harness.time_alternating({"ours": ours, "reference": reference}, repeats, warmup=0)
    workload = f"{len(prompts)} {args.generative_task} prompts in {args.lang}, {args.max_new_tokens} new tokens"
    return harness.entry(
        "batched generation vs one prompt at a time", stage=STAGE, ours=timings["ours"],
        reference=timings["reference"], unit="s", target=("ratio", "<=", 0.2),
        ours_label=f"generate_greedy, batch {args.batch_size}, left padding, KV cache; {workload}",
        reference_label=f"model.generate per prompt, no padding; {workload}",
        check=f"all {len(prompts)} decoded outputs identical", note="target: at least 5x faster",
    )


def compare_scoring(args, model, tokenizer, rows: list[dict], repeats: int) -> dict:
    prompts = [row["prompt"] for row in rows]
    choices = [list(row["choices"]) for row in rows]

    def ours() -> list[list[float]]:
        return score_choices(model, tokenizer, prompts, choices, batch_size=args.batch_size)

    def reference() -> list[list[float]]:
        return score_one_at_a_time(model, tokenizer, prompts, choices)

    ours_scores, reference_scores = np.array(ours()), np.array(reference())
    gap = harness.check_close("choice log-likelihoods", ours_scores, reference_scores, atol=SCORE_TOLERANCE)
    picked, reference_picked = ours_scores.argmax(axis=1), reference_scores.argmax(axis=1)
    if not np.array_equal(picked, reference_picked):
        raise harness.ResultMismatch(
            f"the highest-scoring choice differs on {int((picked != reference_picked).sum())} of {len(rows)} items."
        )
    timings = harness.time_alternating({"ours": ours, "reference": reference}, repeats, warmup=0)
    pairs = sum(len(options) for options in choices)
    workload = f"{len(rows)} {args.choice_task} items in {args.lang}, {pairs} prompt-choice pairs"
    return harness.entry(
        "batched choice scoring vs one pair at a time", stage=STAGE, ours=timings["ours"],
        reference=timings["reference"], unit="s", target=("ratio", "<=", 0.2),
        ours_label=f"score_choices, batch {args.batch_size} pairs; {workload}",
        reference_label=f"one forward per prompt-choice pair; {workload}",
        check=f"log-likelihoods within {gap:.1e} nats, same choice on all {len(rows)} items",
        note="target: at least 5x faster",
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.items is None and args.quick:
        args.items = QUICK_ITEMS
    if args.worker:
        run_worker(args)
        return
    repeats = harness.repeats_of(args)
    results = Path(args.results)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    entries = [
        compare_generation(args, model, tokenizer, load_rows(results, args.generative_task, args.lang, args.items),
                           repeats),
        compare_scoring(args, model, tokenizer, load_rows(results, args.choice_task, args.lang, args.items), repeats),
    ]
    harness.emit(entries, args.output)


if __name__ == "__main__":
    sys.exit(main())
