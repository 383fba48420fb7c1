"""Shared fixtures: paths of the repository, the tiny test config and the real data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch):
    """No test may reach the network: the hub and datasets clients run offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


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
