"""Evaluate a model on parallel examples and label every (item, language) correct or incorrect."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import polars as pl
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ramoe.evaluation.extract import extract_number, numbers_equal
from ramoe.evaluation.inference import generate_greedy, score_choices

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
}


def evaluate_generative(model, tokenizer, rows: Sequence[Mapping], settings: Mapping) -> list[dict]:
    """Greedy-generate an answer per row and extract its number; no number is a parse failure."""
    outputs = generate_greedy(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        batch_size=settings["batch_size"],
        max_new_tokens=settings["max_new_tokens"],
    )
    results = []
    for row, output in zip(rows, outputs, strict=True):
        parsed = extract_number(output, row["lang"])
        results.append(
            {
                "raw_output": output,
                "parsed_answer": parsed,
                "parse_failure": parsed is None,
                "correct": numbers_equal(parsed, row["answer"], "en"),
                "choice_scores": [],
            }
        )
    return results


def evaluate_multiple_choice(model, tokenizer, rows: Sequence[Mapping], settings: Mapping) -> list[dict]:
    """Pick the choice with the highest log-likelihood; ties and non-finite scores are parse failures."""
    scores = score_choices(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        [r["choices"] for r in rows],
        batch_size=settings["batch_size"],
        normalization=settings["choice_normalization"],
    )
    results = []
    for row, choice_scores in zip(rows, scores, strict=True):
        best = max(choice_scores)
        finite = all(s == s and abs(s) != float("inf") for s in choice_scores)
        unique = choice_scores.count(best) == 1
        parsed = str(choice_scores.index(best)) if finite and unique else None
        results.append(
            {
                "raw_output": row["choices"][choice_scores.index(best)] if parsed is not None else "",
                "parsed_answer": parsed,
                "parse_failure": parsed is None,
                "correct": parsed == row["answer"],
                "choice_scores": choice_scores,
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
    """Per-example results of one task and language: prompt, raw output, parsed answer, gold, correctness."""
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
            "prompt": row["prompt"],
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
