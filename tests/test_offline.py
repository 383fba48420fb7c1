"""Offline use: with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 the default config plans and runs,
and every hub access fails at once with a message that explains how to use local files.

conftest.py sets both variables for every test, so the end-to-end run of test_workflow.py is an
offline run of every rule. Here each hub access (a hub model, a hub data set, general text named
by a hub id) is made on purpose and must fail within a time bound instead of waiting on the network.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO
from ramoe.config import ConfigError, check_input_paths, validate_config
from ramoe.data.real import load_mgsm, load_xcopa
from ramoe.models.loading import load_model, model_revision
from ramoe.routing.run import read_general_text

# A hub request that waits on an unreachable network takes minutes, so 10 s separates a fast
# failure from a hang. A snakemake process needs more for its own start-up (Python, Snakemake
# and, for a hub model, torch imports): 3-8 s were seen on a loaded 2-core machine.
PACKAGE_LIMIT_S = 10
WORKFLOW_LIMIT_S = 60
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def run_snakemake(workdir, config: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run snakemake on ``config`` in ``workdir`` and return the result and the seconds it took.

    The result's ``.output`` joins stdout and stderr.
    """
    (workdir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    started = time.monotonic()
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "1", *args],
        capture_output=True,
        text=True,
        timeout=WORKFLOW_LIMIT_S * 5,
    )
    result.output = result.stdout + result.stderr
    return result, time.monotonic() - started


def hub_model_config(tiny_config: dict) -> dict:
    config = copy.deepcopy(tiny_config)
    config["model"] = {"name": "olmoe", "source": "hub", "hub_id": "allenai/OLMoE-1B-7B-0924", "revision": None,
                       "dtype": "bfloat16"}
    return config


def hub_data_config(tiny_config: dict, general_text) -> dict:
    config = copy.deepcopy(tiny_config)
    config["tasks"] = ["mgsm"]
    config["target_languages"] = ["de"]
    config["data"] = {"source": "real", "real": {"test_fraction": 0.4, "split_seed": 0,
                                                   "tasks": {"mgsm": {"source": "hub", "hub_id": "juletxara/mgsm"}}}}
    config["model"]["pretrain"]["tokenizer"] = {"kind": "byte", "vocab_size": 300}
    config["routing"]["general_text"] = {"source": "file", "path": str(general_text)}
    return config


