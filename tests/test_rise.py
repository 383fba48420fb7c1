"""RISE baseline: activation frequencies, zone scores, budget split and expert-only training."""

from __future__ import annotations

import logging
import math

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, GptOssConfig, Qwen2MoeConfig

from ramoe.models.build import tiny_moe_config
from ramoe.routing.adapters import describe_moe
from ramoe.training.rise import (
    ZONES,
    activation_frequencies,
    budget_size,
    depth_zone,
    expert_parameters,
    freeze_for_rise,
    rise_scores,
    select_experts,
    selected_by_layer,
)


def sequence_trace(lang: str, rows: list[tuple[str, int, int, list[int]]]) -> pl.DataFrame:
    """Build a sequence trace with the dtypes of read_sequence_trace. Rows: (item_id, layer, n_tokens, topk_counts)."""
    return pl.DataFrame(
        {
            "item_id": [row[0] for row in rows],
            "lang": [lang] * len(rows),
            "layer": [row[1] for row in rows],
            "n_tokens": [row[2] for row in rows],
            "topk_counts": [row[3] for row in rows],
        },
        schema={
            "item_id": pl.String,
            "lang": pl.String,
            "layer": pl.Int16,
            "n_tokens": pl.Int32,
            "topk_counts": pl.List(pl.Int32),
        },
    )


# ---------------------------------------------------------------------------
# activation_frequencies
# ---------------------------------------------------------------------------

# One layer (5), E = 3 experts, top-k = 2, so each row's counts sum to 2 * n_tokens.
EN_TRACE = sequence_trace("en", [("a", 5, 4, [4, 3, 1]), ("b", 5, 2, [1, 1, 2])])
DE_TRACE = sequence_trace("de", [("a", 5, 3, [0, 3, 3]), ("b", 5, 1, [1, 0, 1])])
# Pooled over tokens:
#   en: counts [4+1, 3+1, 1+2] = [5, 4, 3] over 4+2 = 6 tokens -> [5/6, 4/6, 3/6]
#   de: counts [0+1, 3+0, 3+1] = [1, 3, 4] over 3+1 = 4 tokens -> [0.25, 0.75, 1.0]
# A mean of per-sequence shares would give en [0.75, 0.625, 0.625] instead.
EN_FREQ = [5 / 6, 4 / 6, 3 / 6]
DE_FREQ = [0.25, 0.75, 1.0]


def test_activation_frequencies_hand_values():
    freqs = activation_frequencies({"en": EN_TRACE, "de": DE_TRACE})

    assert freqs.columns == ["lang", "layer", "expert", "freq"]
    assert freqs.height == 6
    en = freqs.filter(pl.col("lang") == "en").sort("expert")
    de = freqs.filter(pl.col("lang") == "de").sort("expert")
    assert en["layer"].to_list() == [5, 5, 5]
    assert en["expert"].to_list() == [0, 1, 2]
    np.testing.assert_allclose(en["freq"].to_numpy(), EN_FREQ)
    np.testing.assert_allclose(de["freq"].to_numpy(), DE_FREQ)
    # A layer's frequencies sum to top_k = 2.
    assert en["freq"].sum() == pytest.approx(2.0)
    assert de["freq"].sum() == pytest.approx(2.0)


def test_activation_frequencies_rejects_bad_traces():
    with pytest.raises(ValueError, match="no sequence traces"):
        activation_frequencies({})
    with pytest.raises(ValueError, match="missing columns"):
        activation_frequencies({"en": EN_TRACE.drop("n_tokens")})
    with pytest.raises(ValueError, match="also has rows of languages"):
        activation_frequencies({"de": EN_TRACE})
    with pytest.raises(ValueError, match="n_tokens <= 0"):
        activation_frequencies({"en": sequence_trace("en", [("a", 5, 0, [0, 0, 0])])})
    with pytest.raises(ValueError, match=r"outside \[0, n_tokens\]"):
        activation_frequencies({"en": sequence_trace("en", [("a", 5, 2, [3, 1, 0])])})
    with pytest.raises(ValueError, match="4 experts per layer"):
        activation_frequencies({"en": EN_TRACE, "de": sequence_trace("de", [("a", 5, 2, [1, 1, 1, 1])])})


# ---------------------------------------------------------------------------
# depth_zone
# ---------------------------------------------------------------------------


