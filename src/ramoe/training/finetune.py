"""Supervised fine-tuning of an MoE model on one task in one target language: SFT, RA-MoE and RISE.

One loop serves the three trained methods:

* ``sft``: causal-LM loss on the completion (the prompt is masked out of the loss);
* ``ramoe``: the same loss plus ``lambda`` times the routing alignment loss, averaged over the
  *ci* examples of the batch. The student routing is the target-language sequence's routing in
  this forward pass, taken by router hooks that keep the graph. The English teacher routing
  comes from the frozen base model's English sequence trace, which the ``trace`` rule computes once;
* ``rise``: the causal-LM loss with only RISE's selected expert slices trainable.

``lambda = 0`` turns RA-MoE into SFT through the same code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ramoe.io import atomic_path, run_metadata
from ramoe.prompts import format_prompts
from ramoe.routing.adapters import MoELayout, describe_moe
from ramoe.routing.capture import RouterCapture
from ramoe.routing.traces import read_sequence_trace, trace_texts
from ramoe.training.alignment import aligned_layers, alignment_loss, sequence_routing
from ramoe.training.pretrain import get_lr, set_seed
from ramoe.training.resume import TrainingState, fingerprint, restore_rng, result_settings, rng_state, tensor_summary

log = logging.getLogger(__name__)

METHODS = ("sft", "ramoe", "rise")
TRAINABLE_SETS = ("all", "moe", "routers", "lora")
IGNORE_INDEX = -100  # label of tokens outside the loss (prompt and padding)


@dataclass(frozen=True)
class TrainExample:
    """One tokenized training sequence: ``<bos> prompt completion <eos>``."""

    item_id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt, the token ids on the completion and EOS
    span: int  # leading tokens whose routing the alignment loss averages (same text as the trace)
    is_ci: bool


def build_examples(
    rows: Sequence[Mapping],
    tokenizer: PreTrainedTokenizerBase,
    *,
    ci_items: set[str],
    span_text: str = "prompt",
    max_span: int | None = None,
    chat_template: bool = False,
    chat_template_kwargs: Mapping | None = None,
) -> list[TrainExample]:
    """Tokenize parallel-schema rows for SFT.

    The completion is the text the trace rule appends in ``solved`` mode: the gold answer after a
    space for generative tasks, the correct choice for multiple choice. ``span_text`` is
    ``routing.text``: the alignment span covers exactly the tokens the English teacher trace
    averaged (the prompt, or prompt and answer), cut at ``max_span`` (``routing.max_length``).
    With ``chat_template`` the prompt is wrapped in the tokenizer's chat template, as in
    evaluation and tracing.
    """
    chat = {"chat_template": chat_template, "chat_template_kwargs": chat_template_kwargs}
    prompts = format_prompts(tokenizer, [row["prompt"] for row in rows], **chat)
    solved = [text for _, _, text in trace_texts(rows, "solved", tokenizer=tokenizer, **chat)]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer([s[len(p):] for s, p in zip(solved, prompts, strict=True)],
                               add_special_tokens=False)["input_ids"]
    if span_text == "solved":
        span_lengths = [len(ids) for ids in tokenizer(solved, add_special_tokens=True)["input_ids"]]
    else:
        span_lengths = [len(ids) for ids in prompt_ids]
    examples = []
    for row, prompt, completion, span in zip(rows, prompt_ids, completion_ids, span_lengths, strict=True):
        if not completion:
            raise ValueError(f"item {row['item_id']!r} ({row['lang']!r}): the gold answer encodes to no tokens. Check its answer field.")
        completion = [*completion, tokenizer.eos_token_id]
        span = min(span, len(prompt) + len(completion) - 1)
        if max_span is not None:
            span = min(span, max_span)
        examples.append(
            TrainExample(
                item_id=row["item_id"],
                input_ids=[*prompt, *completion],
                labels=[IGNORE_INDEX] * len(prompt) + completion,
                span=span,
                is_ci=row["item_id"] in ci_items,
            )
        )
    return examples


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels and span_mask, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    span_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
        span_mask[row, : example.span] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "span_mask": span_mask}


class RoutingAligner:
    """Computes the RA-MoE alignment term of a batch from captured router logits.

    ``teacher`` maps an item id to its English routing, {layer: (E,) float32}, for the layers the
    loss averages. Only the batch rows flagged ``is_ci`` that have a teacher enter the loss.
    """

    def __init__(
        self,
        teacher: Mapping[str, Mapping[int, torch.Tensor]],
        experts_by_layer: Mapping[int, Sequence[int]],
        layers: Sequence[int],
        *,
        loss: str,
        beta: float,
        eps: float,
    ):
        self.teacher = teacher
        self.experts_by_layer = experts_by_layer
        self.layers = list(layers)
        self.loss = loss
        self.beta = beta
        self.eps = eps

    def __call__(self, capture: RouterCapture, examples: Sequence[TrainExample], span_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean alignment loss over the batch's ci rows (a 0-d tensor, 0 without ci rows) and their count."""
        rows = [i for i, e in enumerate(examples) if e.is_ci and e.item_id in self.teacher]
        if not rows:
            return torch.zeros((), device=span_mask.device), 0
        device = span_mask.device
        index = torch.tensor(rows, device=device)
        student, teacher = {}, {}
        for layer in self.layers:
            per_sequence = sequence_routing(capture.probabilities(layer), span_mask)  # (B, E)
            student[layer] = per_sequence.index_select(0, index)
            teacher[layer] = torch.stack([self.teacher[examples[i].item_id][layer] for i in rows]).to(device)
        per_row = alignment_loss(student, teacher, self.experts_by_layer, self.layers, loss=self.loss, beta=self.beta,
                                 eps=self.eps)
        return per_row.mean(), len(rows)


