"""Batched inference: greedy generation and multiple-choice log-likelihood scoring."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@torch.inference_mode()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> list[str]:
    """Greedy-decode a continuation of every prompt, in batches with left padding and the KV cache.

    Left padding puts every prompt's last token at the same position, so one ``generate`` call
    extends all rows. The new tokens are decoded without special tokens.
    """
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", mininterval=5.0):
        batch = list(prompts[start : start + batch_size])
        encoded = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        outputs.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return outputs


@torch.inference_mode()
def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int,
    normalization: str = "sum",
    desc: str = "score",
) -> list[list[float]]:
    """Log-likelihood of every choice given its prompt: one list of scores per prompt.

    The prompt and the choice are tokenized separately (the prompt with special tokens, the
    choice without), so the score covers exactly the choice's tokens. ``normalization`` is
    ``sum`` (total log-probability, nats) or ``mean`` (per choice token).
    """
    if normalization not in ("sum", "mean"):
        raise ValueError(f"normalization {normalization!r} is not 'sum' or 'mean'.")
    pairs = [(p, c) for p, options in zip(prompts, choices, strict=True) for c in options]
    scores: list[float] = []
    pad_id = tokenizer.pad_token_id
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch", mininterval=5.0):
        chunk = pairs[start : start + batch_size]
        contexts = tokenizer([p for p, _ in chunk], add_special_tokens=True)["input_ids"]
        continuations = tokenizer([c for _, c in chunk], add_special_tokens=False)["input_ids"]
        sequences = [ctx + cont for ctx, cont in zip(contexts, continuations, strict=True)]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), right-padded
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for row, (ctx, cont) in enumerate(zip(contexts, continuations, strict=True)):
            if not cont:
                raise ValueError(f"choice {chunk[row][1]!r} encodes to no tokens.")
            # Token at position t is predicted by the logits at t - 1.
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
            targets = torch.tensor(cont, device=log_probs.device)
            token_scores = log_probs[row, positions, targets]
            total = float(token_scores.sum())
            scores.append(total / len(cont) if normalization == "mean" else total)
    out: list[list[float]] = []
    index = 0
    for options in choices:
        out.append(scores[index : index + len(options)])
        index += len(options)
    return out