def test_depth_zone_exact_bounds():
    assert [depth_zone(layer, 8) for layer in range(8)] == ["shallow"] * 3 + ["middle"] * 2 + ["deep"] * 3
    assert [depth_zone(layer, 16) for layer in range(16)] == ["shallow"] * 6 + ["middle"] * 4 + ["deep"] * 6


def test_depth_zone_rounds_half_to_even():
    # 4 layers: L1 = round(1.5) = 2 and L2 = round(2.5) = 2, so no middle layer.
    assert [depth_zone(layer, 4) for layer in range(4)] == ["shallow", "shallow", "deep", "deep"]
    # 28 layers: L1 = round(10.5) = 10 and L2 = round(17.5) = 18.
    assert depth_zone(9, 28) == "shallow"
    assert depth_zone(10, 28) == "middle"
    assert depth_zone(17, 28) == "middle"
    assert depth_zone(18, 28) == "deep"


def test_depth_zone_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"layer 8 is outside \[0, 8\)"):
        depth_zone(8, 8)
    with pytest.raises(ValueError, match="invalid num_layers 0"):
        depth_zone(0, 0)
    with pytest.raises(ValueError, match="invalid zone bounds"):
        depth_zone(0, 8, bounds=(0.7, 0.3))


# ---------------------------------------------------------------------------
# rise_scores
# ---------------------------------------------------------------------------

# Frequencies a[lang] per (layer, expert) for en, de and the target sw, with num_layers = 8:
# layer 0 is shallow, layers 3 and 4 are middle, layer 6 is deep. alpha = 10.
FREQ_TABLE = {
    # (layer, expert): (en, de, sw)
    (0, 0): (0.2, 0.2, 0.5),
    (0, 1): (0.4, 0.4, 0.1),
    (3, 0): (0.2, 0.4, 0.6),
    (3, 1): (0.3, 0.3, 0.3),
    (4, 0): (0.0, 0.0, 0.0),
    (4, 1): (0.0, 0.0, 0.3),
    (6, 0): (0.0, 0.0, 0.0),
    (6, 1): (0.1, 0.3, 0.2),
}
# Specificity zones: score = a_sw / mean * (1 + 10 * a_sw)
#   (0, 0): mean 0.3, 0.5 / 0.3 = 5/3, score 5/3 * (1 + 5) = 10
#   (0, 1): mean 0.3, 0.1 / 0.3 = 1/3, score 1/3 * (1 + 1) = 2/3
#   (6, 0): mean 0, so specificity 0 and score 0
#   (6, 1): mean 0.2, 0.2 / 0.2 = 1, score 1 * (1 + 2) = 3
# Overlap zone: CV = population std / mean, score = 1 / (1 + CV) * (1 + 10 * mean)
#   (3, 0): mean 0.4, std = sqrt((0.04 + 0 + 0.04) / 3) = sqrt(0.08 / 3), CV = 1 / sqrt(6) = 0.408248,
#           overlap 1 / 1.408248 = 0.710102, score 0.710102 * (1 + 4) = 3.550510
#           (a sample std would give CV 0.5 and score 10/3)
#   (3, 1): CV 0, overlap 1, score 1 * (1 + 3) = 4
#   (4, 0): mean 0, so CV 0, overlap 1, score 1 * (1 + 0) = 1
#   (4, 1): mean 0.1, std = sqrt((0.01 + 0.01 + 0.04) / 3) = sqrt(0.02), CV = sqrt(2),
#           overlap 1 / (1 + sqrt(2)) = 0.414214, score 0.414214 * (1 + 1) = 0.828427
# The CV of the specificity rows is reported but not used in their score:
#   (0, 0) and (0, 1): deviations from 0.3 are +-(0.1, 0.1, -0.2), std = sqrt(0.06 / 3) = sqrt(0.02)
#   (6, 1): deviations from 0.2 are (-0.1, 0.1, 0), std = sqrt(0.02 / 3)
EXPECTED = {
    # (layer, expert): (zone, a_mean, cv, score)
    (0, 0): ("shallow", 0.3, math.sqrt(0.02) / 0.3, 10.0),
    (0, 1): ("shallow", 0.3, math.sqrt(0.02) / 0.3, 2 / 3),
    (3, 0): ("middle", 0.4, 1 / math.sqrt(6), 5 / (1 + 1 / math.sqrt(6))),
    (3, 1): ("middle", 0.3, 0.0, 4.0),
    (4, 0): ("middle", 0.0, 0.0, 1.0),
    (4, 1): ("middle", 0.1, math.sqrt(2), 2 / (1 + math.sqrt(2))),
    (6, 0): ("deep", 0.0, 0.0, 0.0),
    (6, 1): ("deep", 0.2, math.sqrt(0.02 / 3) / 0.2, 3.0),
}


