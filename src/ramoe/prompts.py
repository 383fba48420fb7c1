"""Wrap task prompts in a model's chat template, the same way for evaluation, tracing and fine-tuning.

The parallel data store plain prompts ("Question: ...\\nAnswer:"). A chat model may need them as a
user turn followed by the header of its reply. ``format_prompts`` renders that text with
``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)`` when the
``evaluation.chat_template`` setting is on, and returns the prompts unchanged otherwise. Every
stage that feeds a prompt to the model calls it, so the model gets the same text whether it is
evaluated, traced or fine-tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CHAT_KEYS = ("chat_template", "chat_template_kwargs")


def chat_options(settings: Mapping) -> dict[str, Any]:
    """Select the chat-template settings from a config mapping (evaluation settings or a model source).

    A mapping without them (an older config) means no chat template.
    """
    return {
        "chat_template": bool(settings.get("chat_template", False)),
        "chat_template_kwargs": dict(settings.get("chat_template_kwargs") or {}),
    }


def format_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    chat_template: bool = False,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Return each prompt as the model input text: unchanged, or as one user turn in the chat template.

    ``chat_template_kwargs`` are extra variables of the template, for example
    ``{"enable_thinking": False}`` for Qwen3. The rendered text ends with the header of the
    assistant's reply, so a generated answer or a scored continuation follows it directly.

    Callers tokenize the text with ``add_special_tokens=True``. When the tokenizer adds a BOS
    token itself and the template also writes one, the template's copy is removed, so the model
    sees exactly one BOS.
    """
    if not chat_template:
        return list(prompts)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"evaluation.chat_template is true, but the tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '')!r}) has no chat template. Set evaluation.chat_template: false "
            "for a base model."
        )

    extra = dict(chat_template_kwargs or {})
    bos_to_strip = _template_bos(tokenizer)
    formatted = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **extra
        )
        if bos_to_strip and text.startswith(bos_to_strip):
            text = text[len(bos_to_strip):]
        formatted.append(text)
    return formatted


def _template_bos(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Return the BOS token text when encoding with special tokens already adds it, else None."""
    bos_token, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos_token is None or bos_id is None:
        return None
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bos_token if ids[:1] == [bos_id] else None
