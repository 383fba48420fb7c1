"""Batched inference: greedy generation and multiple-choice log-likelihood scoring.

Both run through ``run_in_batches``, which halves the batch size and retries a batch that ran
out of device memory, so one ``evaluation.batch_size`` can serve models of very different sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def halve_batch_size(batch_size: int, error: torch.OutOfMemoryError, where: str) -> int:
    """Return the batch size to retry with after ``error``, or re-raise it when the batch was already 1.

    ``where`` names the work and the position of the batch for the log.
    """
    if batch_size <= 1:
        error.add_note(
            "A batch of 1 does not fit in device memory. Load the model across devices (model.device_map: auto) "
            "or in a smaller dtype (model.dtype: bfloat16)."
        )
        raise error
    smaller = batch_size // 2
    log.warning("out of memory on a batch of %d (%s); retrying with batch size %d", batch_size, where, smaller)
    return smaller


def release_cached_memory() -> None:
    """Return the blocks that the failed batch left in PyTorch's CUDA cache to the device."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_in_batches(
    process_batch: Callable[[list[Item]], list[Result]],
    items: Sequence[Item],
    *,
    batch_size: int,
    desc: str,
) -> list[Result]:
    """Apply ``process_batch`` to consecutive batches of ``items`` and concatenate its results in order.

    A batch that raises ``torch.OutOfMemoryError`` is retried at half the size, down to 1, and
    the smaller size is kept for the remaining batches. ``process_batch`` must return one result
    per item and must not keep state from a failed call.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    results: list[Result] = []
    start = 0
    size = batch_size
    with tqdm(total=len(items), desc=desc, unit="item", mininterval=5.0) as progress:
        while start < len(items):
            batch = list(items[start : start + size])
            try:
                batch_results = process_batch(batch)
            except torch.OutOfMemoryError as error:
                size = halve_batch_size(size, error, f"{desc}, items {start}-{start + len(batch) - 1}")
                batch_results = None
            if batch_results is None:
                # Outside the except block the failed call's tensors are no longer referenced.
                release_cached_memory()
                continue
            results.extend(batch_results)
            start += len(batch)
            progress.update(len(batch))
    if size < batch_size:
        log.warning("%s ran with batch size %d instead of %d after running out of memory; set that batch size "
                    "in the config to skip the failed attempts", desc, size, batch_size)
    return results


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the token ids that end a generated reply: the tokenizer's EOS and the model's own.

    A chat model can end a turn with a token other than the tokenizer's EOS (Phi-3.5's chat
    template closes each message with ``<|end|>``) and list it in its generation config's
    ``eos_token_id``. Without that token a reply would run on past its end until
    ``max_new_tokens``.
    """
    # NOTE: not checked against the generation configs of the preset models (no hub access here).
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        for token_id in source if isinstance(source, (list, tuple)) else [source]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return ids


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
    extends all rows. The new tokens are decoded without special tokens. A row stops at any of
    ``stop_token_ids``.
    """
    tokenizer.padding_side = "left"
    stop_ids = stop_token_ids(model, tokenizer)

    def generate_batch(batch: list[str]) -> list[str]:
        encoded = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids,
        )
        new_tokens = generated[:, encoded["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    return run_in_batches(generate_batch, prompts, batch_size=batch_size, desc=desc)


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
    pad_id = tokenizer.pad_token_id

    def score_batch(chunk: list[tuple[str, str]]) -> list[float]:
        scores: list[float] = []
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
        return scores

    scores = run_in_batches(score_batch, pairs, batch_size=batch_size, desc=desc)
    out: list[list[float]] = []
    index = 0
    for options in choices:
        out.append(scores[index : index + len(options)])
        index += len(options)
    return out
