"""Routing Steering: hand-computed logit edits and steered routers of tiny random MoE models (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.models.build import tiny_moe_config
from ramoe.routing import RouterCapture, describe_moe
from ramoe.routing.steering import MODES, RoutingSteering, steer_logits, steering_experts
from test_routing_capture import COMMON_CONFIG, FAMILY_CASES, build_model

TINY_ARCH = dict(
    num_layers=4,
    hidden_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts=8,
    top_k=2,
    expert_size=16,
    max_position_embeddings=64,
    router_aux_loss_coef=0.01,
)
VOCAB_SIZE = 50
STEERED_LAYER = 1


# --- steer_logits ---------------------------------------------------------------------------


def test_modes_constant():
    assert MODES == ("soft", "hard")


def test_soft_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # mean 2.5, deviations -1.5, -0.5, 0.5, 1.5, squares sum to 5, population variance 5/4,
    # std sqrt(1.25) = 1.1180340. z0 = 1 + 0.5 * 1.1180340 = 1.5590170.
    # (The sample std sqrt(5/3) = 1.2909944 would give 1.6454972.)
    steered = steer_logits(logits, [0], mode="soft", lambda_s=0.5, top_k=2)

    assert steered[0, 0].item() == pytest.approx(1.0 + 0.5 * math.sqrt(1.25), abs=1e-6)
    assert steered[0, 0].item() == pytest.approx(1.5590170, abs=1e-6)
    assert torch.equal(steered[0, 1:], logits[0, 1:])


def test_soft_std_per_token():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 4.0, 0.0]])
    # Row 2: mean 1, deviations -1, -1, 3, -1, squares sum to 12, variance 3, std sqrt(3).
    steered = steer_logits(logits, [1], mode="soft", lambda_s=2.0, top_k=2)

    assert steered[0, 1].item() == pytest.approx(2.0 + 2.0 * math.sqrt(1.25), abs=1e-6)
    assert steered[1, 1].item() == pytest.approx(0.0 + 2.0 * math.sqrt(3.0), abs=1e-6)


def test_soft_lambda_zero_unchanged():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    steered = steer_logits(logits, [0, 3], mode="soft", lambda_s=0.0, top_k=2)

    assert torch.equal(steered, logits)


def test_hard_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    steered = steer_logits(logits, [0], mode="hard", top_k=1, generator=torch.Generator().manual_seed(0))

    assert steered[0, 0].item() == pytest.approx(4.0, abs=1e-5)
    assert steered[0, 0].item() > 4.0
    assert steered.argmax(dim=-1).item() == 0
    assert torch.equal(steered[0, 1:], logits[0, 1:])


def test_hard_wins_at_large_logits():
    # At 1000 a float32 step is 6.1e-5, so max(z) + 1e-6 would round back to a tie with expert 3.
    logits = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    steered = steer_logits(logits, [0], mode="hard", top_k=1, generator=torch.Generator().manual_seed(0))

    assert steered[0, 0].item() > 1000.0
    assert steered.argmax(dim=-1).item() == 0


def test_hard_two_experts_in_top_2():
    logits = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    assert (logits.argmax(dim=-1) != 2).any()
    assert (logits.argmax(dim=-1) != 6).any()

    steered = steer_logits(logits, [2, 6], mode="hard", top_k=2, generator=torch.Generator().manual_seed(0))
    top_2 = steered.topk(2, dim=-1).indices

    assert (top_2 == 2).any(dim=-1).all()
    assert (top_2 == 6).any(dim=-1).all()
    assert torch.allclose(steered[:, [2, 6]], logits.max(dim=-1, keepdim=True).values.expand(-1, 2), atol=1e-5)


def test_hard_too_many_experts_rejected():
    logits = torch.zeros(1, 8)
    with pytest.raises(ValueError, match="3 experts.*top_k = 2.*max_per_layer"):
        steer_logits(logits, [0, 1, 2], mode="hard", top_k=2)


def test_expert_out_of_range_rejected():
    with pytest.raises(ValueError, match=r"\[8\].*ids 0..7"):
        steer_logits(torch.zeros(1, 8), [8], mode="soft", top_k=2)
    with pytest.raises(ValueError, match=r"\[-1\]"):
        steer_logits(torch.zeros(1, 8), [-1], mode="soft", top_k=2)


def test_repeated_expert_rejected():
    with pytest.raises(ValueError, match="repeat"):
        steer_logits(torch.zeros(1, 8), [3, 3], mode="soft", top_k=2)


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="'medium'.*soft"):
        steer_logits(torch.zeros(1, 8), [0], mode="medium", top_k=2)


def test_empty_experts_unchanged_float32():
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    steered = steer_logits(logits, [], mode="hard", top_k=2)

    assert steered.dtype == torch.float32
    assert torch.equal(steered, logits.float())


def test_float32_output_for_bfloat16():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    steered = steer_logits(logits, [5], mode="soft", top_k=2)
    reference = steer_logits(logits.float(), [5], mode="soft", top_k=2)

    assert steered.dtype == torch.float32
    assert torch.equal(steered, reference)


def test_input_not_modified():
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    steer_logits(logits, [1], mode="soft", top_k=2)
    steer_logits(logits, [1], mode="hard", top_k=2)

    assert torch.equal(logits, before)


def test_hard_deterministic_with_seed():
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))

    def steer(seed: int) -> torch.Tensor:
        return steer_logits(logits, [1, 4], mode="hard", top_k=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(steer(7), steer(7))
    assert not torch.equal(steer(7), steer(8))


# --- RoutingSteering on tiny OLMoE and Qwen3-MoE ----------------------------------------------


def build_tiny(family: str) -> torch.nn.Module:
    config = tiny_moe_config(dict(TINY_ARCH, family=family), vocab_size=VOCAB_SIZE, pad_id=0, bos_id=1, eos_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    layout = describe_moe(model)
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in layout.router_modules.values():
            # Fresh routers can have zero weights, which make all logits equal and the top-k a tie.
            weight = modules[name].weight
            weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


@pytest.fixture(scope="module", params=["olmoe", "qwen3_moe"])
def tiny_model(request) -> torch.nn.Module:
    return build_tiny(request.param)


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(3, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))


def run_with_capture(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, RouterCapture]:
    with torch.no_grad(), RouterCapture(model) as capture:
        logits = model(input_ids).logits
    return logits, capture


def rarest_expert(capture: RouterCapture, layer: int) -> int:
    """Return the expert that the fewest tokens of ``layer`` have in their top-k."""
    ids, _ = capture.top_k(layer)
    counts = torch.bincount(ids.flatten(), minlength=capture.layout.num_experts)
    return int(counts.argmin())


def test_hard_forces_expert(tiny_model, input_ids):
    _, plain = run_with_capture(tiny_model, input_ids)
    expert = rarest_expert(plain, STEERED_LAYER)
    plain_ids, _ = plain.top_k(STEERED_LAYER)
    assert not (plain_ids == expert).any(dim=-1).all(), "the unsteered top-k already contains the expert"

    with RoutingSteering(tiny_model, {STEERED_LAYER: [expert]}, mode="hard"):
        _, steered = run_with_capture(tiny_model, input_ids)
    steered_ids, _ = steered.top_k(STEERED_LAYER)
    steered_logits = steered.logits[STEERED_LAYER][0]

    assert (steered_ids == expert).any(dim=-1).all()
    assert (steered_logits.argmax(dim=-1) == expert).all()


def test_hard_leaves_other_layers(tiny_model, input_ids):
    _, plain = run_with_capture(tiny_model, input_ids)
    expert = rarest_expert(plain, STEERED_LAYER)
    layout = describe_moe(tiny_model)
    routers = {layer: tiny_model.get_submodule(name) for layer, name in layout.router_modules.items()}

    with RoutingSteering(tiny_model, {STEERED_LAYER: [expert]}, mode="hard") as steering:
        _, steered = run_with_capture(tiny_model, input_ids)
        wrapped = [layer for layer, router in routers.items() if "forward" in router.__dict__]

    assert wrapped == [STEERED_LAYER]
    assert steering.experts_by_layer == {STEERED_LAYER: [expert]}
    # Layer 0 runs before the steered layer, so its logits must be bit-identical.
    assert torch.equal(steered.logits[0][0], plain.logits[0][0])
    for layer in layout.moe_layers:
        if layer != STEERED_LAYER:
            assert not (steered.logits[layer][0].argmax(dim=-1) == expert).all(), f"layer {layer} was forced"


def test_soft_lambda_zero_identical(tiny_model, input_ids):
    plain_output, plain = run_with_capture(tiny_model, input_ids)
    experts = {layer: [3] for layer in describe_moe(tiny_model).moe_layers}

    with RoutingSteering(tiny_model, experts, mode="soft", lambda_s=0.0):
        steered_output, steered = run_with_capture(tiny_model, input_ids)

    for layer in plain.logits:
        assert torch.equal(steered.logits[layer][0], plain.logits[layer][0]), f"layer {layer}"
    assert torch.equal(steered_output, plain_output)


def test_soft_changes_routing(tiny_model, input_ids):
    plain_output, plain = run_with_capture(tiny_model, input_ids)
    expert = rarest_expert(plain, STEERED_LAYER)

    with RoutingSteering(tiny_model, {STEERED_LAYER: [expert]}, mode="soft", lambda_s=0.5):
        steered_output, steered = run_with_capture(tiny_model, input_ids)

    plain_layer = plain.logits[STEERED_LAYER][0]
    expected = plain_layer[:, expert] + 0.5 * plain_layer.std(dim=-1, correction=0)
    assert torch.allclose(steered.logits[STEERED_LAYER][0][:, expert], expected, atol=1e-6)
    assert not torch.equal(steered_output, plain_output)


def test_exit_restores_forward(tiny_model, input_ids):
    with torch.no_grad():
        before = tiny_model(input_ids).logits
    router = tiny_model.get_submodule(describe_moe(tiny_model).router_modules[STEERED_LAYER])

    with RoutingSteering(tiny_model, {STEERED_LAYER: [0, 1]}, mode="hard"):
        assert "forward" in router.__dict__
    with torch.no_grad():
        after = tiny_model(input_ids).logits

    assert "forward" not in router.__dict__
    assert torch.equal(after, before)


def test_exception_restores_forward(tiny_model):
    router = tiny_model.get_submodule(describe_moe(tiny_model).router_modules[STEERED_LAYER])

    with pytest.raises(KeyError, match="inside the block"):
        with RoutingSteering(tiny_model, {STEERED_LAYER: [0]}, mode="hard"):
            raise KeyError("inside the block")

    assert "forward" not in router.__dict__


def test_reentry_rejected(tiny_model):
    steering = RoutingSteering(tiny_model, {STEERED_LAYER: [0]}, mode="soft")
    with steering:
        with pytest.raises(RuntimeError, match="already active"):
            steering.__enter__()


def test_same_seed_same_routing(tiny_model, input_ids):
    def steered_logits(seed: int) -> torch.Tensor:
        with RoutingSteering(tiny_model, {STEERED_LAYER: [0, 5]}, mode="hard", seed=seed):
            _, capture = run_with_capture(tiny_model, input_ids)
        return capture.logits[STEERED_LAYER][0]

    assert torch.equal(steered_logits(3), steered_logits(3))


def test_steering_inside_generate(tiny_model, input_ids):
    _, plain = run_with_capture(tiny_model, input_ids)
    expert = rarest_expert(plain, STEERED_LAYER)

    with torch.no_grad(), RoutingSteering(tiny_model, {STEERED_LAYER: [expert]}, mode="hard"):
        with RouterCapture(tiny_model) as capture:
            sequences = tiny_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=3, min_new_tokens=3,
                do_sample=False,
            )

    assert sequences.shape == (2, input_ids.shape[1] + 3)
    # Prefill plus two cached decode steps.
    assert len(capture.logits[STEERED_LAYER]) == 3
    for call in range(3):
        ids, _ = capture.top_k(STEERED_LAYER, call)
        assert (ids == expert).any(dim=-1).all(), f"router call {call}"


def test_non_moe_layer_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"layer 7 is not a MoE layer.*\[0, 1, 2, 3\]"):
        RoutingSteering(tiny_model, {7: [0]})


def test_steering_too_many_experts_rejected(tiny_model):
    with pytest.raises(ValueError, match="3 experts to steer in layer 2.*top_k = 2"):
        RoutingSteering(tiny_model, {2: [0, 1, 2]}, mode="hard")


def test_steering_unknown_mode_rejected(tiny_model):
    with pytest.raises(ValueError, match="'strong'"):
        RoutingSteering(tiny_model, {1: [0]}, mode="strong")


def test_empty_layers_skipped(tiny_model):
    steering = RoutingSteering(tiny_model, {0: [], 2: [4]})

    assert steering.experts_by_layer == {2: [4]}


def test_bfloat16_router_output_dtypes():
    model = build_tiny("olmoe").to(torch.bfloat16)
    router = model.get_submodule(describe_moe(model).router_modules[STEERED_LAYER])
    hidden = torch.randn(5, TINY_ARCH["hidden_size"], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain_logits, plain_weights, plain_ids = router(hidden)

    with RoutingSteering(model, {STEERED_LAYER: [6]}, mode="hard"):
        logits, weights, ids = router(hidden)

    assert plain_logits.dtype == torch.bfloat16
    assert logits.dtype == torch.float32
    assert weights.dtype == plain_weights.dtype == torch.bfloat16
    assert ids.dtype == plain_ids.dtype
    assert (ids == 6).any(dim=-1).all()


# --- the router tuple of every supported family ------------------------------------------------


@pytest.fixture(scope="module", params=list(FAMILY_CASES))
def family_model(request) -> tuple[str, torch.nn.Module]:
    config_class, extra, _, _ = FAMILY_CASES[request.param]
    return request.param, build_model(config_class(**COMMON_CONFIG, **extra))


def test_router_tuple_matches_family(family_model):
    family, model = family_model
    layout = describe_moe(model)
    layer = layout.moe_layers[-1]
    router = model.get_submodule(layout.router_modules[layer])
    hidden = torch.randn(6, COMMON_CONFIG["hidden_size"], generator=torch.Generator().manual_seed(0))
    plain_logits, plain_weights, plain_ids = router(hidden)

    with RoutingSteering(model, {layer: [0]}, mode="soft", lambda_s=0.0):
        logits, weights, ids = router(hidden)

    assert logits.shape == plain_logits.shape
    assert torch.equal(logits, plain_logits.float())
    assert weights.dtype == plain_weights.dtype
    assert weights.shape == plain_weights.shape
    assert ids.dtype == plain_ids.dtype
    assert ids.shape == plain_ids.shape
    # DeepSeek-V3 returns an unsorted top-k, so compare each row's ids as a set.
    assert torch.equal(ids.sort(dim=-1).values, plain_ids.sort(dim=-1).values)
    assert torch.allclose(weights.sort(dim=-1).values, plain_weights.sort(dim=-1).values, atol=1e-6)


def test_hard_steering_every_family(family_model):
    family, model = family_model
    layout = describe_moe(model)
    layer = layout.moe_layers[-1]
    input_ids = torch.randint(3, COMMON_CONFIG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))

    with torch.no_grad(), RoutingSteering(model, {layer: [1]}, mode="hard"), RouterCapture(model) as capture:
        model(input_ids)
    ids, _ = capture.top_k(layer)

    assert (capture.logits[layer][0].argmax(dim=-1) == 1).all()
    if family != "deepseek_v3":
        # DeepSeek-V3 selects on sigmoid scores plus a correction bias inside the best groups,
        # so a max logit does not guarantee selection there.
        assert (ids == 1).any(dim=-1).all()


# --- steering_experts --------------------------------------------------------------------------


def test_steering_experts_keeps_zone_layers():
    mask = {
        "num_experts": 8,
        "layers": {"0": [1], "1": [], "2": [5, 3], "3": [0], "4": [2, 7], "5": [6]},
        "model": "tiny",
        "task": "mgsm",
        "top_k": 2,
        "zone": {"first_layer": 1, "last_layer": 4, "method": "data"},
        "tau": 0.05,
    }

    assert steering_experts(mask) == {2: [3, 5], 3: [0], 4: [2, 7]}


def test_steering_experts_empty_zone():
    mask = {"layers": {"0": [1], "1": [], "2": []}, "zone": {"first_layer": 1, "last_layer": 2, "method": "fallback"}}

    assert steering_experts(mask) == {}


def test_steering_experts_missing_zone_rejected():
    with pytest.raises(ValueError, match=r"missing \['zone'\]"):
        steering_experts({"layers": {"0": [1]}})
