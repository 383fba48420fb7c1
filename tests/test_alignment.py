"""The routing alignment loss on hand-computed distributions, and its gradient into the routers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.models.build import tiny_moe_config
from ramoe.routing.capture import RouterCapture
from ramoe.training.alignment import (
    aligned_layers,
    alignment_loss,
    bernoulli_kl,
    categorical_kl,
    jensen_shannon,
    layer_alignment_loss,
    sequence_routing,
)

TEACHER = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
STUDENT = torch.tensor([[0.1, 0.1, 0.4, 0.4]])

# Task experts {0, 1}. Teacher: m = 0.6, r = (2/3, 1/3). Student: m = 0.2, r = (1/2, 1/2).
# KL_Bernoulli(0.6 || 0.2) = 0.6 ln 3 + 0.4 ln(0.4 / 0.8) = 0.659167 - 0.277259 = 0.381909
# KL(r_en || r_tgt) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.191788 - 0.135155 = 0.056633
MASS_TERM = 0.6 * math.log(3) + 0.4 * math.log(0.5)
SPLIT_TERM = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)


def test_bernoulli_kl_by_hand():
    assert bernoulli_kl(torch.tensor(0.6), torch.tensor(0.2)).item() == pytest.approx(MASS_TERM, abs=1e-6)
    assert bernoulli_kl(torch.tensor(0.3), torch.tensor(0.3)).item() == pytest.approx(0.0, abs=1e-7)


def test_mass_split_loss_by_hand():
    loss = layer_alignment_loss(STUDENT, TEACHER, [0, 1], loss="mass_split", beta=1.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(MASS_TERM + SPLIT_TERM, abs=1e-6)
    assert loss.item() == pytest.approx(0.438541, abs=1e-6)
    half = layer_alignment_loss(STUDENT, TEACHER, [0, 1], loss="mass_split", beta=0.5)
    assert half.item() == pytest.approx(MASS_TERM + 0.5 * SPLIT_TERM, abs=1e-6)


def test_single_task_expert_has_only_the_mass_term():
    # T = {2}: m_en = 0.3, m_tgt = 0.4; KL_B(0.3 || 0.4) = 0.3 ln(0.75) + 0.7 ln(7/6)
    expected = 0.3 * math.log(0.75) + 0.7 * math.log(7 / 6)
    loss = layer_alignment_loss(STUDENT, TEACHER, [2], loss="mass_split", beta=5.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_all_expert_forms_by_hand():
    # KL(q_en || q_tgt) = 0.4 ln 4 + 0.2 ln 2 + 0.3 ln 0.75 + 0.1 ln 0.25
    kl = 0.4 * math.log(4) + 0.2 * math.log(2) + 0.3 * math.log(0.75) + 0.1 * math.log(0.25)
    assert layer_alignment_loss(STUDENT, TEACHER, [], loss="kl").item() == pytest.approx(kl, abs=1e-6)
    assert categorical_kl(TEACHER, STUDENT).item() == pytest.approx(kl, abs=1e-6)
    # JSD((0.5, 0.5), (1, 0)): m = (0.75, 0.25); (0.5 ln(2/3) + 0.5 ln 2 + ln(4/3)) / 2 = 0.215762
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])
    expected = 0.5 * (0.5 * math.log(2 / 3) + 0.5 * math.log(2) + math.log(4 / 3))
    assert jensen_shannon(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert jensen_shannon(p, q).item() == pytest.approx(jensen_shannon(q, p).item(), abs=1e-7)


@pytest.mark.parametrize("form", ["mass_split", "js", "kl"])
def test_loss_is_zero_when_target_equals_teacher(form):
    q = torch.softmax(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert layer_alignment_loss(q.clone(), q, [1, 4], loss=form).abs().max().item() < 1e-6


def test_alignment_loss_averages_layers():
    student = {3: STUDENT, 4: TEACHER}
    teacher = {3: TEACHER, 4: TEACHER}
    loss = alignment_loss(student, teacher, {3: [0, 1], 4: [0, 1]}, [3, 4])
    assert loss.item() == pytest.approx((MASS_TERM + SPLIT_TERM) / 2, abs=1e-6)


def test_aligned_layers_skip_layers_without_task_experts():
    experts = {2: [], 3: [5], 4: [1, 2], 6: [0]}
    assert aligned_layers((2, 4), experts, range(8), "mass_split") == [3, 4]
    assert aligned_layers((2, 4), experts, range(8), "js") == [2, 3, 4]
    assert aligned_layers((2, 2), experts, range(8), "mass_split") == []


def test_bad_inputs():
    with pytest.raises(ValueError, match="not one of"):
        layer_alignment_loss(STUDENT, TEACHER, [0], loss="mse")
    with pytest.raises(ValueError, match="differ"):
        layer_alignment_loss(STUDENT, TEACHER[:, :3], [0])
    with pytest.raises(ValueError, match="at least one task expert"):
        layer_alignment_loss(STUDENT, TEACHER, [])
    with pytest.raises(ValueError, match="no alignment layers"):
        alignment_loss({}, {}, {}, [])


def test_sequence_routing_ignores_tokens_outside_the_span():
    # 2 sequences x 3 tokens x 2 experts, flattened batch-major as the routers see them
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.4, 0.6], [9.0, 9.0]])
    span = torch.tensor([[True, True, False], [True, True, False]])
    out = sequence_routing(probs, span)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5], [0.3, 0.7]]))


def _tiny_model(num_layers: int = 4) -> torch.nn.Module:
    arch = dict(family="olmoe", num_layers=num_layers, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                num_experts=8, top_k=2, expert_size=16, max_position_embeddings=64, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, vocab_size=50, pad_id=0, bos_id=1, eos_id=2))
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    return model


def test_gradient_reaches_aligned_router_only():
    model = _tiny_model()
    input_ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    span = torch.ones(2, 6, dtype=torch.bool)
    with RouterCapture(model, keep_graph=True) as capture:
        model(input_ids=input_ids)
    student = {1: sequence_routing(capture.probabilities(1), span)}
    teacher = {1: torch.full((2, 8), 1 / 8)}
    teacher[1][:, 0] = 0.5
    teacher[1][:, 1:] = 0.5 / 7
    loss = alignment_loss(student, teacher, {1: [0, 3]}, [1]).mean()
    assert loss.item() > 0
    loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    # layers after the aligned one do not influence its routing
    for later in (2, 3):
        grad = model.model.layers[later].mlp.gate.weight.grad
        assert grad is None or grad.abs().sum() == 0
