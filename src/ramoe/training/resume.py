"""Resumable training: a run's state, saved at step intervals and restored after an interruption.

A training run saves its state into a resume folder beside its output (``<output>.resume/``):
the trained parameters, the optimizer state, the step, the RNG states (Python, torch, CUDA and
the batch-order generator) and the metrics logged so far. The state file is written atomically,
so a kill during a save leaves the previous state intact. With the same thread count on the
same device, a resumed run ends with the same weights, bit for bit, as an uninterrupted one.

Each state stores a fingerprint of what decides the result (the settings without the execution
keys, the data, the initial weights). A state with another fingerprint is discarded with a
warning, so that a run whose config or upstream outputs changed after the interruption starts
from scratch rather than from a stale state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ramoe.io import atomic_path

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# Settings that decide how a run executes (how often it saves, how many threads), not what it
# computes. They stay out of the fingerprint and out of recorded settings.
EXECUTION_SETTINGS = ("save_every", "threads")


def resume_folder(output: str | Path) -> Path:
    """Return the resume folder of an output path: ``<output>.resume`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".resume")


def result_settings(settings: Mapping) -> dict:
    """Return ``settings`` without the execution keys."""
    return {key: value for key, value in settings.items() if key not in EXECUTION_SETTINGS}


def fingerprint(**parts: object) -> str:
    """Hash JSON-serialisable parts (other values by ``str``) into a SHA-256 hex digest."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_summary(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[list]:
    """Summarise tensors by name, shape, dtype, float64 sum and L2 norm.

    Cheap on a GPU even for billions of weights, unlike hashing their bytes.
    NOTE: two weight sets with equal sums and norms in every tensor (a permutation of values)
    get the same summary. Almost any other change of the weights changes it.
    """
    summary = []
    for name, tensor in named_tensors:
        values = tensor.detach()
        summary.append([
            name,
            list(values.shape),
            str(values.dtype),
            float(values.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(values, dtype=torch.float64)),
        ])
    return summary


def rng_state(batch_order: torch.Generator) -> dict:
    """Capture the Python, torch and CUDA RNG states and the batch-order generator's state."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batch_order": batch_order.get_state(),
    }


def restore_rng(state: Mapping, batch_order: torch.Generator) -> None:
    """Restore the RNG states captured by ``rng_state``."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning("the resume state contains %d CUDA RNG states but this process sees %d CUDA devices, so "
                        "the CUDA RNG is not restored and the resumed run may differ from an uninterrupted one.",
                        len(state["cuda"]), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    batch_order.set_state(state["batch_order"])


class TrainingState:
    """Saves and loads one training run's state in its resume folder.

    ``folder`` None turns resuming off. ``save_every`` (steps; None or 0 never saves) only
    decides when ``due`` is true: a state already in the folder is loaded either way.
    """

    def __init__(self, folder: str | Path | None, save_every: int | None, run_fingerprint: str):
        self.folder = None if folder is None else Path(folder)
        self.save_every = save_every or 0
        self.fingerprint = run_fingerprint

    def load(self) -> dict | None:
        """Return the saved state, or None when there is none or it belongs to another run (then it is removed)."""
        if self.folder is None or not (self.folder / STATE_FILE).is_file():
            return None
        path = self.folder / STATE_FILE
        # weights_only: tensors, numbers, strings and containers only, so loading runs no pickled code
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            log.warning(
                "discarding the resume state in %s: it was saved by a run with other settings, data or initial "
                "weights (fingerprint %.12s, this run %.12s), so this run starts from step 0.",
                self.folder, state.get("fingerprint"), self.fingerprint,
            )
            self.discard()
            return None
        log.info("resuming from step %d of the state saved in %s", state["step"], path)
        return state

    def due(self, step: int, total_steps: int) -> bool:
        """Return True after every ``save_every``-th step except the last one, when the output is saved instead."""
        return self.folder is not None and self.save_every > 0 and step % self.save_every == 0 and step < total_steps

    def save(self, state: Mapping) -> None:
        """Write ``state`` (it must contain ``step``) with this run's fingerprint, atomically."""
        with atomic_path(self.folder / STATE_FILE) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        log.info("saved the training state at step %d to %s", state["step"], self.folder)

    def discard(self) -> None:
        """Remove the resume folder, after a finished run or when its state is stale."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)