def frequency_frame(table: dict[tuple[int, int], tuple[float, float, float]]) -> pl.DataFrame:
    rows = [
        {"lang": lang, "layer": layer, "expert": expert, "freq": values[index]}
        for (layer, expert), values in table.items()
        for index, lang in enumerate(("en", "de", "sw"))
    ]
    return pl.DataFrame(rows)


def test_rise_scores_hand_values():
    scores = rise_scores(frequency_frame(FREQ_TABLE), target_lang="sw", num_layers=8)

    assert scores.columns[:4] == ["layer", "expert", "zone", "score"]
    assert {"a_target", "a_mean", "cv"} <= set(scores.columns)
    assert scores.select("layer", "expert").rows() == list(EXPECTED)
    for row in scores.iter_rows(named=True):
        zone, a_mean, cv, score = EXPECTED[(row["layer"], row["expert"])]
        where = f"layer {row['layer']} expert {row['expert']}"
        assert row["zone"] == zone, where
        assert row["a_target"] == pytest.approx(FREQ_TABLE[(row["layer"], row["expert"])][2]), where
        assert row["a_mean"] == pytest.approx(a_mean), where
        assert row["cv"] == pytest.approx(cv), where
        assert row["score"] == pytest.approx(score), where


def test_rise_scores_alpha_zero_keeps_ratios():
    scores = rise_scores(frequency_frame(FREQ_TABLE), target_lang="sw", num_layers=8, alpha=0.0)
    by_pair = {(row["layer"], row["expert"]): row["score"] for row in scores.iter_rows(named=True)}
    # Without the magnitude factor the score is the specificity a_sw / mean or the overlap 1 / (1 + CV).
    assert by_pair[(0, 0)] == pytest.approx(5 / 3)
    assert by_pair[(3, 0)] == pytest.approx(1 / (1 + 1 / math.sqrt(6)))


def test_rise_scores_rejects_bad_tables():
    freqs = frequency_frame(FREQ_TABLE)
    with pytest.raises(ValueError, match="target_lang 'bn' is not in the frequency table"):
        rise_scores(freqs, target_lang="bn", num_layers=8)
    with pytest.raises(ValueError, match="only the language"):
        rise_scores(freqs.filter(pl.col("lang") == "sw"), target_lang="sw", num_layers=8)
    incomplete = freqs.filter(~((pl.col("lang") == "de") & (pl.col("layer") == 6)))
    with pytest.raises(ValueError, match="only some of the languages"):
        rise_scores(incomplete, target_lang="sw", num_layers=8)
    with pytest.raises(ValueError, match=r"layer 4 is outside \[0, 4\)"):
        rise_scores(freqs, target_lang="sw", num_layers=4)
    negative = freqs.with_columns(pl.when(pl.col("layer") == 0).then(-0.1).otherwise(pl.col("freq")).alias("freq"))
    with pytest.raises(ValueError, match="negative"):
        rise_scores(negative, target_lang="sw", num_layers=8)


# ---------------------------------------------------------------------------
# budget_size and select_experts
# ---------------------------------------------------------------------------


