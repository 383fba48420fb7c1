"""Hugging Face hub access without the network: whether the hub is offline, and the local cache.

Clusters often run compute jobs offline (``HF_HUB_OFFLINE=1``) from a shared Hugging Face cache
that a connected login node filled. A hub model found in that cache is loaded from its snapshot
folder, so an offline job reads the same files an online one would. This module imports neither
torch nor transformers, because the config checks of every dry run use it.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}


def offline_variable() -> str | None:
    """Return the first of ``OFFLINE_VARIABLES`` that is set to a true value, or None when the hub is online."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def cached_snapshot(hub_id: str, revision: str | None) -> Path | None:
    """Return the local cache folder of ``hub_id`` at ``revision`` (default ``main``), or None if it is not cached.

    The folder counts as cached when it has a ``config.json``. Only the cache folder
    (``HF_HUB_CACHE``) is read, never the network.
    """
    from huggingface_hub import try_to_load_from_cache

    config_file = try_to_load_from_cache(hub_id, "config.json", revision=revision or "main")
    if not isinstance(config_file, str):
        return None
    return Path(config_file).parent


def cache_folder() -> str:
    """Return the Hugging Face cache folder that ``cached_snapshot`` reads."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
