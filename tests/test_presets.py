"""Paper-scale presets and their resource profiles, and the chat-template wrapping of prompts.

The preset checks validate every preset, compare its hand-converted zone and language lists, and
plan its DAG with ``snakemake -n`` offline (no model is loaded). The chat-template checks use a
word-level tokenizer given a template string.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ramoe.config import load_config, task_languages, validate_config
from ramoe.data.real import MGSM_PROMPT_LABELS, XCOPA_CONNECTIVES, XQUAD_LANGS
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.prompts import chat_options, format_prompts
from ramoe.routing.traces import trace_texts
from ramoe.training.finetune import IGNORE_INDEX, build_examples

PRESETS = {
    "olmoe-1b-7b": "allenai/OLMoE-1B-7B-0924",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "phi-3.5-moe": "microsoft/Phi-3.5-MoE-instruct",
}
# Routing Steering's zones, 1-indexed inclusive layers: (first, last, number of layers).
REPORTED_ZONES = {"qwen3-30b-a3b": (8, 35, 48), "phi-3.5-moe": (8, 17, 32)}
CHAT_MODELS = {"qwen3-30b-a3b", "phi-3.5-moe"}
# Rules that load the model; each needs GPUs and memory in the preset's profile.
MODEL_RULES = {"evaluate_base", "trace", "trace_general_text", "finetune", "evaluate_finetuned", "evaluate_steering"}
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]


def read_preset(name: str) -> dict:
    with (REPO / "presets" / f"{name}.yaml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def with_data_folder(raw: dict, shared_data: Path) -> dict:
    """Point the preset's ../shared/data paths at the data folder the tests found."""
    text = yaml.safe_dump(raw, allow_unicode=True)
    return yaml.safe_load(text.replace("../shared/data", str(shared_data)))


# --------------------------------------------------------------------------- presets