def score_frame(zone_sizes: dict[str, int], *, seed: int = 0, ties: bool = False) -> pl.DataFrame:
    """One layer per zone (shallow 0, middle 1, deep 2) with the given number of experts."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer, zone in enumerate(ZONES):
        for expert in range(zone_sizes[zone]):
            score = 1.0 if ties else float(rng.random())
            rows.append({"layer": layer, "expert": expert, "zone": zone, "score": score})
    return pl.DataFrame(rows)


def eight_layer_scores(seed: int = 0) -> pl.DataFrame:
    """8 layers x 16 experts with random scores: 48 shallow, 32 middle and 48 deep candidates."""
    rng = np.random.default_rng(seed)
    rows = [
        {"layer": layer, "expert": expert, "zone": depth_zone(layer, 8), "score": float(rng.random())}
        for layer in range(8)
        for expert in range(16)
    ]
    return pl.DataFrame(rows)


def zone_counts(selection: pl.DataFrame) -> tuple[int, int, int]:
    chosen = selection.filter(pl.col("selected"))
    return tuple(int((chosen["zone"] == zone).sum()) for zone in ZONES)


def test_budget_size_rounds_fraction():
    assert budget_size(1024, 0.025) == 26  # 25.6
    assert budget_size(6144, 0.02) == 123  # 122.88
    assert budget_size(100, 0.001) == 1  # round(0.1) = 0, raised to 1
    assert budget_size(10, 1.0) == 10
    with pytest.raises(ValueError, match="invalid budget fraction 0"):
        budget_size(100, 0.0)
    with pytest.raises(ValueError, match="invalid budget fraction 1.5"):
        budget_size(100, 1.5)
    with pytest.raises(ValueError, match="invalid num_experts_total 0"):
        budget_size(0, 0.5)


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        # (int(K * 0.35), int(K * 0.25), rest)
        (1, (0, 0, 1)),
        (3, (1, 0, 2)),  # 1.05 -> 1, 0.75 -> 0
        (10, (3, 2, 5)),  # 3.5 -> 3, 2.5 -> 2
        (16, (5, 4, 7)),  # 5.6 -> 5, 4.0 -> 4
        (20, (7, 5, 8)),
        (26, (9, 6, 11)),  # 9.1 -> 9, 6.5 -> 6
    ],
)
def test_select_experts_zone_counts(budget, expected):
    selection = select_experts(eight_layer_scores(), budget)
    assert selection["selected"].sum() == budget
    assert zone_counts(selection) == expected


def test_select_experts_ranks_zone_jointly():
    scores = eight_layer_scores(seed=1)
    selection = select_experts(scores, 26)
    for zone in ZONES:
        rows = selection.filter(pl.col("zone") == zone)
        chosen = rows.filter(pl.col("selected"))["score"]
        rest = rows.filter(~pl.col("selected"))["score"]
        assert chosen.min() > rest.max(), zone
    # The input order and columns are kept, with `selected` added.
    assert selection.drop("selected").equals(scores)


def test_select_experts_single_layer_quota():
    # Layer 0 has the 3 best shallow scores, so it takes the whole shallow quota of int(10 * 0.35) = 3.
    rows = [{"layer": 0, "expert": e, "zone": "shallow", "score": 10.0 + e} for e in range(4)]
    rows += [{"layer": 1, "expert": e, "zone": "shallow", "score": 1.0 + e} for e in range(4)]
    rows += [{"layer": 3, "expert": e, "zone": "middle", "score": 1.0} for e in range(4)]
    rows += [{"layer": 6, "expert": e, "zone": "deep", "score": 1.0} for e in range(8)]
    selection = select_experts(pl.DataFrame(rows), 10)
    assert selected_by_layer(selection) == {0: [1, 2, 3], 3: [0, 1], 6: [0, 1, 2, 3, 4]}


def test_select_experts_spills_overflow():
    # Quotas 7, 5, 8 for K = 20. The middle zone has 2 candidates, so 3 spill over.
    # Shallow has room 10 - 7 = 3 and deep 12 - 8 = 4, so deep takes all 3.
    selection = select_experts(score_frame({"shallow": 10, "middle": 2, "deep": 12}), 20)
    assert zone_counts(selection) == (7, 2, 11)
    # Shallow room 9 - 7 = 2 and deep room 9 - 8 = 1: shallow takes 2, then deep the last 1.
    selection = select_experts(score_frame({"shallow": 9, "middle": 2, "deep": 9}), 20)
    assert zone_counts(selection) == (9, 2, 9)
    # Equal room (3 each) goes to the earlier zone first: shallow takes all 3.
    selection = select_experts(score_frame({"shallow": 10, "middle": 2, "deep": 11}), 20)
    assert zone_counts(selection) == (10, 2, 8)


def test_select_experts_empty_middle_zone():
    # A 4-layer model has no middle layer. K = 4 gives quotas int(1.4) = 1, int(1.0) = 1 and 2.
    # The middle quota of 1 goes to shallow, which has more room (16 - 1) than deep (16 - 2).
    selection = select_experts(score_frame({"shallow": 16, "middle": 0, "deep": 16}), 4)
    assert zone_counts(selection) == (2, 0, 2)
    assert selection["selected"].sum() == 4


def test_select_experts_all_candidates():
    scores = eight_layer_scores()
    selection = select_experts(scores, scores.height)
    assert selection["selected"].all()
    assert zone_counts(selection) == (48, 32, 48)


def test_select_experts_tie_break():
    # All scores equal: each zone takes its lowest (layer, expert) pairs.
    rows = [
        {"layer": layer, "expert": expert, "zone": depth_zone(layer, 8), "score": 1.0}
        for layer in range(8)
        for expert in range(4)
    ]
    selection = select_experts(pl.DataFrame(rows), 10)
    # Quotas 3, 2, 5: shallow layers 0-2, middle 3-4, deep 5-7.
    assert selected_by_layer(selection) == {0: [0, 1, 2], 3: [0, 1], 5: [0, 1, 2, 3], 6: [0]}


def test_select_experts_rejects_bad_arguments():
    scores = eight_layer_scores()
    with pytest.raises(ValueError, match=r"invalid budget 129\. It must lie in \[1, 128\]"):
        select_experts(scores, 129)
    with pytest.raises(ValueError, match="invalid budget 0"):
        select_experts(scores, 0)
    with pytest.raises(ValueError, match="one share per zone"):
        select_experts(scores, 10, split=(0.5, 0.5))
    with pytest.raises(ValueError, match="non-negative"):
        select_experts(scores, 10, split=(1.2, -0.2, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        select_experts(scores, 10, split=(0.35, 0.25, 0.5))
    with pytest.raises(ValueError, match="missing columns"):
        select_experts(scores.drop("zone"), 10)
    with pytest.raises(ValueError, match="unknown zones"):
        select_experts(scores.with_columns(pl.lit("top").alias("zone")), 10)
    with pytest.raises(ValueError, match="NaN"):
        select_experts(scores.with_columns(pl.lit(float("nan")).alias("score")), 10)
    with pytest.raises(ValueError, match="duplicate"):
        select_experts(pl.concat([scores, scores.head(1)]), 10)


def test_selected_by_layer_groups_sorted():
    selection = pl.DataFrame(
        {"layer": [2, 0, 2, 1], "expert": [5, 3, 1, 0], "selected": [True, True, True, False]}
    )
    assert selected_by_layer(selection) == {0: [3], 2: [1, 5]}
    with pytest.raises(ValueError, match="no `selected` column"):
        selected_by_layer(selection.drop("selected"))


# ---------------------------------------------------------------------------
# expert_parameters and freeze_for_rise on tiny models
# ---------------------------------------------------------------------------

ARCH = dict(
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


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the tiny models on one thread: on a loaded machine, OpenMP threads of such small ops mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_moe_config({**ARCH, "family": family}, vocab_size=50, pad_id=0, bos_id=1, eos_id=2)
    return AutoModelForCausalLM.from_config(config)


def routed_experts(model: torch.nn.Module, input_ids: torch.Tensor, top_k: int) -> list[list[int]]:
    """Per layer, the experts sorted by how many tokens of ``input_ids`` route to them, most first."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, output_router_logits=True).router_logits
    ranked = []
    for layer_logits in logits:
        chosen = layer_logits.float().topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.bincount(chosen, minlength=ARCH["num_experts"])
        ranked.append(torch.argsort(counts, descending=True, stable=True).tolist())
    return ranked


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_expert_parameters_fused_tensors(family):
    model = tiny_model(family)
    layout = describe_moe(model)
    tensors = expert_parameters(model, layout)

    assert sorted(tensors) == [0, 1, 2, 3]
    for layer, named in tensors.items():
        names = [name for name, _ in named]
        prefix = f"model.layers.{layer}.mlp.experts"
        assert names == [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]
        shapes = [tuple(parameter.shape) for _, parameter in named]
        assert shapes == [(8, 32, 32), (8, 32, 16)]  # (E, 2 * I, H) and (E, H, I)


