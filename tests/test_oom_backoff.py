"""Out-of-memory back-off of batched inference and tracing, device_map loading, and flat tracing memory."""

from __future__ import annotations

import logging
import tracemalloc

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.config import ConfigError, validate_config
from ramoe.evaluation.inference import generate_greedy, run_in_batches, score_choices
from ramoe.models import loading
from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.traces import capture_traces

WORDS = "tom has 3 apples . sells 1 how many does have ? answer : 2 mia is hungry so eats bread drinks water".split()
ARCH = dict(family="olmoe", num_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
            top_k=2, expert_size=8, max_position_embeddings=64, router_aux_loss_coef=0.01)
PROMPTS = [
    "tom has 3 apples . how many apples does tom have ? answer :",
    "mia has 2 apples . mia sells 1 apples . how many apples does mia have ? answer :",
    "mia is hungry . so",
    "tom has 1 apples . how many apples does tom have ? answer :",
    "tom sells 2 apples . so",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = tiny_moe_config(ARCH, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval()


def _fail_above(limit: int, function, size_of):
    """Wrap ``function`` so that it raises OutOfMemoryError when ``size_of(args, kwargs)`` exceeds ``limit``."""
    calls = []

    def wrapped(*args, **kwargs):
        size = size_of(args, kwargs)
        calls.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"fake: a batch of {size} is above {limit}")
        return function(*args, **kwargs)

    wrapped.calls = calls
    return wrapped


def test_run_in_batches_halves_and_keeps_the_size(caplog):
    process = _fail_above(3, lambda batch: [item * 10 for item in batch], lambda args, kwargs: len(args[0]))
    with caplog.at_level(logging.WARNING, logger="ramoe.evaluation.inference"):
        results = run_in_batches(process, list(range(10)), batch_size=8, desc="fake")
    assert results == [item * 10 for item in range(10)]
    # 8 and 4 fail, then batches of 2 cover the 10 items.
    assert process.calls == [8, 4, 2, 2, 2, 2, 2]
    assert "out of memory on a batch of 8 (fake, items 0-7); retrying with batch size 4" in caplog.text
    assert "out of memory on a batch of 4 (fake, items 0-3); retrying with batch size 2" in caplog.text
    assert "fake ran with batch size 2 instead of 8" in caplog.text


def test_run_in_batches_reraises_at_batch_size_one():
    process = _fail_above(0, lambda batch: batch, lambda args, kwargs: len(args[0]))
    with pytest.raises(torch.OutOfMemoryError) as error:
        run_in_batches(process, [1, 2, 3], batch_size=2, desc="fake")
    assert process.calls == [2, 1]
    assert "model.device_map: auto" in "".join(error.value.__notes__)


def test_generate_greedy_backs_off(model, tokenizer, monkeypatch):
    expected = generate_greedy(model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=3)
    fake = _fail_above(2, model.generate, lambda args, kwargs: kwargs["input_ids"].shape[0])
    monkeypatch.setattr(model, "generate", fake)
    outputs = generate_greedy(model, tokenizer, PROMPTS, batch_size=8, max_new_tokens=3)
    assert fake.calls == [5, 4, 2, 2, 1]  # the first batch contains all 5 prompts; it fails, then 4 fails
    assert outputs == expected


def test_score_choices_backs_off(model, tokenizer, monkeypatch):
    prompts = PROMPTS[:3]
    choices = [[" 3", " 4"], [" 1", " 2"], [" mia eats bread .", " mia drinks water ."]]
    expected = score_choices(model, tokenizer, prompts, choices, batch_size=3)
    fake = _fail_above(3, model.forward, lambda args, kwargs: kwargs["input_ids"].shape[0])
    monkeypatch.setattr(model, "forward", fake)
    scores = score_choices(model, tokenizer, prompts, choices, batch_size=6)
    assert fake.calls == [6, 3, 3]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=0, atol=1e-6)


def _texts(count: int) -> list[tuple[str, str, str]]:
    return [(f"item-{index}", "en", PROMPTS[index % len(PROMPTS)]) for index in range(count)]


