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
from ramoe.device import resolve_device
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
    device: str = "auto",
) -> pl.DataFrame:
    """Evaluate the base model on every item (train and test) of one task in one language."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    table = read_parallel(data_path)
    rows = [r for r in table.to_pylist() if r["lang"] == lang]
    if not rows:
        available = sorted(set(table["lang"].to_pylist()))
        raise ValueError(f"{data_path} has no rows for language {lang!r}; it has {available}.")
    model, tokenizer = load_model(model_source, device=resolve_device(device))
    frame = evaluate_examples(model, tokenizer, rows, settings, model_name=model_name, method="base", seed=seed)
    provenance = run_metadata(seed=seed, model_revision=model_revision(model_source), evaluation=dict(settings))
    write_examples(frame, output_path, provenance)
    return frame


def _test_rows(data_path: str | Path, langs: Sequence[str]) -> dict[str, list[dict]]:
    """Test items of every language in ``langs``, sorted by item id."""
    rows = [r for r in read_parallel(data_path).to_pylist() if r["split"] == "test"]
    by_lang = {lang: sorted((r for r in rows if r["lang"] == lang), key=lambda r: r["item_id"]) for lang in langs}
    empty = [lang for lang, items in by_lang.items() if not items]
    if empty:
        raise ValueError(f"{data_path} has no test items in languages {empty}.")
    return by_lang


def evaluate_finetuned(
    data_path: str | Path,
    checkpoints: Mapping[str, str | Path],
    output_path: str | Path,
    *,
    method: str,
    seed: int,
    model_name: str,
    settings: Mapping,
    dtype: str = "float32",
    device_map: str | None = None,
    threads: int = 1,
    device: str = "auto",
) -> pl.DataFrame:
    """Evaluate fine-tuned checkpoints ({train language: folder}) on the test items of their language and English.

    English is evaluated after every fine-tuning run to show regressions. The table adds a
    ``train_lang`` column: the target language whose data trained the model.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rows = _test_rows(data_path, ["en", *checkpoints])
    frames = []
    device = resolve_device(device)
    for train_lang, folder in checkpoints.items():
        model, tokenizer = load_model({"kind": "local", "path": str(folder), "dtype": dtype, "device_map": device_map},
                                      device=device)
        for lang in (train_lang, "en"):
            frame = evaluate_examples(model, tokenizer, rows[lang], settings, model_name=model_name, method=method,
                                      seed=seed)
            frames.append(frame.with_columns(train_lang=pl.lit(train_lang)))
    table = pl.concat(frames, how="vertical")
    provenance = run_metadata(seed=seed, method=method, evaluation=dict(settings),
                              checkpoints={k: model_revision({"kind": "local", "path": str(v)}) for k, v in checkpoints.items()})
    write_examples(table, output_path, provenance)
    return table


def evaluate_steering(
    data_path: str | Path,
    mask_path: str | Path,
    output_path: str | Path,
    *,
    langs: Sequence[str],
    model_name: str,
    model_source: Mapping,
    settings: Mapping,
    steering: Mapping,
    threads: int = 1,
    device: str = "auto",
) -> pl.DataFrame:
    """Evaluate the base model under Routing Steering on the test items of every language of a task."""
    from ramoe.routing.steering import RoutingSteering, steering_experts

    torch.set_num_threads(threads)
    torch.manual_seed(steering["seed"])
    rows = _test_rows(data_path, langs)
    mask = json.loads(Path(mask_path).read_text(encoding="utf-8"))
    experts = steering_experts(mask)
    if not experts:
        log.warning("no task expert lies in the alignment zone %s, so steering leaves the model unchanged; lower "
                    "routing.experts.tau to steer.", mask["zone"])
    log.info("steering (%s, lambda_s %g) on layers %s", steering["mode"], steering["lambda_s"], experts)
    model, tokenizer = load_model(model_source, device=resolve_device(device))
    frames = []
    with RoutingSteering(model, experts, mode=steering["mode"], lambda_s=steering["lambda_s"], seed=steering["seed"]):
        for lang in langs:
            frame = evaluate_examples(model, tokenizer, rows[lang], settings, model_name=model_name, method="steering",
                                      seed=steering["seed"])
            frames.append(frame.with_columns(train_lang=pl.lit(None, dtype=pl.String)))
    table = pl.concat(frames, how="vertical")
    provenance = run_metadata(seed=steering["seed"], model_revision=model_revision(model_source),
                              evaluation=dict(settings), steering=dict(steering), steered_experts=experts)
    write_examples(table, output_path, provenance)
    return table


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