def test_preset_files_present():
    assert sorted(path.stem for path in (REPO / "presets").glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert (REPO / "profiles" / name / "config.yaml").is_file()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_valid_and_model(name):
    config = load_config(REPO / "presets" / f"{name}.yaml")
    model = config["model"]
    assert model["source"] == "hub"
    assert model["hub_id"] == PRESETS[name]
    assert model["revision"] == "main"
    assert model["dtype"] == "bfloat16"
    assert config["data"]["source"] == "real"
    assert config["evaluation"].get("chat_template", False) is (name in CHAT_MODELS)
    assert 0.25 <= config["routing"]["experts"]["tau"] <= 0.5


def test_qwen3_template_without_thinking():
    config = load_config(REPO / "presets" / "qwen3-30b-a3b.yaml")
    assert config["evaluation"]["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_zone_zero_based(name):
    override = read_preset(name)["routing"]["zone"]["override"]
    if name not in REPORTED_ZONES:
        assert override is None
        return
    first, last, num_layers = REPORTED_ZONES[name]
    assert override == [first - 1, last - 1]
    assert override[1] < num_layers
    assert {"qwen3-30b-a3b": [7, 34], "phi-3.5-moe": [7, 16]}[name] == override


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_six_languages_per_task(name):
    config = load_config(REPO / "presets" / f"{name}.yaml")
    known = {"mgsm": set(MGSM_PROMPT_LABELS), "xcopa": set(XCOPA_CONNECTIVES), "xquad": set(XQUAD_LANGS)}
    assert config["tasks"] == ["mgsm", "xcopa", "xquad"]
    for task in config["tasks"]:
        langs = task_languages(config, task)
        assert langs[0] == "en"
        assert len(langs[1:]) == 6
        assert set(langs) <= known[task]
    # The presets compare models on the same languages.
    assert task_languages(config, "mgsm")[1:] == ["de", "es", "ru", "sw", "th", "zh"]
    assert task_languages(config, "xcopa")[1:] == ["id", "sw", "th", "tr", "vi", "zh"]
    assert task_languages(config, "xquad")[1:] == ["de", "es", "ru", "th", "tr", "zh"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_local_inputs_exist(name, shared_data, monkeypatch):
    from ramoe.config import check_input_paths

    # check_input_paths also rejects a hub model that is not cached while the hub is offline; only
    # the local files are checked here.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    config = validate_config(with_data_folder(read_preset(name), shared_data))
    check_input_paths(config)
    mgsm = Path(config["data"]["real"]["tasks"]["mgsm"]["data_dir"])
    xcopa = Path(config["data"]["real"]["tasks"]["xcopa"]["data_dir"])
    xquad = Path(config["data"]["real"]["tasks"]["xquad"]["data_dir"])
    for lang in task_languages(config, "mgsm"):
        assert (mgsm / f"mgsm_{lang}.tsv").is_file()
    for lang in task_languages(config, "xcopa")[1:]:
        assert (xcopa / "data" / lang / f"test.{lang}.jsonl").is_file()
    for lang in task_languages(config, "xquad"):
        assert (xquad / f"xquad.{lang}.json").is_file()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_profile_covers_model_rules(name):
    rule_names = set()
    for path in (REPO / "rules").glob("*.smk"):
        rule_names |= set(re.findall(r"^\s*rule (\w+):", path.read_text(encoding="utf-8"), flags=re.M))
    with (REPO / "profiles" / name / "config.yaml").open(encoding="utf-8") as handle:
        profile = yaml.safe_load(handle)
    resources = profile["set-resources"]
    assert set(resources) == MODEL_RULES
    assert MODEL_RULES <= rule_names
    for rule, values in resources.items():
        assert values["gpu"] >= 1, rule
        assert values["mem_mb"] >= 32000, rule
        assert values["runtime"] >= 30, rule


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    stats = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, flags=re.M)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dry_run(name, shared_data, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(with_data_folder(read_preset(name), shared_data)), encoding="utf-8")
    # The config check in rules/common.smk rejects an uncached hub model while HF_HUB_OFFLINE is
    # set, even in a dry run, so only the data sets stay offline here. A dry run starts no job, so no model is
    # loaded and nothing is downloaded.
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_DATASETS_OFFLINE"] = "1"
    result = subprocess.run(
        [*SNAKEMAKE, "--directory", str(tmp_path), "--configfile", str(config_path), "--workflow-profile", name,
         "-n", "--cores", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"workflow specific profile {REPO / 'profiles' / name}" in output
    jobs = planned_jobs(output)
    # 3 tasks with English and 6 targets each; 3 methods x 3 seeds x 18 (task, target) pairs.
    assert jobs["real_task"] == 3
    assert jobs["evaluate_base"] == 21
    assert jobs["trace"] == 21
    assert jobs["trace_general_text"] == 1
    assert jobs["finetune"] == 162
    assert jobs["evaluate_finetuned"] == 27
    assert jobs["evaluate_steering"] == 3
    assert "pretrain" not in jobs
    assert "pretrain_corpus" not in jobs

    # Every planned job of a model rule carries the profile's resources.
    with (REPO / "profiles" / name / "config.yaml").open(encoding="utf-8") as handle:
        profile = yaml.safe_load(handle)["set-resources"]
    planned = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", output, flags=re.M)
    assert {rule for rule, _ in planned} >= MODEL_RULES
    for rule, resources in planned:
        if rule in MODEL_RULES:
            expected = profile[rule]
            assert f"gpu={expected['gpu']}" in resources, (rule, resources)
            assert f"mem_mb={expected['mem_mb']}" in resources, (rule, resources)
            assert f"runtime={expected['runtime']}" in resources, (rule, resources)


# --------------------------------------------------------------------------- chat template

WORDS = "question : how many ? answer 4 premise true false".split()
# A minimal chat template in the style of Phi-3: a BOS, the user turn, then the reply header.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|user|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think></think>\n{% endif %}{% endif %}"
)


@pytest.fixture
def chat_tokenizer():
    tokenizer = build_word_tokenizer(WORDS)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_chat_template_off_keeps_prompts(chat_tokenizer):
    prompts = ["question : how many ? answer :"]
    assert format_prompts(chat_tokenizer, prompts) == prompts
    assert format_prompts(None, prompts, chat_template=False) == prompts


def test_chat_template_wraps_once_with_one_bos(chat_tokenizer):
    [text] = format_prompts(chat_tokenizer, ["question : how many ? answer :"], chat_template=True)
    # The template's "<bos>" is dropped, because the tokenizer adds its own.
    assert text == "<|user|>\nquestion : how many ? answer :<|end|>\n<|assistant|>\n"
    ids = chat_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ids.count(chat_tokenizer.bos_token_id) == 1
    assert ids[0] == chat_tokenizer.bos_token_id


def test_chat_template_kwargs_reach_template(chat_tokenizer):
    [text] = format_prompts(chat_tokenizer, ["question"], chat_template=True,
                            chat_template_kwargs={"enable_thinking": False})
    assert text == "<|user|>\nquestion<|end|>\n<|assistant|>\n<think></think>\n"


def test_chat_template_keeps_needed_bos(chat_tokenizer):
    # A tokenizer that adds no BOS keeps the one the template writes.
    chat_tokenizer._tokenizer.post_processor = None
    [text] = format_prompts(chat_tokenizer, ["question"], chat_template=True)
    assert text == "<bos><|user|>\nquestion<|end|>\n<|assistant|>\n"


def test_chat_template_missing_rejected():
    tokenizer = build_word_tokenizer(WORDS)
    with pytest.raises(ValueError, match="has no chat template. Set evaluation.chat_template: false"):
        format_prompts(tokenizer, ["question"], chat_template=True)


def test_chat_options_from_settings():
    assert chat_options({}) == {"chat_template": False, "chat_template_kwargs": {}}
    assert chat_options({"chat_template": True, "chat_template_kwargs": {"enable_thinking": False}, "kind": "hub"}) == {
        "chat_template": True, "chat_template_kwargs": {"enable_thinking": False}}


def _rows():
    common = {"lang": "en", "split": "train", "source": "test"}
    return [
        {**common, "item_id": "g-0", "task": "mgsm", "task_type": "generative", "prompt": "question : how many ? answer :",
         "choices": [], "answer": "4"},
        {**common, "item_id": "c-0", "task": "xnli", "task_type": "multiple_choice", "prompt": "premise question :",
         "choices": [" true", " false"], "answer": "1"},
    ]


def test_trace_sft_texts_use_template(chat_tokenizer):
    rows = _rows()
    chat = {"chat_template": True, "chat_template_kwargs": {}}
    wrapped = format_prompts(chat_tokenizer, [row["prompt"] for row in rows], **chat)
    traced = trace_texts(rows, "solved", tokenizer=chat_tokenizer, **chat)
    # The reply header ends with a newline, so the answer follows without a space.
    assert traced[0][2] == wrapped[0] + "4"
    assert traced[1][2] == wrapped[1] + " false"
    assert [text for _, _, text in trace_texts(rows, "prompt", tokenizer=chat_tokenizer, **chat)] == wrapped

    examples = build_examples(rows, chat_tokenizer, ci_items=set(), **chat)
    prompt_ids = chat_tokenizer(wrapped[0], add_special_tokens=True)["input_ids"]
    four = chat_tokenizer.convert_tokens_to_ids("4")
    assert examples[0].input_ids == [*prompt_ids, four, chat_tokenizer.eos_token_id]
    assert examples[0].labels == [IGNORE_INDEX] * len(prompt_ids) + [four, chat_tokenizer.eos_token_id]


def test_trace_texts_template_needs_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer"):
        trace_texts(_rows(), "prompt", chat_template=True)


def test_routing_traces_use_template(chat_tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from ramoe.data.schema import write_parallel
    from ramoe.models.build import tiny_moe_config
    from ramoe.routing.run import trace_general_text, trace_task_language
    from ramoe.routing.traces import read_sequence_trace

    arch = dict(family="olmoe", num_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, top_k=2, expert_size=8, max_position_embeddings=64, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    config = tiny_moe_config(arch, vocab_size=len(chat_tokenizer), pad_id=chat_tokenizer.pad_token_id,
                             bos_id=chat_tokenizer.bos_token_id, eos_id=chat_tokenizer.eos_token_id)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    source = {"kind": "local", "path": str(folder), "dtype": "float32", "chat_template": True,
              "chat_template_kwargs": {"enable_thinking": False}}
    rows = _rows()
    write_parallel(rows, tmp_path / "task.parquet", name="test")
    settings = {"split": "train", "text": "solved", "batch_size": 2, "max_length": None, "max_items": None,
                "token_traces": False, "general_text": {"max_passages": None}}

    trace_task_language(tmp_path / "task.parquet", tmp_path / "en.tokens.parquet", tmp_path / "en.seq.parquet",
                        lang="en", model_source=source, settings=settings, seed=0, device="cpu")
    traced = read_sequence_trace(tmp_path / "en.seq.parquet").filter(layer=0).sort("item_id")
    expected = {item: chat_tokenizer(text)["input_ids"]
                for item, _, text in trace_texts(rows, "solved", tokenizer=chat_tokenizer, chat_template=True,
                                                 chat_template_kwargs={"enable_thinking": False})}
    assert dict(zip(traced["item_id"], traced["n_tokens"])) == {item: len(ids) for item, ids in expected.items()}
    # BOS, "<|user|>", question : how many ? answer, ":<|end|>", "<|assistant|>", "<think></think>", 4.
    assert len(expected["g-0"]) == 12
    # BOS, "<|user|>", premise question, ":<|end|>", "<|assistant|>", "<think></think>", false.
    assert len(expected["c-0"]) == 8

    general = tmp_path / "general.tsv"
    general.write_text("idx\tsentence1\n0\tpremise true\n1\tquestion\n2\tpremise true\n", encoding="utf-8")
    trace_general_text(general, tmp_path / "general.seq.parquet", model_source=source, settings=settings, seed=0,
                       device="cpu")
    passages = read_sequence_trace(tmp_path / "general.seq.parquet").filter(layer=0).sort("item_id")
    # Two distinct passages, wrapped like task prompts. The first is BOS, "<|user|>", premise,
    # "true<|end|>", "<|assistant|>" and "<think></think>". The second is BOS, "<|user|>",
    # "question<|end|>", "<|assistant|>" and "<think></think>".
    assert passages["n_tokens"].to_list() == [6, 5]
