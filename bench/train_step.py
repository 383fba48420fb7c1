"""Time an RA-MoE training step against an SFT step on the same batches.

Usage: python bench/train_step.py [--results results] [--model tiny-olmoe] [--task arith] [--lang xd]
                                  [--batch-size 16] [--repeats 7] [--threads 1]

Reads a finished default run (checkpoint, categories, expert mask and English trace under
``--results``). Each repeat times one full step (forward, backward, clipping, AdamW) of each
method on the same batch, alternating, from identical model copies, on the batches with the most
ci rows so that the alignment term does the most work. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from ramoe.data.schema import read_parallel
from ramoe.models.loading import load_model
from ramoe.routing.adapters import describe_moe
from ramoe.routing.capture import RouterCapture
from ramoe.training.alignment import aligned_layers
from ramoe.training.finetune import (
    RoutingAligner,
    build_examples,
    collate,
    load_teacher,
    make_optimizer,
    read_ci_items,
    read_expert_mask,
    set_trainable,
    training_step,
)

SETTINGS = {"lr": 3e-4, "weight_decay": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--model", default="tiny-olmoe")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--lang", default="xd")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results = Path(args.results)

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    layout = describe_moe(model)
    rows = [r for r in read_parallel(results / "data" / f"{args.task}.parquet").to_pylist()
            if r["lang"] == args.lang and r["split"] == "train"]
    ci_items = read_ci_items(results / "categories" / args.model / f"{args.task}.parquet", args.lang)
    examples = build_examples(rows, tokenizer, ci_items=ci_items)
    examples.sort(key=lambda e: not e.is_ci)  # ci rows first: the batches where alignment costs most
    batch_examples = examples[: args.batch_size]
    batch = collate(batch_examples, tokenizer.pad_token_id)

    experts, zone = read_expert_mask(results / "experts" / args.model / f"{args.task}.json")
    layers = aligned_layers(zone, experts, layout.moe_layers, "mass_split")
    teacher_path = results / "traces" / args.model / args.task / "en.sequences.parquet"
    teacher = load_teacher(teacher_path, {e.item_id for e in batch_examples if e.is_ci}, layers)
    aligner = RoutingAligner(teacher, experts, layers, loss="mass_split", beta=1.0, eps=1e-6)

    def make_runner(with_alignment: bool):
        copy_ = copy.deepcopy(model).train()
        parameters = set_trainable(copy_, layout, "all")
        optimizer = make_optimizer(parameters, SETTINGS)
        capture = RouterCapture(copy_, keep_graph=True) if with_alignment else None

        def run() -> None:
            training_step(copy_, batch_examples, batch, optimizer, parameters, grad_clip=1.0, capture=capture,
                          aligner=aligner if with_alignment else None, align_weight=1.0)

        return run

    runners = {"sft": make_runner(False), "ramoe": make_runner(True)}
    timings: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    n_ci = sum(e.is_ci for e in batch_examples)
    print(f"{args.task}/{args.lang}: batch of {len(batch_examples)} ({n_ci} ci, {len(teacher)} with a teacher), "
          f"{int(batch['attention_mask'].sum())} tokens, alignment layers {layers}, repeats {args.repeats}, "
          f"threads {args.threads}")
    for name, values in timings.items():
        print(f"{name:6s} step: median {statistics.median(values) * 1e3:.1f} ms "
              f"(min {min(values) * 1e3:.1f}, max {max(values) * 1e3:.1f})")
    ratio = statistics.median(timings["ramoe"]) / statistics.median(timings["sft"])
    print(f"ratio ramoe / sft: {ratio:.3f}")


if __name__ == "__main__":
    main()
