"""Benchmark an RA-MoE training step against an SFT step and against a live-teacher RA-MoE design.

Comparisons, each of one full step (forward, backward, gradient clipping, AdamW) on the same batch:

* RA-MoE (``ramoe.training.finetune.training_step`` with the alignment term, the English teacher
  routing read once from the base model's English sequence trace) against SFT (the same step
  without it);
* RA-MoE against the reference design that needs no trace. Every step runs the English and the
  target-language batch through the model together (one concatenated forward). The teacher
  routing comes live from the English half (detached), and the LM loss covers the target half.

Before timing, the first step of each method on identical model copies must give the same LM loss
and, for both RA-MoE designs, the same alignment loss: on the base model the live English routing
equals the cached trace.

Reads a finished default run (checkpoint, categories, expert mask and English trace under
``--results``). The batch contains the train items with the most ci rows, so the alignment term
does the most work.

Usage: python bench/train_step.py [--results results] [--model tiny-olmoe] [--task arith] [--lang xd]
                                  [--batch-size 16] [--repeats 7] [--threads 1] [--quick] [--output FILE]
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

import harness
from ramoe.data.schema import read_parallel
from ramoe.models.loading import load_model
from ramoe.routing.adapters import describe_moe
from ramoe.routing.capture import RouterCapture
from ramoe.training.alignment import aligned_layers, alignment_loss, sequence_routing
from ramoe.training.finetune import (
    IGNORE_INDEX,
    RoutingAligner,
    TrainExample,
    build_examples,
    collate,
    load_teacher,
    make_optimizer,
    read_ci_items,
    read_expert_mask,
    set_trainable,
    training_step,
)

STAGE = "training step"
SETTINGS = {"lr": 3e-4, "weight_decay": 0.0}
ALIGNMENT = {"loss": "mass_split", "beta": 1.0, "eps": 1e-6}
GRAD_CLIP = 1.0
# The two RA-MoE designs reach the same loss through different batch shapes (16 rows against 32),
# so float32 sums differ in the last digits; 1e-5 nats is far below a real difference.
LOSS_TOLERANCE = 1e-5


def parse_args(argv: list[str] | None = None):
    parser = harness.base_parser(__doc__.splitlines()[0], default_repeats=7)
    parser.add_argument("--task", default="arith", help="task to train on (default: arith)")
    parser.add_argument("--lang", default="xd", help="target language (default: xd, the one with most ci items)")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size (default: 16, as finetune.batch_size)")
    return parser.parse_args(argv)


def reference_step(
    model: torch.nn.Module,
    target_examples: Sequence[TrainExample],
    english_examples: Sequence[TrainExample],
    pad_id: int,
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[torch.nn.Parameter],
    capture: RouterCapture,
    experts: Mapping[int, Sequence[int]],
    layers: Sequence[int],
    align_weight: float = 1.0,
) -> tuple[float, float, int]:
    """Run one RA-MoE step with a live English teacher: English and target batch in one forward.

    The batch is the target rows followed by their English versions (same item order). The LM loss
    covers the target rows only, and the teacher is the English rows' routing of this very forward,
    detached. Returns (LM loss, alignment loss, ci rows aligned), as ``training_step`` does.
    """
    joint = collate([*target_examples, *english_examples], pad_id)  # (2B, T), right-padded
    size = len(target_examples)
    labels = joint["labels"].clone()
    labels[size:] = IGNORE_INDEX  # the English half is only the teacher; it is not trained on
    capture.clear()
    with capture:
        output = model(input_ids=joint["input_ids"], attention_mask=joint["attention_mask"], labels=labels)

    ci_rows = torch.tensor([index for index, example in enumerate(target_examples) if example.is_ci])
    student, teacher = {}, {}
    for layer in layers:
        routing = sequence_routing(capture.probabilities(layer), joint["span_mask"])  # (2B, E)
        student[layer] = routing[:size].index_select(0, ci_rows)
        teacher[layer] = routing[size:].index_select(0, ci_rows).detach()
    align = alignment_loss(student, teacher, experts, layers, **ALIGNMENT).mean()

    loss = output.loss + align_weight * align
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(output.loss.detach()), float(align.detach()), len(ci_rows)


def select_batch(results: Path, model_name: str, task: str, lang: str, tokenizer, batch_size: int):
    """Build the target-language batch (ci rows first) and the English examples of the same items, in the same order."""
    rows = [row for row in read_parallel(results / "data" / f"{task}.parquet").to_pylist() if row["split"] == "train"]
    ci_items = read_ci_items(results / "categories" / model_name / f"{task}.parquet", lang)
    target = build_examples([row for row in rows if row["lang"] == lang], tokenizer, ci_items=ci_items)
    target.sort(key=lambda example: not example.is_ci)  # ci rows first: the batches where alignment costs most
    target = target[:batch_size]
    if not any(example.is_ci for example in target):
        raise SystemExit(f"{task}/{lang} has no ci train items, so the alignment term would never run. Pick another --lang.")
    english_rows = {row["item_id"]: row for row in rows if row["lang"] == "en"}
    english = build_examples([english_rows[example.item_id] for example in target], tokenizer, ci_items=ci_items)
    return target, english


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    repeats = harness.repeats_of(args)
    results = Path(args.results)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model({"kind": "local", "path": str(results / "models" / args.model), "dtype": "float32"})
    layout = describe_moe(model)
    target, english = select_batch(results, args.model, args.task, args.lang, tokenizer, args.batch_size)
    batch = collate(target, tokenizer.pad_token_id)

    experts, zone = read_expert_mask(results / "experts" / args.model / f"{args.task}.json")
    layers = aligned_layers(zone, experts, layout.moe_layers, ALIGNMENT["loss"])
    teacher_path = results / "traces" / args.model / args.task / "en.sequences.parquet"
    teacher = load_teacher(teacher_path, {example.item_id for example in target if example.is_ci}, layers)
    if not all(example.item_id in teacher for example in target if example.is_ci):
        raise SystemExit(f"{teacher_path} lacks some ci items of the batch; trace every train item first.")
    aligner = RoutingAligner(teacher, experts, layers, **ALIGNMENT)

    def make_runner(method: str):
        """A step function of ``method`` on its own copy of the base model and its own optimizer."""
        replica = copy.deepcopy(model).train()
        parameters = set_trainable(replica, layout, "all")
        optimizer = make_optimizer(parameters, SETTINGS)
        capture = RouterCapture(replica, keep_graph=True)
        if method == "reference":
            return lambda: reference_step(replica, target, english, tokenizer.pad_token_id, optimizer, parameters,
                                          capture, experts, layers)
        with_alignment = method == "ramoe"
        return lambda: training_step(
            replica, target, batch, optimizer, parameters, grad_clip=GRAD_CLIP,
            capture=capture if with_alignment else None, aligner=aligner if with_alignment else None,
            align_weight=1.0,
        )

    runners = {method: make_runner(method) for method in ("ramoe", "sft", "reference")}
    # The first step of every copy starts from the base model, so all must see the same loss.
    first = {method: run() for method, run in runners.items()}
    harness.check_close("LM loss, RA-MoE against SFT", first["ramoe"][0], first["sft"][0], atol=LOSS_TOLERANCE)
    harness.check_close("LM loss, RA-MoE against the live-teacher design", first["ramoe"][0], first["reference"][0],
                        atol=LOSS_TOLERANCE)
    align_gap = harness.check_close("alignment loss, cached against live English teacher", first["ramoe"][1],
                                    first["reference"][1], atol=LOSS_TOLERANCE)
    if first["ramoe"][2] != first["reference"][2]:
        raise harness.ResultMismatch(f"ci rows aligned differ: {first['ramoe'][2]} against {first['reference'][2]}.")
    check = (f"first step: LM loss {first['ramoe'][0]:.5f} nats on all three; alignment loss {first['ramoe'][1]:.5f} "
             f"nats cached and live (difference {align_gap:.1e}) over {first['ramoe'][2]} ci rows")

    timings = harness.time_alternating(runners, repeats, warmup=0)
    tokens = int(batch["attention_mask"].sum())
    workload = (f"{args.task}/{args.lang}, batch of {len(target)} ({first['ramoe'][2]} ci), {tokens} tokens, "
                f"alignment layers {layers}, {args.threads} thread(s)")
    ours_label = f"RA-MoE step, cached English teacher; {workload}"
    entries = [
        harness.entry(
            "RA-MoE step vs SFT step", stage=STAGE, ours=timings["ramoe"], reference=timings["sft"], unit="s",
            target=("ratio", "<=", 1.1), ours_label=ours_label,
            reference_label="SFT step (same code without the alignment term)", check=check,
        ),
        harness.entry(
            "RA-MoE step vs concatenated English + target step", stage=STAGE, ours=timings["ramoe"],
            reference=timings["reference"], unit="s", ours_label=ours_label,
            reference_label="one forward of the target and English batch together, live detached English teacher",
            check=check,
        ),
    ]
    harness.emit(entries, args.output)


if __name__ == "__main__":
    sys.exit(main())