def load_teacher(trace_path: str | Path, item_ids: set[str], layers: Sequence[int]) -> dict[str, dict[int, torch.Tensor]]:
    """English routing per item from a sequence trace: {item_id: {layer: (E,) float32}} for ``item_ids``."""
    frame = read_sequence_trace(trace_path).filter(
        (pl.col("lang") == "en") & pl.col("item_id").is_in(sorted(item_ids)) & pl.col("layer").is_in(list(layers))
    )
    teacher: dict[str, dict[int, torch.Tensor]] = {}
    for item_id, layer, probs in frame.select("item_id", "layer", "probs").iter_rows():
        teacher.setdefault(item_id, {})[int(layer)] = torch.tensor(probs, dtype=torch.float32)
    complete = {item: by_layer for item, by_layer in teacher.items() if all(layer in by_layer for layer in layers)}
    missing = sorted(item_ids - set(complete))
    if missing:
        log.warning(
            "%d ci items have no English teacher routing in %s (e.g. %s); they are trained with the SFT loss only. "
            "Trace every train item (routing.max_items: null, routing.split: train) to align them too.",
            len(missing), trace_path, missing[:5],
        )
    return complete


def set_trainable(model: PreTrainedModel, layout: MoELayout, which: str,
                  lora: Mapping | None = None) -> list[torch.nn.Parameter]:
    """Freeze every parameter outside the chosen set and return the trainable ones.

    ``all``: every parameter; ``moe``: routers and the MoE blocks' expert tensors; ``routers``:
    routers only. ``lora`` injects LoRA adapters in place, with the ``finetune.lora`` options
    passed as ``lora``, and freezes every base weight (see ramoe.training.lora).
    """
    if which not in TRAINABLE_SETS:
        raise ValueError(f"finetune.trainable {which!r} is not one of {TRAINABLE_SETS}.")
    if which == "lora":
        if lora is None:
            raise ValueError("finetune.trainable is 'lora' but no finetune.lora options were passed.")
        from ramoe.training.lora import add_lora  # imports peft only when LoRA is used

        return add_lora(model, layout, lora)
    router_names = set(layout.router_modules.values())
    moe_blocks = {name.rsplit(".", 1)[0] for name in router_names}  # e.g. model.layers.3.mlp
    trainable = []
    for name, parameter in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        in_router = module in router_names
        in_experts = any(module.startswith(block + ".experts") for block in moe_blocks)
        keep = which == "all" or in_router or (which == "moe" and in_experts)
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(parameter)
    return trainable


