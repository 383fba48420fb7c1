"""The fine-tuning loop: data preparation, trainable sets, the RA-MoE term and one-step parameter checks."""

from __future__ import annotations

import copy

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.adapters import describe_moe
from ramoe.training.finetune import (
    IGNORE_INDEX,
    RoutingAligner,
    build_examples,
    collate,
    load_teacher,
    set_trainable,
    train,
)

WORDS = "tom has 3 apples . sells 1 how many does have ? answer : 2 mia is hungry so eats bread drinks water".split()
SETTINGS = {"epochs": 1, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
            "grad_clip": 1.0, "log_every": 1}


def _rows():
    arith = {"task_type": "generative", "choices": [], "lang": "xa", "task": "arith", "split": "train"}
    cause = {"task_type": "multiple_choice", "lang": "xa", "task": "cause", "split": "train"}
    return [
        {**arith, "item_id": "a-0", "prompt": "tom has 3 apples . tom sells 1 apples . how many apples does tom have ? answer :", "answer": "2"},
        {**arith, "item_id": "a-1", "prompt": "mia has 2 apples . how many apples does mia have ? answer :", "answer": "2"},
        {**cause, "item_id": "c-0", "prompt": "mia is hungry . so", "choices": [" mia eats bread .", " mia drinks water ."],
         "answer": "0"},
        {**arith, "item_id": "a-2", "prompt": "tom has 1 apples . how many apples does tom have ? answer :", "answer": "1"},
    ]


@pytest.fixture
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture
def model(tokenizer):
    arch = dict(family="olmoe", num_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, top_k=2, expert_size=16, max_position_embeddings=64, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    config = tiny_moe_config(arch, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    built = AutoModelForCausalLM.from_config(config)
    for layer in built.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return built


def test_examples_mask_the_prompt_and_end_with_eos(tokenizer):
    examples = build_examples(_rows(), tokenizer, ci_items={"a-1"})
    first = examples[0]
    prompt_len = len(tokenizer(_rows()[0]["prompt"])["input_ids"])
    assert first.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert first.input_ids[prompt_len:] == [tokenizer.convert_tokens_to_ids("2"), tokenizer.eos_token_id]
    assert first.labels[prompt_len:] == first.input_ids[prompt_len:]
    assert first.span == prompt_len  # the teacher trace averaged the prompt with its BOS
    assert [e.is_ci for e in examples] == [False, True, False, False]
    choice = examples[2]
    assert tokenizer.decode(choice.input_ids[len(choice.input_ids) - 5 : -1]) == "mia eats bread ."


def test_span_follows_routing_text_and_max_length(tokenizer):
    solved = build_examples(_rows(), tokenizer, ci_items=set(), span_text="solved")
    assert solved[0].span == len(solved[0].input_ids) - 1  # prompt and answer, not the EOS
    cut = build_examples(_rows(), tokenizer, ci_items=set(), max_span=4)
    assert {e.span for e in cut} == {4}


def test_collate_pads_on_the_right(tokenizer):
    examples = build_examples(_rows(), tokenizer, ci_items=set())
    batch = collate(examples, tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (4, width)
    short = min(range(4), key=lambda i: len(examples[i].input_ids))
    length = len(examples[short].input_ids)
    assert batch["attention_mask"][short, length:].sum() == 0
    assert (batch["labels"][short, length:] == IGNORE_INDEX).all()
    assert batch["span_mask"][short].sum() == examples[short].span


def _step(model, tokenizer, *, which="all", aligner=None, weight=0.0, settings=SETTINGS):
    layout = describe_moe(model)
    parameters = set_trainable(model, layout, which)
    examples = build_examples(_rows(), tokenizer, ci_items={"a-0", "a-1"})
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    records = train(model, examples, settings, seed=0, pad_id=tokenizer.pad_token_id, parameters=parameters,
                    aligner=aligner, align_weight=weight)
    after = dict(model.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    return changed, records


def test_sft_step_changes_every_trainable_parameter(model, tokenizer):
    changed, records = _step(model, tokenizer)
    assert changed == {name for name, _ in model.named_parameters()}
    assert records[0]["align_loss"] == 0.0
    assert records[0]["lm_loss"] > 0


def test_router_only_training_leaves_the_rest_bit_identical(model, tokenizer):
    changed, _ = _step(model, tokenizer, which="routers")
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(4)}


def test_moe_training_set(model, tokenizer):
    layout = describe_moe(model)
    trainable = {id(p) for p in set_trainable(model, layout, "moe")}
    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.{i}.mlp.{part}" for i in range(4)
                     for part in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")}
    with pytest.raises(ValueError, match="finetune.trainable"):
        set_trainable(model, layout, "attention")


def _aligner(layers=(1, 2), experts=None):
    experts = experts or {1: [0, 1], 2: [3]}
    teacher = {item: {layer: torch.tensor([0.7, 0.1, 0.1, 0.1]) for layer in layers} for item in ("a-0", "a-1")}
    return RoutingAligner(teacher, experts, list(layers), loss="mass_split", beta=1.0, eps=1e-6)


def test_ramoe_lambda_zero_equals_sft(model, tokenizer):
    twin = copy.deepcopy(model)
    _step(model, tokenizer)
    _step(twin, tokenizer, aligner=_aligner(), weight=0.0)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_ramoe_step_moves_routers(model, tokenizer):
    twin = copy.deepcopy(model)
    _step(model, tokenizer)
    _, records = _step(twin, tokenizer, aligner=_aligner(), weight=1.0)
    assert records[0]["align_loss"] > 0
    assert records[0]["ci_rows"] == 2
    assert not torch.equal(model.model.layers[1].mlp.gate.weight, twin.model.layers[1].mlp.gate.weight)


def test_non_finite_loss_names_the_step_and_items(model, tokenizer):
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 1 .*a-\d"):
        _step(model, tokenizer)


def test_load_teacher_keeps_complete_items(tmp_path, caplog):
    frame = pl.DataFrame({
        "item_id": ["a-0", "a-0", "a-1", "a-2"],
        "lang": ["en"] * 4,
        "layer": [1, 2, 1, 1],
        "n_tokens": [5, 5, 5, 5],
        "probs": [[0.5, 0.5], [0.25, 0.75], [1.0, 0.0], [0.0, 1.0]],
        "topk_counts": [[5, 5]] * 4,
        "entropy": [0.1] * 4,
    })
    path = tmp_path / "en.sequences.parquet"
    frame.write_parquet(path)
    teacher = load_teacher(path, {"a-0", "a-1", "a-9"}, [1, 2])
    assert set(teacher) == {"a-0"}
    assert torch.equal(teacher["a-0"][2], torch.tensor([0.25, 0.75]))
    assert "have no English teacher routing" in caplog.text
