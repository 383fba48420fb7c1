"""Evaluate a model on parallel examples and label every (item, language) correct or incorrect."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import polars as pl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ramoe.evaluation.extract import extract_number, numbers_equal
from ramoe.evaluation.inference import generate_greedy, score_choices
from ramoe.evaluation.qa import exact_match, extract_span_answer, token_f1
from ramoe.prompts import chat_options, format_prompts

log = logging.getLogger(__name__)

EXAMPLE_COLUMNS = {
    "model": pl.String,
    "method": pl.String,
    "seed": pl.Int64,
    "task": pl.String,
    "lang": pl.String,
    "split": pl.String,
    "item_id": pl.String,
    "prompt": pl.String,
    "raw_output": pl.String,
    "parsed_answer": pl.String,
    "gold": pl.String,
    "parse_failure": pl.Boolean,
    "correct": pl.Boolean,
    "choice_scores": pl.List(pl.Float64),
    # Token F1 for span-answer tasks (XQuAD) and null for every other task. Every task has the
    # column, so that per-example frames of different tasks concatenate.
    "score": pl.Float64,
}

# Generative tasks whose gold answer is a text span, scored by SQuAD exact match (``correct``) and
# token F1 (``score``). Every other generative task has a numeric answer.
SPAN_ANSWER_TASKS = frozenset({"xquad"})


def evaluate_generative(model, tokenizer, rows: Sequence[Mapping], settings: Mapping) -> list[dict]:
    """Greedy-generate an answer per row and score it (see ``score_generated``)."""
    prompts = format_prompts(tokenizer, [r["prompt"] for r in rows], **chat_options(settings))
    outputs = generate_greedy(
        model,
        tokenizer,
        prompts,
        batch_size=settings["batch_size"],
        max_new_tokens=settings["max_new_tokens"],
    )
    return [
        {"prompt": prompt, **score_generated(row, output)}
        for row, prompt, output in zip(rows, prompts, outputs, strict=True)
    ]


def score_generated(row: Mapping, output: str) -> dict:
    """Parse and score one generated output against the row's gold answer.

    Span-answer tasks (``SPAN_ANSWER_TASKS``) take the first non-empty line as the answer:
    ``correct`` is exact match after SQuAD normalisation and ``score`` the token F1. Other tasks
    extract a number: ``correct`` is numeric equality and ``score`` is null. An empty output, or
    one without a number, is a parse failure.
    """
    if row["task"] in SPAN_ANSWER_TASKS:
        parsed = extract_span_answer(output)
        correct = exact_match(parsed, row["answer"])
        score = token_f1(parsed, row["answer"])
    else:
        parsed = extract_number(output, row["lang"])
        correct = numbers_equal(parsed, row["answer"], "en")
        score = None
    return {
        "raw_output": output,
        "parsed_answer": parsed,
        "parse_failure": parsed is None,
        "correct": correct,
        "choice_scores": [],
        "score": score,
    }


def evaluate_multiple_choice(model, tokenizer, rows: Sequence[Mapping], settings: Mapping) -> list[dict]:
    """Pick the choice with the highest log-likelihood; ties and non-finite scores are parse failures."""
    prompts = format_prompts(tokenizer, [r["prompt"] for r in rows], **chat_options(settings))
    scores = score_choices(
        model,
        tokenizer,
        prompts,
        [r["choices"] for r in rows],
        batch_size=settings["batch_size"],
        normalization=settings["choice_normalization"],
    )
    results = []
    for row, prompt, choice_scores in zip(rows, prompts, scores, strict=True):
        best = max(choice_scores)
        finite = all(s == s and abs(s) != float("inf") for s in choice_scores)
        unique = choice_scores.count(best) == 1
        parsed = str(choice_scores.index(best)) if finite and unique else None
        results.append(
            {
                "prompt": prompt,
                "raw_output": row["choices"][choice_scores.index(best)] if parsed is not None else "",
                "parsed_answer": parsed,
                "parse_failure": parsed is None,
                "correct": parsed == row["answer"],
                "choice_scores": choice_scores,
                "score": None,
            }
        )
    return results


def evaluate_examples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping],
    settings: Mapping,
    *,
    model_name: str,
    method: str,
    seed: int,
) -> pl.DataFrame:
    """Per-example results of one task and language: prompt, raw output, parsed answer, gold, correctness.

    The ``prompt`` column is the text the model saw, so with ``settings["chat_template"]`` on it
    is the prompt inside the chat template.
    """
    task_types = {r["task_type"] for r in rows}
    if len(task_types) != 1:
        raise ValueError(f"rows mix task types {sorted(task_types)}; evaluate one task at a time.")
    task_type = task_types.pop()
    if task_type == "generative":
        results = evaluate_generative(model, tokenizer, rows, settings)
    elif task_type == "multiple_choice":
        results = evaluate_multiple_choice(model, tokenizer, rows, settings)
    else:
        raise ValueError(f"unknown task_type {task_type!r}; expected 'generative' or 'multiple_choice'.")
    records = [
        {
            "model": model_name,
            "method": method,
            "seed": seed,
            "task": row["task"],
            "lang": row["lang"],
            "split": row["split"],
            "item_id": row["item_id"],
            "gold": row["answer"],
            **result,
        }
        for row, result in zip(rows, results, strict=True)
    ]
    frame = pl.DataFrame(records, schema=EXAMPLE_COLUMNS)
    if frame["parse_failure"].all():
        log.warning(
            "%s %s: no output could be parsed (every example is a parse failure); check the raw_output "
            "column and evaluation.max_new_tokens.", rows[0]["task"], rows[0]["lang"],
        )
    log.info(
        "%s %s: accuracy %.3f on %d examples, %d parse failures",
        rows[0]["task"], rows[0]["lang"], frame["correct"].mean(), frame.height, frame["parse_failure"].sum(),
    )
    return frame


def accuracy_table(examples: pl.DataFrame) -> pl.DataFrame:
    """Accuracy and parse-failure rate per (model, task, lang, split)."""
    return (
        examples.group_by("model", "task", "lang", "split")
        .agg(
            n=pl.len(),
            accuracy=pl.col("correct").mean(),
            parse_failure_rate=pl.col("parse_failure").mean(),
        )
        .sort("model", "task", "split", "lang")
    )
