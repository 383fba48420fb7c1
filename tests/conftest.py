"""Shared fixtures: paths of the repository, the tiny test config and the real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path_factory):
    """No test may reach the network: the hub and datasets clients run offline.

    The Hugging Face cache is an empty folder, so a model cached on this machine cannot change
    a test's result. huggingface_hub reads HF_HUB_CACHE once, at import, so its constant is
    set as well as the variable that subprocesses read.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = tmp_path_factory.getbasetemp() / "empty-hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def tiny_config() -> dict:
    with TINY_CONFIG.open() as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real parallel data sets beside the checkout (override with RAMOE_SHARED_DATA)."""
    path = Path(os.environ.get("RAMOE_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} not found; set RAMOE_SHARED_DATA")
    return path