def test_capture_traces_backs_off(model, tokenizer, monkeypatch, tmp_path, caplog):
    texts = _texts(7)
    capture_traces(model, tokenizer, texts, token_path=tmp_path / "a.tokens.parquet",
                   sequence_path=tmp_path / "a.sequences.parquet", batch_size=2)
    fake = _fail_above(2, model.forward, lambda args, kwargs: kwargs["input_ids"].shape[0])
    monkeypatch.setattr(model, "forward", fake)
    with caplog.at_level(logging.WARNING, logger="ramoe.evaluation.inference"):
        summary = capture_traces(model, tokenizer, texts, token_path=tmp_path / "b.tokens.parquet",
                                 sequence_path=tmp_path / "b.sequences.parquet", batch_size=8)
    # 7 texts fail as one batch and at 4, then run as 2, 2, 2, 1: the batches of the reference run.
    assert fake.calls == [7, 4, 2, 2, 2, 1]
    assert summary["sequences"] == 7
    assert "routing traces, texts 0-6" in caplog.text
    for name in ("tokens", "sequences"):
        assert pl.read_parquet(tmp_path / f"b.{name}.parquet").equals(pl.read_parquet(tmp_path / f"a.{name}.parquet"))


def _peak_python_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_capture_traces_memory_is_flat(model, tokenizer, tmp_path):
    """Row groups of 128 rows keep the peak flat; one row group for everything grows with the texts."""

    def trace(count: int, rows_per_group: int):
        name = f"{count}-{rows_per_group}"
        return lambda: capture_traces(model, tokenizer, _texts(count), token_path=tmp_path / f"{name}.tokens.parquet",
                                      sequence_path=tmp_path / f"{name}.sequences.parquet", batch_size=4,
                                      rows_per_group=rows_per_group)

    trace(4, 128)()  # first call: imports and caches that later calls reuse
    streamed = _peak_python_bytes(trace(220, 128)) - _peak_python_bytes(trace(20, 128))
    buffered = _peak_python_bytes(trace(220, 10**9)) - _peak_python_bytes(trace(20, 10**9))
    rows = {
        count: pl.scan_parquet(tmp_path / f"{count}-128.tokens.parquet").select(pl.len()).collect().item()
        for count in (20, 220)
    }

    assert rows[220] - rows[20] > 10_000
    # Measured with 20 and 220 texts: +50 to +160 kB streamed against +460 to +780 kB when every
    # row waits for the end. The streamed growth, about 700 bytes per text, is the key table's
    # item ids, the input texts, and small objects that the forward passes and the writer thread
    # leave in CPython's free lists. It varies with how the two threads interleave.
    assert buffered >= (rows[220] - rows[20]) * 23  # the 23 bytes of NumPy columns per token row
    assert streamed < 0.35 * buffered


def test_load_model_passes_device_map(tmp_path, model, tokenizer, monkeypatch):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    seen = {}
    original = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return original(path, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    loaded, _ = loading.load_model({"kind": "local", "path": str(tmp_path), "dtype": "float32", "device_map": "auto"})
    assert seen["device_map"] == "auto"
    assert {parameter.device.type for parameter in loaded.parameters()} == {"cpu"}  # no GPU here
    seen.clear()
    loading.load_model({"kind": "local", "path": str(tmp_path), "dtype": "float32"})
    assert "device_map" not in seen


def test_config_device_map_and_processes(tiny_config):
    tiny_config["model"]["device_map"] = "auto"
    assert validate_config(tiny_config)["model"]["device_map"] == "auto"
    tiny_config["finetune"]["processes"] = 2
    with pytest.raises(ConfigError, match=r"finetune.processes = 2 keeps a whole model copy in every process"):
        validate_config(tiny_config)
    tiny_config["model"]["device_map"] = "everywhere"
    with pytest.raises(ConfigError, match=r"model.device_map = 'everywhere' is invalid"):
        validate_config(tiny_config)
