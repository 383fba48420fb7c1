"""Pretrain a tiny MoE language model on a text mixture and save a Hugging Face checkpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from ramoe.io import atomic_path, run_metadata
from ramoe.models.build import tiny_moe_config
from ramoe.training.resume import (
    TrainingState,
    fingerprint,
    restore_rng,
    result_settings,
    resume_folder,
    rng_state,
    tensor_summary,
)

log = logging.getLogger(__name__)


def pack_lines(tokenizer: PreTrainedTokenizerFast, lines: Sequence[str]) -> torch.Tensor:
    """Encode lines as ``<bos> line <eos>`` and concatenate them into one token stream (1-D, int64)."""
    encoded = tokenizer(list(lines), add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    stream = [token for ids in encoded for token in (*ids, eos)]
    return torch.tensor(stream, dtype=torch.long)


def get_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Sample ``batch_size`` random windows of ``seq_len`` tokens: (B, T)."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def get_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    # 1) warm-up
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    # 2) cosine decay over the remaining steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def parameter_groups(model: torch.nn.Module, router_lr_multiplier: float) -> list[dict]:
    """Split parameters into router weights and the rest, so routers can get a larger learning rate.

    Each group's ``lr_scale`` multiplies the scheduled learning rate. Small routers stay close to
    uniform for thousands of steps at the base rate; a larger rate lets them specialise.
    """
    from ramoe.routing.adapters import describe_moe

    router_names = set(describe_moe(model).router_modules.values())
    routers, others = [], []
    for name, parameter in model.named_parameters():
        (routers if name.rsplit(".", 1)[0] in router_names else others).append(parameter)
    return [
        {"params": others, "lr_scale": 1.0},
        {"params": routers, "lr_scale": router_lr_multiplier},
    ]


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pretrain(
    lines: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    settings: Mapping,
    output_dir: str | Path,
    *,
    threads: int = 1,
    provenance: Mapping | None = None,
) -> dict:
    """Pretrain a tiny MoE from scratch for ``settings['steps']`` steps and save it with its tokenizer.

    ``settings`` is the ``model.pretrain`` config section. The step count is fixed rather than a
    wall-time budget, so the result does not depend on the machine's load. The folder is written
    atomically and contains the checkpoint, the tokenizer, ``metrics.jsonl`` (one record per log
    interval) and ``pretrain_config.json`` (the resolved settings, seed and package versions).

    Every ``settings['save_every']`` steps (absent or None: never) the training state goes to
    ``<output_dir>.resume/``, and a run that finds a state there from the same settings, corpus
    and tokenizer continues from it (see ``ramoe.training.resume``). The folder is removed once
    the checkpoint is in place. Returns the last logged metrics.
    """
    torch.set_num_threads(threads)
    set_seed(settings["seed"])
    model, config = _build_model(tokenizer, settings["architecture"])
    n_params = sum(p.numel() for p in model.parameters())

    stream = pack_lines(tokenizer, lines)
    seq_len, batch_size, steps = settings["seq_len"], settings["batch_size"], settings["steps"]
    if len(stream) <= seq_len:
        raise ValueError(f"the pretraining text has {len(stream)} tokens, fewer than seq_len={seq_len}.")
    log.info("pretraining stream: %d tokens; %d steps of %d x %d tokens", len(stream), steps, batch_size, seq_len)

    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.get("router_lr_multiplier", 1.0)),
        lr=settings["lr"],
        betas=(0.9, 0.95),
        weight_decay=settings["weight_decay"],
    )
    generator = torch.Generator().manual_seed(settings["seed"])
    aux_coef = config.router_aux_loss_coef
    checkpointer = TrainingState(resume_folder(output_dir), settings.get("save_every"),
                                 _run_fingerprint(settings, tokenizer, stream, model))

    # resume: weights, optimizer, RNG states and the metrics so far replace the fresh ones
    records: list[dict] = []
    window = {"lm_loss": 0.0, "aux_loss": 0.0, "steps": 0}
    first_step = 0
    state = checkpointer.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], generator)
        records, window, first_step = state["records"], state["window"], state["step"]

    with atomic_path(output_dir) as tmp_dir:
        tmp_dir.mkdir(parents=True)
        metrics_file = (tmp_dir / "metrics.jsonl").open("w", encoding="utf-8")
        for record in records:
            metrics_file.write(json.dumps(record) + "\n")
        t_window = time.perf_counter()
        model.train()
        for step in tqdm(range(first_step, steps), desc="pretrain", unit="step", mininterval=5.0, initial=first_step,
                         total=steps):
            # set the learning rate
            lr = get_lr(step, lr=settings["lr"], warmup_steps=settings["warmup_steps"], total_steps=steps,
                        min_lr_ratio=settings["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]

            # forward and backward: transformers adds aux_coef * load-balancing loss to the returned
            # loss only when router logits are requested
            batch = get_batch(stream, batch_size, seq_len, generator)  # (B, T)
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            out.loss.backward()

            # clip and step
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # log the means over the window
            aux = float(out.aux_loss.detach()) if out.aux_loss is not None else 0.0
            window["lm_loss"] += float(out.loss.detach()) - aux_coef * aux
            window["aux_loss"] += aux
            window["steps"] += 1
            if (step + 1) % settings["log_every"] == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - t_window
                record = {
                    "step": step + 1,
                    "lm_loss": window["lm_loss"] / window["steps"],
                    "aux_loss": window["aux_loss"] / window["steps"],
                    "lr": lr,
                    "tokens_per_s": window["steps"] * batch_size * seq_len / elapsed,
                }
                records.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                log.info("step %d/%d  lm_loss %.4f  aux_loss %.4f  lr %.2e  %.0f tok/s", record["step"], steps,
                         record["lm_loss"], record["aux_loss"], lr, record["tokens_per_s"])
                window = {"lm_loss": 0.0, "aux_loss": 0.0, "steps": 0}
                t_window = time.perf_counter()

            # save the state to resume from
            if checkpointer.due(step + 1, steps):
                checkpointer.save({
                    "step": step + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(generator),
                    "records": records,
                    "window": window,
                })
        metrics_file.close()

        model.eval()
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        # Execution keys stay out of the record, because its bytes enter the model revision hash
        # of every later output, which must not change with how often the run saved.
        record = run_metadata(seed=settings["seed"], settings=result_settings(settings), parameters=n_params,
                              **(dict(provenance) if provenance else {}))
        (tmp_dir / "pretrain_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    checkpointer.discard()
    log.info("saved checkpoint to %s", output_dir)
    return records[-1] if records else {}


def _run_fingerprint(settings: Mapping, tokenizer: PreTrainedTokenizerFast, stream: torch.Tensor,
                     model: PreTrainedModel) -> str:
    """Fingerprint what decides a pretraining result, so a stale resume state is never used."""
    return fingerprint(
        settings=result_settings(settings),
        vocabulary=sorted(tokenizer.get_vocab().items()),
        stream=hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
        initial_weights=tensor_summary(model.state_dict().items()),
    )


def _build_model(tokenizer: PreTrainedTokenizerFast, arch: Mapping) -> tuple[PreTrainedModel, PretrainedConfig]:
    """Build the tiny MoE of the ``architecture`` section with fresh weights from the global torch RNG."""
    config = tiny_moe_config(
        arch,
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    log.info("model %s: %.2fM parameters, %d layers, %d experts, top-%d", config.model_type,
             sum(p.numel() for p in model.parameters()) / 1e6, arch["num_layers"], arch["num_experts"], arch["top_k"])
    return model, config


def pretrain_from_corpus(
    corpus_path: str | Path,
    settings: Mapping,
    output_dir: str | Path,
    *,
    task_paths: Sequence[str | Path] = (),
    threads: int = 1,
) -> dict:
    """Build the tokenizer, then pretrain on the corpus (the ``pretrain`` rule).

    A word-level vocabulary covers the corpus and every prompt and choice of ``task_paths``, so
    that no evaluation word maps to ``<unk>``.
    """
    from ramoe.data.schema import read_parallel
    from ramoe.models.tokenizer import build_byte_tokenizer, build_word_tokenizer

    lines = Path(corpus_path).read_text(encoding="utf-8").splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"pretraining corpus {corpus_path} is empty.")
    kind = settings["tokenizer"]["kind"]
    if kind == "word":
        vocabulary = {word for line in lines for word in line.split()}
        for path in task_paths:
            for row in read_parallel(path).select(["prompt", "choices"]).to_pylist():
                vocabulary.update(row["prompt"].split())
                vocabulary.update(word for choice in row["choices"] for word in choice.split())
        tokenizer = build_word_tokenizer(sorted(vocabulary))
    elif kind == "byte":
        tokenizer = build_byte_tokenizer(lines, settings["tokenizer"]["vocab_size"])
    else:
        raise ValueError(f"model.pretrain.tokenizer.kind {kind!r} is not 'word' or 'byte'.")
    return pretrain(lines, tokenizer, settings, output_dir, threads=threads, provenance={"corpus": str(corpus_path)})
