"""Device choice: each concurrent job claims its own GPU through a lock file."""

from __future__ import annotations

import pytest
import torch

from ramoe import device


@pytest.fixture(autouse=True)
def release_claims():
    yield
    for handle in device._HELD:
        handle.close()
    device._HELD.clear()


def test_claim_gpu_one_per_job(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert device.claim_gpu(2, folder=tmp_path) == 0
    assert device.claim_gpu(2, folder=tmp_path) == 1  # a second open file cannot take the first lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-3.lock", "gpu-5.lock"]
    with pytest.raises(TimeoutError, match="all 2 GPUs stayed claimed"):
        device.claim_gpu(2, folder=tmp_path, wait_s=0.0, poll_s=0.01)
    device._HELD.pop(0).close()  # the first job ends
    assert device.claim_gpu(2, folder=tmp_path) == 0


def test_cpu_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("cpu") == "cpu"
    assert device.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        device.resolve_device("cuda")
    with pytest.raises(RuntimeError, match="cuda:1"):
        device.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="'gpu0'"):
        device.resolve_device("gpu0")
    with pytest.raises(ValueError, match="no GPU"):
        device.claim_gpu(0)