def test_expert_parameters_excludes_shared_expert():
    config = Qwen2MoeConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        intermediate_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    tensors = expert_parameters(model, describe_moe(model))
    names = [name for name, _ in tensors[0]]
    assert names == ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]


def test_expert_parameters_includes_fused_biases():
    config = GptOssConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, head_dim=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    tensors = expert_parameters(model, describe_moe(model))
    assert [name.rsplit(".", 1)[1] for name, _ in tensors[1]] == [
        "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"
    ]


def test_expert_parameters_missing_experts():
    model = tiny_model("olmoe")
    layout = describe_moe(model)
    model.model.layers[1].mlp.experts = torch.nn.Module()  # no parameters left under mlp.experts
    expected = r"MoE layer 1 has no fused expert tensor.*model\.layers\.1\.mlp\.gate\.weight"
    with pytest.raises(ValueError, match=expected):
        expert_parameters(model, layout)


def test_freeze_for_rise_rejects_bad_selection():
    model = tiny_model("olmoe")
    layout = describe_moe(model)
    with pytest.raises(ValueError, match="selected layer 7 is not an MoE layer"):
        freeze_for_rise(model, layout, {7: [0]})
    with pytest.raises(ValueError, match=r"selected experts \[8\] of layer 0 are outside \[0, 8\)"):
        freeze_for_rise(model, layout, {0: [1, 8]})
    with pytest.raises(ValueError, match="no experts were selected"):
        freeze_for_rise(model, layout, {0: []})
    # A rejected selection leaves the model trainable.
    assert all(parameter.requires_grad for parameter in model.parameters())