def make_optimizer(parameters: Sequence[torch.nn.Parameter], settings: Mapping,
                   no_decay: Sequence[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW over ``parameters``; those in ``no_decay`` get no weight decay (RISE's masked expert tensors)."""
    no_decay_ids = {id(p) for p in no_decay}
    groups = [
        {"params": [p for p in parameters if id(p) not in no_decay_ids], "weight_decay": settings["weight_decay"]},
        {"params": [p for p in parameters if id(p) in no_decay_ids], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=settings["lr"], betas=(0.9, 0.999))


def training_step(
    model: PreTrainedModel,
    batch_examples: Sequence[TrainExample],
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[torch.nn.Parameter],
    *,
    grad_clip: float,
    capture: RouterCapture | None = None,
    aligner: RoutingAligner | None = None,
    align_weight: float = 0.0,
    step: int = 0,
) -> tuple[float, float, int]:
    """Run one optimizer step and return (LM loss, alignment loss, ci rows aligned).

    With an aligner, the router hooks of ``capture`` record this forward's logits with their
    graph, so the alignment term backpropagates into the routers and everything below them.
    """
    # NOTE: fine-tuning adds no load-balancing loss (output_router_logits stays off), for every
    # method alike; pretraining used one with coefficient model.pretrain.architecture.router_aux_loss_coef.
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    if aligner is not None:
        capture.clear()
        with capture:
            out = model(**inputs)
        align, ci_rows = aligner(capture, batch_examples, batch["span_mask"])
    else:
        out = model(**inputs)
        align, ci_rows = torch.zeros((), device=out.loss.device), 0
    loss = out.loss + align_weight * align
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss at step {step + 1} (lm {out.loss.item():.4g}, alignment {align.item():.4g}); "
            f"batch items {[e.item_id for e in batch_examples]}. Lower finetune.lr or check these items."
        )
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss.detach()), float(align.detach()), ci_rows


def train(
    model: PreTrainedModel,
    examples: Sequence[TrainExample],
    settings: Mapping,
    *,
    seed: int,
    pad_id: int,
    parameters: Sequence[torch.nn.Parameter],
    no_decay: Sequence[torch.nn.Parameter] = (),
    aligner: RoutingAligner | None = None,
    align_weight: float = 0.0,
    metrics_path: str | Path | None = None,
    desc: str = "finetune",
    resume_dir: str | Path | None = None,
) -> list[dict]:
    """Fine-tune ``parameters`` for ``settings['epochs']`` epochs and return the logged metric records.

    Loss per step: the causal-LM loss of the batch (mean over completion tokens) plus
    ``align_weight`` times the aligner's mean over the batch's ci rows. Batches are drawn in a
    seeded random order each epoch. A non-finite loss stops training with the step and the
    batch's item ids.

    With ``resume_dir``, the training state (trained parameters, optimizer, step, RNG states,
    batch order, metrics) is saved there every ``settings['save_every']`` steps (absent or None:
    never). A state found there from an interrupted run with the same settings, examples and
    initial weights is resumed from, and the folder is removed when training ends. The frozen
    parameters are not saved, so the caller must load the same base model again.
    """
    set_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batch_size = settings["batch_size"]
    total_steps = settings["epochs"] * math.ceil(len(examples) / batch_size)
    warmup = round(settings["warmup_ratio"] * total_steps)
    optimizer = make_optimizer(parameters, settings, no_decay)
    capture = RouterCapture(model, keep_graph=True) if aligner is not None else None

    names: list[str] = []
    run_fingerprint = ""
    if resume_dir is not None:
        names = _parameter_names(model, parameters)
        run_fingerprint = _run_fingerprint(model, examples, settings, seed=seed, pad_id=pad_id, names=names,
                                           no_decay=_parameter_names(model, no_decay), aligner=aligner,
                                           align_weight=align_weight)
    checkpointer = TrainingState(resume_dir, settings.get("save_every"), run_fingerprint)

    # resume: trained parameters, optimizer, RNG states and metrics replace the fresh ones
    records: list[dict] = []
    window = _empty_window()
    step = 0
    state = checkpointer.load()
    if state is not None:
        with torch.no_grad():
            for name, parameter in zip(names, parameters, strict=True):
                parameter.copy_(state["parameters"][name])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], generator)
        records, window, step = state["records"], state["window"], state["step"]

    metrics_file = Path(metrics_path).open("w", encoding="utf-8") if metrics_path else None
    if metrics_file is not None:
        for record in records:
            metrics_file.write(json.dumps(record) + "\n")
    t_window = time.perf_counter()
    model.train()
    progress = tqdm(total=total_steps, initial=step, desc=desc, unit="step", mininterval=5.0)
    try:
        first_epoch = state["epoch"] if state is not None else 0
        for epoch in range(first_epoch, settings["epochs"]):
            # the batch order: drawn fresh, or the interrupted epoch's order from its next batch on
            if state is not None and epoch == first_epoch:
                order, first_start = state["order"], state["next_start"]
            else:
                order, first_start = torch.randperm(len(examples), generator=generator).tolist(), 0
            for start in range(first_start, len(order), batch_size):
                batch_examples = [examples[i] for i in order[start : start + batch_size]]
                batch = {name: t.to(device) for name, t in collate(batch_examples, pad_id).items()}
                lr = get_lr(step, lr=settings["lr"], warmup_steps=warmup, total_steps=total_steps,
                            min_lr_ratio=settings["min_lr_ratio"])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                lm_loss, align_loss, ci_rows = training_step(
                    model, batch_examples, batch, optimizer, parameters, grad_clip=settings["grad_clip"],
                    capture=capture, aligner=aligner, align_weight=align_weight, step=step,
                )
                step += 1
                progress.update(1)

                # log the means over the window
                window["lm_loss"] += lm_loss
                window["align_loss"] += align_loss
                window["ci_rows"] += ci_rows
                window["steps"] += 1
                window["tokens"] += int(batch["attention_mask"].sum())
                if step % settings["log_every"] == 0 or step == total_steps:
                    elapsed = time.perf_counter() - t_window
                    record = {
                        "step": step,
                        "lm_loss": window["lm_loss"] / window["steps"],
                        "align_loss": window["align_loss"] / window["steps"],
                        "ci_rows": window["ci_rows"],
                        "lr": lr,
                        "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                    }
                    records.append(record)
                    if metrics_file is not None:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    log.info("step %d/%d  lm_loss %.4f  align_loss %.4f  ci rows %d  lr %.2e  %.0f tok/s", step,
                             total_steps, record["lm_loss"], record["align_loss"], record["ci_rows"], lr,
                             record["tokens_per_s"])
                    window = _empty_window()
                    t_window = time.perf_counter()

                # save the state to resume from
                if checkpointer.due(step, total_steps):
                    checkpointer.save({
                        "step": step,
                        "epoch": epoch,
                        "order": order,
                        "next_start": start + batch_size,
                        "parameters": {name: p.detach() for name, p in zip(names, parameters, strict=True)},
                        "optimizer": optimizer.state_dict(),
                        "rng": rng_state(generator),
                        "records": records,
                        "window": window,
                    })
    finally:
        progress.close()
        if metrics_file is not None:
            metrics_file.close()
    checkpointer.discard()
    model.eval()
    return records


def _empty_window() -> dict:
    return {"lm_loss": 0.0, "align_loss": 0.0, "ci_rows": 0, "steps": 0, "tokens": 0}


def _parameter_names(model: PreTrainedModel, parameters: Sequence[torch.nn.Parameter]) -> list[str]:
    """Names of ``parameters`` in ``model``, which a saved training state is keyed by."""
    by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    missing = [i for i, parameter in enumerate(parameters) if id(parameter) not in by_id]
    if missing:
        raise ValueError(
            f"trainable parameters at positions {missing[:5]} are not parameters of {type(model).__name__}, so "
            "their training state cannot be saved. Pass the model's own parameters, or resume_dir=None."
        )
    return [by_id[id(parameter)] for parameter in parameters]


def _run_fingerprint(
    model: PreTrainedModel,
    examples: Sequence[TrainExample],
    settings: Mapping,
    *,
    seed: int,
    pad_id: int,
    names: Sequence[str],
    no_decay: Sequence[str],
    aligner: RoutingAligner | None,
    align_weight: float,
) -> str:
    """Fingerprint everything that decides a fine-tuning result, so a stale resume state is never used."""
    example_rows = [[e.item_id, e.input_ids, e.labels, e.span, e.is_ci] for e in examples]
    alignment = None
    if aligner is not None:
        teacher = ((f"{item}/{layer}", probs) for item, by_layer in sorted(aligner.teacher.items())
                   for layer, probs in sorted(by_layer.items()))
        alignment = {
            "layers": aligner.layers,
            "experts": {str(layer): list(ids) for layer, ids in sorted(aligner.experts_by_layer.items())},
            "loss": aligner.loss,
            "beta": aligner.beta,
            "eps": aligner.eps,
            "teacher": tensor_summary(teacher),
        }
    return fingerprint(
        settings=result_settings(settings),
        seed=seed,
        pad_id=pad_id,
        examples=hashlib.sha256(json.dumps(example_rows).encode("utf-8")).hexdigest(),
        trainable=list(names),
        no_decay=list(no_decay),
        initial_weights=tensor_summary(model.named_parameters()),
        alignment=alignment,
        align_weight=align_weight,
    )


def read_ci_items(categories_path: str | Path, lang: str) -> set[str]:
    """Item ids whose category in ``lang`` is ci (English correct, target incorrect)."""
    frame = pl.read_parquet(categories_path)
    langs = set(frame["lang"].unique().to_list())
    if lang not in langs:
        raise ValueError(f"{categories_path} has no categories for language {lang!r}; it has {sorted(langs)}.")
    rows = frame.filter((pl.col("lang") == lang) & (pl.col("category") == "ci"))
    return set(rows["item_id"].to_list())


def read_expert_mask(path: str | Path) -> tuple[dict[int, list[int]], tuple[int, int]]:
    """Task experts per layer and the alignment zone (first, last layer) from an expert-mask JSON."""
    mask = json.loads(Path(path).read_text(encoding="utf-8"))
    experts = {int(layer): list(ids) for layer, ids in mask["layers"].items()}
    zone = (int(mask["zone"]["first_layer"]), int(mask["zone"]["last_layer"]))
    return experts, zone


def describe_trainable(model: PreTrainedModel, parameters: Sequence[torch.nn.Parameter]) -> str:
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in parameters)
    return f"{trained / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({100 * trained / total:.1f}%)"
