"""Output helpers: atomic writes, run metadata and the project's logging set-up."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

RECORDED_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "polars", "numpy", "snakemake")
TEMPORARY_PREFIX = ".tmp-"  # name prefix of every output in progress


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and rename it onto ``path`` when the block succeeds.

    Works for files and folders. A killed or failing writer leaves only the temporary path,
    whose name starts with ``.tmp-``, so neither Snakemake nor a reader ever takes a
    half-written output as complete. The next writer of the same path removes such leftovers.
    Before the rename, the written data is flushed to disk (fsync), so that a crash of the
    machine cannot leave a complete name over incomplete data either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir() and not path.is_symlink():
            # A folder cannot be renamed over a non-empty folder. Moving the old one aside first
            # means a kill at any moment leaves the old folder, no folder, or the new one, never a
            # mix of the two.
            old = _temporary_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _temporary_sibling(path: Path) -> Path:
    return path.parent / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}"


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of ``path`` that a killed writer left behind.

    Snakemake never runs two jobs with the same output at once, so a temporary of this exact
    path is a leftover, not another writer's work in progress.
    """
    pattern = re.compile(re.escape(TEMPORARY_PREFIX) + r"[0-9a-f]{8}-" + re.escape(path.name))
    for sibling in path.parent.iterdir():
        if not pattern.fullmatch(sibling.name):
            continue
        log.info("removing %s, left behind by an interrupted writer of %s", sibling, path)
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or every file in a folder tree and the folders themselves, to disk."""
    if path.is_symlink() or not path.exists():
        return
    if path.is_file():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        return
    for child in path.iterdir():
        _fsync_tree(child)
    _fsync_folder(path)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (new names, renames) to disk where the file system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some network file systems reject fsync on a folder
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def package_versions() -> dict[str, str]:
    """Return the versions of Python and the recorded packages, a fresh dict each call."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    # Reading the installed distributions' metadata takes about 15 ms, and the versions cannot
    # change while the process runs, so they are read once.
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