def train_one_step(model, layout, selected, input_ids, weight_decay):
    """Freeze for RISE, run one forward, backward and AdamW step, and return the trainable tensors."""
    trainable, handles = freeze_for_rise(model, layout, selected)
    optimizer = torch.optim.AdamW([{"params": trainable, "weight_decay": weight_decay}], lr=1e-2)
    model.train()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    for handle in handles:
        handle.remove()
    return trainable


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_freeze_for_rise_adamw_step(family, caplog):
    model = tiny_model(family)
    layout = describe_moe(model)
    input_ids = torch.randint(3, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    # Train experts that the batch routes tokens to, so that their gradient is non-zero.
    ranked = routed_experts(model, input_ids, layout.top_k)
    selected = {0: sorted(ranked[0][:2]), 3: [ranked[3][0]]}
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    expert_tensors = {name: layer for layer, named in expert_parameters(model, layout).items() for name, _ in named}

    with caplog.at_level(logging.INFO, logger="ramoe.training.rise"):
        trainable = train_one_step(model, layout, selected, input_ids, weight_decay=0.0)

    # Each expert has 2 * 16 * 32 + 32 * 16 = 1536 parameters, and 3 experts train.
    assert "RISE trains 3 experts in 2 layers [0, 3]: 4608 of" in caplog.text
    trainable_names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable_names == {name for name, layer in expert_tensors.items() if layer in selected}
    assert len(trainable) == 4

    for name, parameter in model.named_parameters():
        layer = expert_tensors.get(name)
        if layer not in selected:
            assert torch.equal(parameter, before[name]), name
            assert parameter.grad is None, name
            continue
        for expert in range(layout.num_experts):
            if expert in selected[layer]:
                assert not torch.equal(parameter[expert], before[name][expert]), f"{name} expert {expert}"
            else:
                assert torch.equal(parameter[expert], before[name][expert]), f"{name} expert {expert}"
                assert not parameter.grad[expert].any(), f"{name} expert {expert}"


def test_freeze_weight_decay_moves_frozen():
    # The reason for weight_decay=0: decoupled weight decay scales the whole fused tensor.
    model = tiny_model("olmoe")
    layout = describe_moe(model)
    input_ids = torch.randint(3, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    selected = {0: [routed_experts(model, input_ids, layout.top_k)[0][0]]}
    frozen_expert = next(expert for expert in range(layout.num_experts) if expert not in selected[0])
    before = model.model.layers[0].mlp.experts.down_proj[frozen_expert].detach().clone()

    train_one_step(model, layout, selected, input_ids, weight_decay=0.01)

    after = model.model.layers[0].mlp.experts.down_proj[frozen_expert].detach()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, before * (1 - 1e-2 * 0.01))
