"""Output helpers: atomic writes, run metadata and the project's logging set-up."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "polars", "numpy", "snakemake")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and rename it onto ``path`` when the block succeeds.

    Works for files and folders. A killed or failing writer leaves only the temporary path,
    whose name starts with ``.tmp-``, so neither Snakemake nor a reader ever takes a
    half-written output as complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_metadata(seed: int | None = None, **extra: object) -> dict[str, object]:
    """Describe what produced an output: package versions, seed and any extra fields."""
    return {"seed": seed, "versions": package_versions(), **extra}


def setup_logging(log_file: str | Path | None = None, level: int = logging.INFO) -> None:
    """Send log records to stderr and, when given, to ``log_file`` (a rule's ``log:``)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )

    # Snakemake does not copy a script's stderr into the job's log. Log uncaught exceptions too,
    # so the log file that Snakemake points to says why the job failed.
    def log_uncaught(exc_type, exc, traceback) -> None:
        logging.getLogger("ramoe").critical("job failed: %s", exc, exc_info=(exc_type, exc, traceback))

    sys.excepthook = log_uncaught
