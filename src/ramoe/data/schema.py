"""The parallel-example schema that the synthetic world and every real-dataset loader write.

One row is one task example in one language. Rows with the same ``item_id`` are translations of
each other, and an item is in the same ``split`` in every language, so that a train item in one
language is never a test item in another.

Columns:

``item_id``   string   stable id of the parallel item, identical across languages
``lang``      string   language code (ISO 639-1 for real data, config names for synthetic ones)
``task``      string   task name, e.g. ``mgsm``, ``xcopa``, ``arith``, ``cause``
``task_type`` string   ``generative`` (numeric answer) or ``multiple_choice``
``split``     string   ``train`` or ``test``
``prompt``    string   exact model input before the answer, already in the evaluation template
``choices``   list<string>  candidate continuations for ``multiple_choice``; empty for ``generative``
``answer``    string   gold answer: the number as written in English digits for ``generative``,
                       the 0-based index of the correct choice for ``multiple_choice``
``source``    string   where the row came from (file path, hub id or ``synthetic``)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

TASK_TYPES = ("generative", "multiple_choice")
SPLITS = ("train", "test")

PARALLEL_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("lang", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("task_type", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("choices", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
)


class ParallelDataError(ValueError):
    """Raised when parallel data breaks the schema or the parallelism contract."""


def validate_rows(rows: list[Mapping], *, name: str) -> None:
    """Check field values of schema rows; ``name`` labels the data set in error messages."""
    if not rows:
        raise ParallelDataError(f"{name}: no rows. Check the data path and the language list.")
    for row in rows:
        where = f"{name}: item {row.get('item_id')!r} ({row.get('lang')!r})"
        missing = [f.name for f in PARALLEL_SCHEMA if row.get(f.name) is None]
        if missing:
            raise ParallelDataError(f"{where} is missing field(s) {missing}.")
        if row["task_type"] not in TASK_TYPES:
            raise ParallelDataError(
                f"{where}: unknown task_type {row['task_type']!r}; expected one of {TASK_TYPES}."
            )
        if row["split"] not in SPLITS:
            raise ParallelDataError(f"{where}: unknown split {row['split']!r}; expected one of {SPLITS}.")
        if row["task_type"] == "multiple_choice":
            n_choices = len(row["choices"])
            if n_choices < 2 or not row["answer"].isdigit() or int(row["answer"]) >= n_choices:
                raise ParallelDataError(
                    f"{where}: answer {row['answer']!r} is not a valid index into {n_choices} choices."
                )


def check_parallel(rows: Iterable[Mapping], *, name: str) -> None:
    """Raise unless every language has the same item ids, each once, in the same split.

    The message names the languages and the first missing or extra ids, because a silently
    dropped item would shift every per-language accuracy and category share.
    """
    ids_by_lang: dict[str, list[str]] = {}
    split_by_item: dict[str, str] = {}
    for row in rows:
        ids_by_lang.setdefault(row["lang"], []).append(row["item_id"])
        previous = split_by_item.setdefault(row["item_id"], row["split"])
        if previous != row["split"]:
            raise ParallelDataError(
                f"{name}: item {row['item_id']!r} is in split {previous!r} in one language and "
                f"{row['split']!r} in {row['lang']!r}. Split items by id, identically for every language."
            )
    for lang, ids in ids_by_lang.items():
        if len(ids) != len(set(ids)):
            duplicates = sorted({i for i in ids if ids.count(i) > 1})[:10]
            raise ParallelDataError(f"{name}: language {lang!r} has duplicate item ids {duplicates}.")
    reference_lang = "en" if "en" in ids_by_lang else sorted(ids_by_lang)[0]
    reference = set(ids_by_lang[reference_lang])
    for lang, ids in sorted(ids_by_lang.items()):
        missing = sorted(reference - set(ids))
        extra = sorted(set(ids) - reference)
        if missing or extra:
            raise ParallelDataError(
                f"{name}: language {lang!r} is not parallel to {reference_lang!r}: "
                f"{len(missing)} missing id(s) {missing[:10]}, {len(extra)} extra id(s) {extra[:10]}. "
                "Fix the data files or drop the language from the config."
            )


def write_parallel(rows: list[Mapping], path: str | Path, *, name: str, provenance: Mapping | None = None) -> None:
    """Validate rows and write them as Parquet (zstd) with the parallel schema, atomically.

    The schema metadata key ``ramoe`` records the package versions and ``provenance`` (its
    ``seed`` is the seed that generated or split the items).
    """
    from ramoe.io import atomic_path, run_metadata

    validate_rows(rows, name=name)
    check_parallel(rows, name=name)
    table = pa.Table.from_pylist([dict(r) for r in rows], schema=PARALLEL_SCHEMA)
    record = run_metadata(**(dict(provenance) if provenance else {}))
    table = table.replace_schema_metadata({b"ramoe": json.dumps(record, default=str).encode("utf-8")})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    log.info("wrote %d rows (%d languages) to %s", table.num_rows, len(set(table["lang"].to_pylist())), path)


def read_parallel(path: str | Path) -> pa.Table:
    """Read a parallel Parquet file and check its columns, types, row count and label values.

    Raises ParallelDataError for a file that is not readable Parquet (for example one cut off by a
    full disk), has no rows, or contains a task_type or split outside the schema.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"parallel data file {str(path)!r} not found. Rerun the rule that writes it.")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ParallelDataError(
            f"{path} is not a readable Parquet file ({error}). It may be truncated: delete it and rerun the "
            "rule that writes it."
        ) from error
    for field in PARALLEL_SCHEMA:
        if field.name not in table.column_names:
            raise ParallelDataError(f"{path}: column {field.name!r} is missing; expected {PARALLEL_SCHEMA.names}.")
        if not table.schema.field(field.name).type.equals(field.type):
            raise ParallelDataError(
                f"{path}: column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}."
            )
    if table.num_rows == 0:
        raise ParallelDataError(f"{path} has no rows. Delete it and rerun the rule that writes it.")
    _check_labels(table, "task_type", TASK_TYPES, path)
    _check_labels(table, "split", SPLITS, path)
    return table.select(PARALLEL_SCHEMA.names)


def _check_labels(table: pa.Table, column: str, allowed: tuple[str, ...], path: str | Path) -> None:
    """Raise unless every value of a string column is one of ``allowed``, naming the first bad row."""
    # A null is invalid too: fill_null keeps pc.all from skipping it.
    valid = pc.fill_null(pc.is_in(table[column], value_set=pa.array(allowed)), False)
    if pc.all(valid).as_py():
        return
    row = pc.index(valid, False).as_py()
    raise ParallelDataError(
        f"{path}, row {row} (item {table['item_id'][row].as_py()!r}, {table['lang'][row].as_py()!r}): unknown "
        f"{column} {table[column][row].as_py()!r}; expected one of {allowed}."
    )
