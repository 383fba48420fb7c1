"""LoRA through PEFT: targets in every MoE layer, training of the adapters only, RA-MoE's gradient, merging."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.config import ConfigError, validate_config
from ramoe.models.build import tiny_moe_config
from ramoe.models.loading import load_model
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.adapters import describe_moe
from ramoe.routing.capture import RouterCapture
from ramoe.training.finetune import RoutingAligner, build_examples, collate, set_trainable, train
from ramoe.training.lora import find_targets, has_lora, merge_lora

WORDS = "tom has 3 apples . sells 1 how many does have ? answer : 2 mia is hungry so eats bread drinks water".split()
SETTINGS = {"epochs": 1, "batch_size": 2, "lr": 1e-2, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
            "grad_clip": 1.0, "log_every": 1}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "attention_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "routers": True, "expert_parameters": ["gate_up_proj", "down_proj"]}
# hidden 32, 2 query heads and 1 key/value head of width 16, 4 experts of width 16, 4 layers
ARCH = dict(num_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_experts=4, top_k=2,
            expert_size=16, max_position_embeddings=64, router_aux_loss_coef=0.01)


def _rows():
    arith = {"task_type": "generative", "choices": [], "lang": "xa", "task": "arith", "split": "train"}
    return [
        {**arith, "item_id": "a-0", "prompt": "tom has 3 apples . tom sells 1 apples . how many apples does tom have ? answer :",
         "answer": "2"},
        {**arith, "item_id": "a-1", "prompt": "mia has 2 apples . how many apples does mia have ? answer :", "answer": "2"},
        {**arith, "item_id": "a-2", "prompt": "tom has 1 apples . how many apples does tom have ? answer :", "answer": "1"},
        {**arith, "item_id": "a-3", "prompt": "mia has 3 apples . mia sells 1 apples . how many apples does mia have ? answer :",
         "answer": "2"},
    ]


@pytest.fixture
def tokenizer():
    return build_word_tokenizer(WORDS)


def _model(tokenizer, family="olmoe"):
    torch.manual_seed(0)
    config = tiny_moe_config(dict(ARCH, family=family), vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


def _aligner(layers=(1, 2)):
    teacher = {item: {layer: torch.tensor([0.7, 0.1, 0.1, 0.1]) for layer in layers} for item in ("a-0", "a-1", "a-3")}
    return RoutingAligner(teacher, {1: [0, 1], 2: [3]}, list(layers), loss="mass_split", beta=1.0, eps=1e-6)


def _randomise_adapters(model):
    """Give every B factor random values, so the adapted model differs from the base model."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _wrapped_parameter_names(module) -> set[str]:
    """Names of the Parameters that a chain of PEFT ParamWrappers adapts."""
    names = set()
    while type(module).__name__ == "ParamWrapper":
        names.add(module.parameter_name)
        module = module.base_layer
    return names


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_lora_reaches_experts_routers_attention(tokenizer, family):
    model = _model(tokenizer, family)
    layout = describe_moe(model)
    parameters = set_trainable(model, layout, "lora", lora=LORA)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}

    assert layout.moe_layers == [0, 1, 2, 3]
    for layer in layout.moe_layers:
        block = f"model.layers.{layer}.mlp"
        assert _wrapped_parameter_names(model.get_submodule(f"{block}.gate")) == {"weight"}
        assert _wrapped_parameter_names(model.get_submodule(f"{block}.experts")) == {"gate_up_proj", "down_proj"}
        assert any(name.startswith(f"{block}.gate.lora_B") for name in trainable)
        assert any(name.startswith(f"{block}.experts.lora_B") for name in trainable)
        assert any(name.startswith(f"{block}.experts.base_layer.lora_B") for name in trainable)
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{layer}.self_attn.{projection}.lora_A.default.weight" in trainable
    assert all("lora_" in name for name in trainable)
    assert {id(p) for p in parameters} == {id(p) for p in model.parameters() if p.requires_grad}

    # Adapter sizes by hand, rank r = 4: a Linear(in, out) gets r * (in + out); the router weight
    # (E, H) gets r * (H + E); a fused expert tensor gets r * E * (in + out) for its E experts.
    r, hidden, experts, width, head = 4, 32, 4, 16, 16
    attention = r * (hidden + 2 * head) + 2 * r * (hidden + head) + r * (2 * head + hidden)
    router = r * (hidden + experts)
    gate_up = r * experts * (hidden + 2 * width)
    down = r * experts * (width + hidden)
    assert sum(p.numel() for p in parameters) == 4 * (attention + router + gate_up + down)


def test_lora_targets_are_configurable(tokenizer):
    model = _model(tokenizer)
    layout = describe_moe(model)
    targets = find_targets(model, layout, dict(LORA, attention_modules=["q_proj"], routers=False,
                                               expert_parameters=["down_proj"]))
    assert targets.modules == [f"model.layers.{i}.self_attn.q_proj" for i in range(4)]
    assert targets.parameters == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(4)]
    with pytest.raises(ValueError, match="no nn.Linear named self_attn.query"):
        find_targets(model, layout, dict(LORA, attention_modules=["query"]))
    with pytest.raises(ValueError, match=r"has no Parameter 'w1' \(it has \['gate_up_proj', 'down_proj'\]\)"):
        find_targets(model, layout, dict(LORA, expert_parameters=["w1"]))
    with pytest.raises(ValueError, match="dropout"):
        set_trainable(model, layout, "lora", lora=dict(LORA, dropout=0.1))


