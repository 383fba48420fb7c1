"""Choose the device of a model job, giving each concurrent job on a workstation its own GPU.

Snakemake limits how many GPU jobs run at once (``--resources gpu=N``, see profiles/local) but
does not say which GPU a job should use. Each job therefore claims one: it takes an exclusive,
non-blocking ``flock`` on a per-GPU lock file and keeps it until the process exits (the kernel
releases the lock even when the job is killed). The lock files live in a node-local folder and
are keyed by the GPU's entry in ``CUDA_VISIBLE_DEVICES``, so jobs that SLURM confined to
different GPUs of one node never wait for each other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO

import torch

log = logging.getLogger(__name__)

# Open lock files of this process; a claim lasts as long as its file object stays open.
_HELD: list[IO] = []


def lock_dir() -> Path:
    """Node-local folder of the GPU lock files (``RAMOE_GPU_LOCK_DIR`` overrides it)."""
    default = Path(tempfile.gettempdir()) / f"ramoe-gpu-locks-{os.getuid()}"
    path = Path(os.environ.get("RAMOE_GPU_LOCK_DIR", default))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _visible_ids(count: int) -> list[str]:
    """Return the physical identity of each visible GPU: its CUDA_VISIBLE_DEVICES entry, or its index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
        if len(entries) >= count:
            return entries[:count]
    return [str(index) for index in range(count)]


def claim_gpu(count: int, *, folder: Path | None = None, wait_s: float = 3600.0, poll_s: float = 2.0) -> int:
    """Claim one of ``count`` visible GPUs for this process and return its index (0-based).

    Waits while every GPU is claimed by another job; raises TimeoutError after ``wait_s`` seconds.
    """
    if count < 1:
        raise ValueError(f"no GPU to claim: {count} visible.")
    folder = folder or lock_dir()
    identities = _visible_ids(count)
    deadline = time.monotonic() + wait_s
    while True:
        for index, identity in enumerate(identities):
            handle = (folder / f"gpu-{identity}.lock").open("a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _HELD.append(handle)
            log.info("claimed GPU %d (CUDA_VISIBLE_DEVICES entry %s)", index, identity)
            return index
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"all {count} GPUs stayed claimed for {wait_s:.0f} s (lock files in {folder}). Run fewer GPU jobs at "
                "once (--resources gpu=N) or remove stale lock files of a crashed run."
            )
        time.sleep(poll_s)


def resolve_device(preference: str = "auto") -> str:
    """Turn the ``device`` config value into a torch device string, claiming a GPU where one is used.

    ``auto`` claims a free GPU when CUDA is available and falls back to the CPU otherwise.
    ``cuda`` claims a free GPU and fails without one. ``cuda:N`` and ``cpu`` are taken as given.
    """
    if preference == "cpu" or preference.startswith("cuda:"):
        if preference.startswith("cuda:") and not torch.cuda.is_available():
            raise RuntimeError(f"device = {preference!r} but CUDA is not available here. Set device: auto or cpu.")
        return preference
    if preference not in ("auto", "cuda"):
        raise ValueError(f"device {preference!r} is not auto, cpu, cuda or cuda:N.")
    if not torch.cuda.is_available():
        if preference == "cuda":
            raise RuntimeError("device = 'cuda' but CUDA is not available here. Set device: auto or cpu.")
        return "cpu"
    index = claim_gpu(torch.cuda.device_count())
    torch.cuda.set_device(index)
    return f"cuda:{index}"