def test_default_config_plans_offline(tmp_path):
    result, _ = run_snakemake(tmp_path, yaml.safe_load((REPO / "config.yaml").read_text()), "-n")
    assert result.returncode == 0, result.output[-3000:]
    assert "synthetic_world" in result.output
    assert "pretrain" in result.output


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_hub_model_fails_fast(monkeypatch, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        load_model({"kind": "hub", "path": "allenai/OLMoE-1B-7B-0924", "revision": None, "dtype": "bfloat16"})
    assert time.monotonic() - started < PACKAGE_LIMIT_S
    assert "cannot load hub model 'allenai/OLMoE-1B-7B-0924': the hub is offline" in str(error.value)
    assert "revision 'main' is not in the cache" in str(error.value)
    assert "set model.source to 'local'" in str(error.value)


def test_hub_model_stops_workflow_fast(tmp_path, tiny_config):
    result, seconds = run_snakemake(tmp_path, hub_model_config(tiny_config), "-n")
    assert seconds < WORKFLOW_LIMIT_S
    assert result.returncode != 0
    assert "model.hub_id = 'allenai/OLMoE-1B-7B-0924' (revision 'main') needs the Hugging Face hub" in result.output
    assert "the hub is offline (HF_HUB_OFFLINE=1) and the model is not in the cache" in result.output
    assert "set model.source: local with model.path" in result.output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize(("loader", "hub_id"), [(load_mgsm, "juletxara/mgsm"), (load_xcopa, "cambridgeltl/xcopa")])
def test_hub_data_fails_fast(monkeypatch, tmp_path, loader, hub_id, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        loader(["en", "sw"], source="hub", hub_id=hub_id, data_dir=tmp_path)
    assert time.monotonic() - started < PACKAGE_LIMIT_S
    assert f"cannot load {hub_id!r} from the Hugging Face hub: this machine is offline ({variable}=1)" in str(error.value)
    assert "Set 'source: local' and 'data_dir'" in str(error.value)


def test_hub_data_stops_workflow_fast(tmp_path, tiny_config):
    general = tmp_path / "general.txt"
    general.write_text("the sun is warm .\n", encoding="utf-8")
    result, seconds = run_snakemake(tmp_path, hub_data_config(tiny_config, general), "-n")
    assert seconds < WORKFLOW_LIMIT_S
    assert result.returncode != 0
    assert "data.real.tasks.mgsm.source is 'hub': cannot load 'juletxara/mgsm' from the Hugging Face hub" in result.output
    assert not (tmp_path / "results").exists()


def test_general_text_hub_id_fails_fast(tiny_config, tmp_path):
    tiny_config["routing"]["general_text"] = {"source": "file", "path": "Salesforce/wikitext"}
    config = validate_config(tiny_config)
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        check_input_paths(config, base=tmp_path)
    with pytest.raises(FileNotFoundError, match="general text file 'Salesforce/wikitext' not found"):
        read_general_text("Salesforce/wikitext")
    assert time.monotonic() - started < PACKAGE_LIMIT_S
    assert "routing.general_text.path = 'Salesforce/wikitext' does not exist" in str(error.value)
    assert "read from a local file only" in str(error.value)


def cache_tiny_model(cache, hub_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Save a tiny OLMoE and its tokenizer in the Hugging Face cache layout, as ``hf download`` leaves them."""
    import huggingface_hub.constants
    import torch
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from ramoe.models.tokenizer import build_word_tokenizer

    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    tokenizer = build_word_tokenizer(["tom", "has", "apples"])
    config = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    assert huggingface_hub.constants.HF_HUB_CACHE == str(cache)
    return snapshot


def test_cached_hub_model_loads_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = cache_tiny_model(tmp_path, "example-org/tiny-moe")

    model, tokenizer = load_model({"kind": "hub", "path": "example-org/tiny-moe", "revision": None, "dtype": "float32"})
    local, _ = load_model({"kind": "local", "path": str(snapshot), "dtype": "float32"})
    assert model.config.model_type == "olmoe"
    assert tokenizer.pad_token_id is not None
    for (name, weight), (_, expected) in zip(model.state_dict().items(), local.state_dict().items(), strict=True):
        assert weight.equal(expected), name

    commit = snapshot.name
    assert model_revision({"kind": "hub", "path": "example-org/tiny-moe"}) == f"example-org/tiny-moe@main (commit {commit})"
    assert model_revision({"kind": "hub", "path": "example-org/other"}) == "example-org/other@main"

    # Another revision is not cached, so it fails as an uncached model does.
    with pytest.raises(RuntimeError, match="revision 'v2' is not in the cache"):
        load_model({"kind": "hub", "path": "example-org/tiny-moe", "revision": "v2", "dtype": "float32"})


def test_cached_hub_model_plans_offline(monkeypatch, tmp_path, tiny_config):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # read by the snakemake subprocess
    cache_tiny_model(cache, "example-org/tiny-moe")
    config = copy.deepcopy(tiny_config)
    config["model"] = {"name": "tiny-moe", "source": "hub", "hub_id": "example-org/tiny-moe", "revision": None,
                       "dtype": "float32"}

    assert validate_config(config)["model"]["hub_id"] == "example-org/tiny-moe"
    workdir = tmp_path / "run"
    workdir.mkdir()
    result, _ = run_snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.output[-3000:]
    # The hub model replaces pretraining; every rule that loads it is planned.
    assert "rule pretrain:" not in result.output
    for rule in ("evaluate_base", "trace", "finetune"):
        assert f"rule {rule}:" in result.output, rule