def test_lora_steps_train_adapters_only(tokenizer):
    model = _model(tokenizer)
    layout = describe_moe(model)
    parameters = set_trainable(model, layout, "lora", lora=LORA)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = build_examples(_rows(), tokenizer, ci_items={"a-0", "a-1", "a-3"})
    one_step = dict(SETTINGS, batch_size=4)

    # Step 1: B starts at zero, so only the B factors receive a gradient.
    records = train(model, examples, one_step, seed=0, pad_id=tokenizer.pad_token_id, parameters=parameters,
                    aligner=_aligner(), align_weight=1.0)
    assert [r["step"] for r in records] == [1]
    assert records[0]["align_loss"] > 0
    after_one = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, value in after_one.items():
        if "lora_B" in name:
            assert not torch.equal(initial[name], value), f"{name} did not change"
        else:
            assert torch.equal(initial[name], value), f"{name} changed in the first step"

    # Step 2: with B non-zero, the A factors move too; the base weights never do.
    train(model, examples, one_step, seed=1, pad_id=tokenizer.pad_token_id, parameters=parameters,
          aligner=_aligner(), align_weight=1.0)
    for name, parameter in model.named_parameters():
        if "lora_A" in name:
            assert not torch.equal(after_one[name], parameter.detach()), f"{name} did not change"
        elif "lora_" not in name:
            assert torch.equal(initial[name], parameter.detach()), f"base weight {name} changed"


def test_alignment_gradient_reaches_router_adapters(tokenizer):
    model = _model(tokenizer)
    layout = describe_moe(model)
    set_trainable(model, layout, "lora", lora=LORA)
    capture = RouterCapture(model, keep_graph=True)
    assert type(model.get_submodule(capture.layout.router_modules[1])).__name__ == "ParamWrapper"

    examples = build_examples(_rows(), tokenizer, ci_items={"a-0", "a-1"})
    batch = collate(examples, tokenizer.pad_token_id)
    with capture:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    align, ci_rows = _aligner()(capture, examples, batch["span_mask"])
    align.backward()

    assert ci_rows == 2
    assert align.item() > 0
    for layer in (1, 2):
        router = model.get_submodule(f"model.layers.{layer}.mlp.gate")
        assert router.lora_B["default"].weight.grad.abs().sum() > 0
        # B is zero at the start, so A's gradient (B^T times the upstream gradient) is zero.
        assert router.lora_A["default"].weight.grad.abs().sum() == 0
        assert router.base_layer.weight.grad is None


def test_captured_logits_include_the_router_update(tokenizer):
    model = _model(tokenizer)
    layout = describe_moe(model)
    set_trainable(model, layout, "lora", lora=LORA)
    _randomise_adapters(model)
    batch = collate(build_examples(_rows()[:2], tokenizer, ci_items=set()), tokenizer.pad_token_id)
    router = model.get_submodule("model.layers.0.mlp.gate")
    router_inputs = []  # the (tokens, hidden) input of the wrapped router
    handle = router.base_layer.register_forward_hook(lambda module, args, output: router_inputs.append(args[0]))
    with RouterCapture(model) as capture, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()

    hidden = router_inputs[0].reshape(-1, router.base_layer.weight.shape[1])
    scaling = LORA["alpha"] / LORA["r"]
    adapted = router.base_layer.weight + scaling * router.lora_B["default"].weight @ router.lora_A["default"].weight
    torch.testing.assert_close(capture.logits[0][0], hidden @ adapted.T, rtol=1e-5, atol=1e-5)
    assert (capture.logits[0][0] - hidden @ router.base_layer.weight.T).abs().max() > 1e-3


def test_merged_checkpoint_reproduces_lora_logits(tokenizer, tmp_path):
    model = _model(tokenizer)
    base = _model(tokenizer)
    layout = describe_moe(model)
    set_trainable(model, layout, "lora", lora=LORA)
    _randomise_adapters(model)
    batch = collate(build_examples(_rows(), tokenizer, ci_items=set()), tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        lora_logits = model(**inputs).logits
        base_logits = base(**inputs).logits

    merged = merge_lora(model)
    assert merged is model
    assert not has_lora(merged)
    assert not [name for name, _ in merged.named_modules() if "lora" in name or "base_layer" in name]
    merged.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model({"kind": "local", "path": str(tmp_path), "dtype": "float32"})
    assert set(loaded.state_dict()) == set(base.state_dict())
    with torch.no_grad():
        loaded_logits = loaded(**inputs).logits

    assert (lora_logits - base_logits).abs().max() > 1e-2  # the adapters change the model
    assert (loaded_logits - lora_logits).abs().max() <= 1e-5


def test_config_lora_checks(tiny_config):
    tiny_config["finetune"]["trainable"] = "lora"
    settings = validate_config(tiny_config)["finetune"]
    assert settings["lora"] == LORA | {"r": 8, "alpha": 16}
    tiny_config["finetune"]["lora"] = {"dropout": 0.1}
    with pytest.raises(ConfigError, match=r"finetune.lora.dropout = 0.1 works only on attention_modules"):
        validate_config(tiny_config)
    tiny_config["finetune"]["lora"] = {"attention_modules": [], "routers": False, "expert_parameters": []}
    with pytest.raises(ConfigError, match="finetune.lora targets nothing"):
        validate_config(tiny_config)
