"""Result tables: CSV with a sidecar JSON that records how the table was made."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import polars as pl

from ramoe.io import atomic_path, write_json_atomic


def write_table(frame: pl.DataFrame, path: str | Path, provenance: Mapping) -> None:
    """Write ``frame`` as CSV and ``provenance`` (seed, versions, model revision) as ``<path>.meta.json``."""
    path = Path(path)
    # The CSV is the rule's declared output, so it is renamed into place last. A job killed
    # between the two writes leaves a sidecar without its table, never a table without its sidecar.
    write_json_atomic(path.with_suffix(".meta.json"), dict(provenance))
    with atomic_path(path) as tmp:
        frame.write_csv(tmp, float_precision=6)
