"""Multi-process fine-tuning: two gloo processes launched by torchrun train as one process on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ramoe.config import validate_config
from ramoe.data.schema import write_parallel
from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.training.distributed import launch_finetune, shard_rows
from ramoe.training.run import finetune_task_language

WORDS = "tom mia has 0 1 2 3 4 5 6 apples . sells how many does have ? answer :".split()
ARCH = dict(family="olmoe", num_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
            top_k=2, expert_size=8, max_position_embeddings=64, router_aux_loss_coef=0.01)
# Largest differences allowed between 2 processes and 1 process, in float32 on CPU. Measured
# with the settings below (4 AdamW steps at lr 1e-3): parameters differ by at most 4.8e-7 with
# every parameter trained and 7.5e-9 with LoRA, logged losses by at most 2.4e-7. The sums run
# over the rows of each process and then over the processes, so only the rounding differs.
PARAMETER_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny OLMoE checkpoint, 5 train items in en and xa (3 of them ci), an expert mask and an English trace."""
    folder = tmp_path_factory.mktemp("ddp")
    tokenizer = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = tiny_moe_config(ARCH, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")

    rows = []
    for lang in ("en", "xa"):
        for index in range(5):
            # prompts of different lengths, so the two processes get different token counts
            prompt = f"{'tom sells 1 apples . ' * (index % 3)}tom has {index + 2} apples . how many apples does tom have ? answer :"
            rows.append({"item_id": f"a-{index}", "lang": lang, "task": "arith", "task_type": "generative",
                         "split": "train", "prompt": prompt, "choices": [], "answer": str(index), "source": "synthetic"})
    rows.append({**rows[0], "item_id": "a-9", "split": "test"})
    rows.append({**rows[5], "item_id": "a-9", "split": "test"})
    write_parallel(rows, folder / "arith.parquet", name="task 'arith'")
    categories = {"a-0": "ci", "a-1": "cc", "a-2": "ci", "a-3": "ci", "a-4": "ii"}
    pl.DataFrame({"model": "m", "task": "arith", "lang": "xa", "item_id": list(categories),
                  "category": list(categories.values())}).write_parquet(folder / "categories.parquet")
    (folder / "mask.json").write_text(json.dumps({"layers": {"0": [1], "1": [2, 3]},
                                                   "zone": {"first_layer": 0, "last_layer": 1, "method": "override"}}))
    teacher = [{"item_id": f"a-{index}", "lang": "en", "layer": layer, "n_tokens": 10,
                "probs": [0.1, 0.2, 0.3, 0.4] if layer else [0.4, 0.3, 0.2, 0.1], "topk_counts": [5, 5, 5, 5],
                "entropy": 1.0} for index in range(5) for layer in (0, 1)]
    pl.DataFrame(teacher).write_parquet(folder / "en.sequences.parquet")
    return {"data_path": folder / "arith.parquet", "categories_path": folder / "categories.parquet",
            "experts_path": folder / "mask.json", "trace_paths": {"en": str(folder / "en.sequences.parquet")},
            "model_source": {"kind": "local", "path": str(folder / "model"), "revision": None, "dtype": "float32"}}


def _settings(tiny_config: dict, trainable: str) -> dict:
    tiny_config["finetune"]["trainable"] = trainable
    # 5 items in batches of 4: the second batch of each epoch has 1 row, so process 1 gets none.
    return dict(validate_config(tiny_config)["finetune"], batch_size=4, epochs=2, lr=1e-3, log_every=1)


def _finetune(inputs: dict, output: Path, settings: dict, processes: int) -> list[dict]:
    return finetune_task_language(
        **inputs, output_dir=output, method="ramoe", task="arith", lang="xa", settings=settings,
        routing={"text": "prompt", "max_length": None}, seed=0, device="cpu", processes=processes,
    )


def test_shard_rows():
    assert shard_rows(5, 0, 2) == [0, 2, 4]
    assert shard_rows(5, 1, 2) == [1, 3]
    assert shard_rows(1, 1, 2) == []


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_two_processes_match_one(inputs, tmp_path, tiny_config, trainable):
    settings = _settings(tiny_config, trainable)
    single = _finetune(inputs, tmp_path / "single", settings, processes=1)
    double = _finetune(inputs, tmp_path / "double", settings, processes=2)

    assert [r["step"] for r in double] == [1, 2, 3, 4]
    assert [r["ci_rows"] for r in double] == [r["ci_rows"] for r in single]
    assert sum(r["ci_rows"] for r in double) == 6  # 3 ci items, 2 epochs
    for single_record, double_record in zip(single, double, strict=True):
        assert abs(single_record["lm_loss"] - double_record["lm_loss"]) <= LOSS_TOLERANCE
        assert abs(single_record["align_loss"] - double_record["align_loss"]) <= LOSS_TOLERANCE
    assert any(r["align_loss"] > 0 for r in double)

    base = load_file(Path(inputs["model_source"]["path"]) / "model.safetensors")
    weights_one = load_file(tmp_path / "single" / "model.safetensors")
    weights_two = load_file(tmp_path / "double" / "model.safetensors")
    assert set(weights_one) == set(weights_two) == set(base)
    largest = max((weights_one[name] - weights_two[name]).abs().max().item() for name in weights_one)
    moved = max((weights_one[name] - base[name]).abs().max().item() for name in weights_one)
    assert largest <= PARAMETER_TOLERANCE
    assert moved > 1e-3  # training changed the weights, so the comparison means something

    saved = json.loads((tmp_path / "double" / "finetune_config.json").read_text())
    assert saved["processes"] == 2
    assert saved.get("lora_merged", False) == (trainable == "lora")


def test_launch_rejects_a_pinned_gpu(inputs, tmp_path):
    with pytest.raises(ValueError, match=r"device = 'cuda:1' pins one GPU, but finetune.processes = 2"):
        launch_finetune({"output_dir": str(tmp_path)}, processes=2, device="cuda:1")
