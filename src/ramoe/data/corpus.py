"""Pretraining text built from the train items of real parallel tasks."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

from ramoe.data.schema import read_parallel
from ramoe.io import write_text_atomic

log = logging.getLogger(__name__)


def solved_text(row: dict) -> str:
    """Return the prompt followed by its gold answer: the number, or the text of the correct choice."""
    if row["task_type"] == "multiple_choice":
        return row["prompt"] + row["choices"][int(row["answer"])]
    return f"{row['prompt']} {row['answer']}"


def write_task_corpus(task_paths: Sequence[str | Path], output_path: str | Path, *, seed: int = 0) -> int:
    """Write one solved train example per line (newlines inside examples become spaces), shuffled.

    Test items never enter the corpus, so test accuracy measures more than memorisation.
    """
    lines = []
    for path in task_paths:
        for row in read_parallel(path).to_pylist():
            if row["split"] == "train":
                lines.append(" ".join(solved_text(row).split()))
    if not lines:
        raise ValueError(f"no train items in {list(map(str, task_paths))}; the pretraining corpus would be empty.")
    random.Random(seed).shuffle(lines)
    write_text_atomic(output_path, "\n".join(lines) + "\n")
    log.info("wrote %d training lines to %s", len(lines), output_path)
    return len(lines)
