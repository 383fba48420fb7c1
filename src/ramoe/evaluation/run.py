"""Entry points of the evaluation rules: per-example tables, accuracy and category tables."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch

from ramoe.categories import categorize, category_shares
from ramoe.data.schema import read_parallel
from ramoe.evaluation.base import accuracy_table, evaluate_examples
from ramoe.io import atomic_path, run_metadata
from ramoe.models.loading import load_model, model_revision
from ramoe.tables import write_table

log = logging.getLogger(__name__)


def write_examples(frame: pl.DataFrame, path: str | Path, provenance: Mapping) -> None:
    """Write a per-example table as Parquet (zstd) with the provenance in its schema metadata."""
    table = frame.to_arrow()
    table = table.replace_schema_metadata({b"ramoe": json.dumps(dict(provenance), default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_provenance(path: str | Path) -> dict:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(b"ramoe", b"{}"))


def evaluate_task_language(
    data_path: str | Path,
    output_path: str | Path,
    *,
    lang: str,
    model_name: str,
    model_source: Mapping,
    settings: Mapping,
    seed: int,
    threads: int = 1,
) -> pl.DataFrame:
    """Evaluate the base model on every item (train and test) of one task in one language."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    table = read_parallel(data_path)
    rows = [r for r in table.to_pylist() if r["lang"] == lang]
    if not rows:
        available = sorted(set(table["lang"].to_pylist()))
        raise ValueError(f"{data_path} has no rows for language {lang!r}; it has {available}.")
    model, tokenizer = load_model(model_source)
    frame = evaluate_examples(model, tokenizer, rows, settings, model_name=model_name, method="base", seed=seed)
    provenance = run_metadata(seed=seed, model_revision=model_revision(model_source), evaluation=dict(settings))
    write_examples(frame, output_path, provenance)
    return frame


def _read_examples(paths: Sequence[str | Path]) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in paths], how="vertical")


def write_accuracy_table(example_paths: Sequence[str | Path], output_path: str | Path) -> pl.DataFrame:
    table = accuracy_table(_read_examples(example_paths))
    write_table(table, output_path, read_provenance(example_paths[0]))
    log.info("accuracy:\n%s", table)
    return table


def write_categories(example_paths: Sequence[str | Path], output_path: str | Path) -> pl.DataFrame:
    categorized = categorize(_read_examples(example_paths))
    write_examples(categorized, output_path, read_provenance(example_paths[0]))
    return categorized


def write_categories_table(category_paths: Sequence[str | Path], output_path: str | Path) -> pl.DataFrame:
    categorized = pl.concat([pl.read_parquet(p) for p in category_paths], how="vertical")
    table = category_shares(categorized)
    write_table(table, output_path, read_provenance(category_paths[0]))
    log.info("categories:\n%s", table)
    return table
