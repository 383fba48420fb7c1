"""Score extractive question answering (XQuAD) by exact match and token F1 after SQuAD normalisation.

The normalisation follows the official SQuAD v1.1 evaluation script, which the XQuAD authors
used for every language: lowercase, remove punctuation, remove the English articles a, an and
the, and collapse whitespace. Punctuation here is every Unicode punctuation character (category
P*) plus the ASCII symbols of ``string.punctuation``, as in the MLQA evaluation script, so that
'。', '،' and '«' are removed too.

NOTE: tokens for F1 are whitespace-separated words, as in the SQuAD script, so in languages
written without spaces (zh, th) an answer is usually one token and F1 is close to exact match.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

__all__ = ["answer_tokens", "exact_match", "extract_span_answer", "normalize_answer", "token_f1"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_punctuation(character: str) -> bool:
    return character in _ASCII_PUNCTUATION or unicodedata.category(character).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, and join the words with single spaces."""
    text = text.lower()
    text = "".join(" " if _is_punctuation(character) else character for character in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    """Split the normalised answer into whitespace-separated tokens."""
    return normalize_answer(text).split()


def exact_match(prediction: str | None, gold: str) -> bool:
    """Check whether the normalised prediction equals the normalised gold answer. None never matches."""
    if prediction is None:
        return False
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str | None, gold: str) -> float:
    """Return the harmonic mean of token precision and recall between prediction and gold (0 to 1).

    Tokens are counted with multiplicity. None scores 0. Two answers that both normalise to
    nothing score 1, so that an exact match always has F1 1.
    """
    if prediction is None:
        return 0.0
    predicted, expected = answer_tokens(prediction), answer_tokens(gold)
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def extract_span_answer(output: str) -> str | None:
    """Return the first non-empty line of a generated output, stripped, or None when the output is empty.

    A base model that has answered goes on writing the next "Question:" block, so only the first
    line is the answer. An output of only whitespace is a parse failure (None).
    """
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return None
