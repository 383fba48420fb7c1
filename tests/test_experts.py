"""Activation rates, task experts and language-specific experts on a hand-made trace."""

import json

import numpy as np
import polars as pl
import pytest

from ramoe.routing.experts import activation_rates, expert_mask, language_experts, task_experts
from ramoe.routing.figures import plot_task_experts


def trace(lang, rows):
    return pl.DataFrame(
        [{"item_id": item, "lang": lang, "layer": layer, "n_tokens": n_tokens, "topk_counts": counts}
         for item, layer, n_tokens, counts in rows]
    )


# E = 6 experts, router top-k = 2, so each row's counts sum to 2 * n_tokens.
# Rows: (item_id, layer, n_tokens, topk_counts).
TASK = trace("en", [
    ("a", 1, 4, [4, 0, 0, 4, 0, 0]),  # a_i / L_i = [1, 0, 0, 1, 0, 0]
    ("b", 1, 2, [2, 0, 0, 0, 2, 0]),  # [1, 0, 0, 0, 1, 0]
    ("a", 2, 4, [3, 3, 2, 0, 0, 0]),  # [0.75, 0.75, 0.5, 0, 0, 0]
    ("b", 2, 2, [1, 1, 2, 0, 0, 0]),  # [0.5, 0.5, 1, 0, 0, 0]
])
GENERAL = trace("en", [
    ("general-00001", 1, 4, [2, 2, 2, 2, 0, 0]),  # [0.5, 0.5, 0.5, 0.5, 0, 0]
    ("general-00002", 1, 2, [0, 2, 0, 2, 0, 0]),  # [0, 1, 0, 1, 0, 0]
    ("general-00001", 2, 4, [0, 1, 0, 3, 2, 2]),  # [0, 0.25, 0, 0.75, 0.5, 0.5]
    ("general-00002", 2, 2, [0, 0, 0, 2, 1, 1]),  # [0, 0, 0, 1, 0.5, 0.5]
])
# Means over sequences:
TASK_RATES = [[1.0, 0.0, 0.0, 0.5, 0.5, 0.0], [0.625, 0.625, 0.75, 0.0, 0.0, 0.0]]
GENERAL_RATES = [[0.25, 0.75, 0.25, 0.75, 0.0, 0.0], [0.0, 0.125, 0.0, 0.875, 0.5, 0.5]]
# Delta = task - general:
# layer 1: [0.75, -0.75, -0.25, -0.25, 0.5, 0]
# layer 2: [0.625, 0.5, 0.75, -0.875, -0.5, -0.5]
DELTA = [[0.75, -0.75, -0.25, -0.25, 0.5, 0.0], [0.625, 0.5, 0.75, -0.875, -0.5, -0.5]]


def selected(table, layer):
    return table.filter((pl.col("layer") == layer) & pl.col("selected"))["expert"].sort().to_list()


def test_activation_rates_hand_values():
    layers, rates = activation_rates(TASK)
    assert layers.tolist() == [1, 2]
    np.testing.assert_allclose(rates, TASK_RATES)
    _, general = activation_rates(GENERAL)
    np.testing.assert_allclose(general, GENERAL_RATES)


def test_activation_rates_trace_dtypes():
    # ramoe.routing.traces writes int16 layers, int32 n_tokens and int32 counts.
    cast = TASK.with_columns(pl.col("layer").cast(pl.Int16), pl.col("n_tokens").cast(pl.Int32),
                             pl.col("topk_counts").cast(pl.List(pl.Int32)))
    layers, rates = activation_rates(cast)
    assert layers.tolist() == [1, 2]
    np.testing.assert_allclose(rates, TASK_RATES)


def test_activation_rates_sum_to_top_k():
    _, rates = activation_rates(TASK)
    np.testing.assert_allclose(rates.sum(axis=1), [2.0, 2.0])


def test_task_experts_delta():
    table = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    assert table.columns == ["model", "task", "layer", "expert", "delta", "selected"]
    assert table.height == 12
    for position, layer in enumerate((1, 2)):
        delta = table.filter(pl.col("layer") == layer).sort("expert")["delta"].to_list()
        np.testing.assert_allclose(delta, DELTA[position])


def test_task_experts_threshold():
    # Layer 1 with tau = 0.3: experts 0 (0.75) and 4 (0.5) are above it, within the cap of 2.
    table = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    assert selected(table, 1) == [0, 4]


def test_task_experts_top_k_cap():
    # Layer 2 with tau = 0.3: experts 0 (0.625), 1 (0.5) and 2 (0.75) are above it.
    # top_k = 2 keeps the two largest, 2 and 0.
    table = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    assert selected(table, 2) == [0, 2]
    uncapped = task_experts(TASK, GENERAL, tau=0.3, top_k=3, model="m", task="t")
    assert selected(uncapped, 2) == [0, 1, 2]


def test_task_experts_threshold_is_strict():
    # tau = 0.5: expert 4 of layer 1 has delta exactly 0.5, which is not above tau.
    table = task_experts(TASK, GENERAL, tau=0.5, top_k=2, model="m", task="t")
    assert selected(table, 1) == [0]
    assert selected(table, 2) == [0, 2]


def test_language_experts_tie_prefers_lower_id():
    # GENERAL read as a target language against TASK as English: delta is minus DELTA.
    # Layer 1: [-0.75, 0.75, 0.25, 0.25, -0.5, 0], tau = 0.3 keeps expert 1.
    # Layer 2: [-0.625, -0.5, -0.75, 0.875, 0.5, 0.5]: experts 3, 4, 5 are above tau, the cap of 2
    # keeps 3 and, of the tied 4 and 5, the lower id 4.
    table = language_experts(GENERAL, TASK, tau=0.3, top_k=2, model="m", task="t", lang="xa")
    assert table.columns == ["model", "task", "lang", "layer", "expert", "delta", "selected"]
    assert table["lang"].unique().to_list() == ["xa"]
    assert selected(table, 1) == [1]
    assert selected(table, 2) == [3, 4]


def test_expert_mask_json():
    table = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    mask = expert_mask(table)
    assert mask == {"num_experts": 6, "layers": {"1": [0, 4], "2": [0, 2]}}
    assert json.loads(json.dumps(mask)) == mask


def test_expert_mask_keeps_empty_layers():
    table = task_experts(TASK, GENERAL, tau=0.7, top_k=2, model="m", task="t")
    assert expert_mask(table) == {"num_experts": 6, "layers": {"1": [0], "2": [2]}}
    none = task_experts(TASK, GENERAL, tau=0.9, top_k=2, model="m", task="t")
    assert expert_mask(none) == {"num_experts": 6, "layers": {"1": [], "2": []}}


def test_expert_mask_rejects_two_tasks():
    first = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    second = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="u")
    with pytest.raises(ValueError, match="one \\(model, task\\)"):
        expert_mask(pl.concat([first, second]))


def test_task_experts_rejects_layer_mismatch():
    with pytest.raises(ValueError, match="different layers"):
        task_experts(TASK, GENERAL.filter(pl.col("layer") == 1), tau=0.3, top_k=2, model="m", task="t")


def test_task_experts_rejects_invalid_top_k():
    with pytest.raises(ValueError, match="invalid top_k"):
        task_experts(TASK, GENERAL, tau=0.3, top_k=0, model="m", task="t")


def test_activation_rates_reject_empty_sequence():
    n_tokens = pl.when(pl.col("item_id") == "a").then(0).otherwise(pl.col("n_tokens"))
    broken = TASK.with_columns(n_tokens.alias("n_tokens"))
    with pytest.raises(ValueError, match="n_tokens <= 0"):
        activation_rates(broken)


def test_activation_rates_reject_count_above_length():
    broken = trace("en", [("a", 1, 2, [3, 1, 0, 0, 0, 0])])
    with pytest.raises(ValueError, match=r"outside \[0, n_tokens\]"):
        activation_rates(broken)


def test_plot_task_experts_writes_files(tmp_path):
    table = task_experts(TASK, GENERAL, tau=0.3, top_k=2, model="m", task="t")
    zones = pl.DataFrame({"model": ["m"], "task": ["t"], "layer": [2], "first_layer": [2], "last_layer": [2],
                          "method": ["fallback"]})
    pdf, png = tmp_path / "experts.pdf", tmp_path / "experts.png"
    plot_task_experts(table, zones, pdf, png)
    assert pdf.stat().st_size > 0
    assert png.stat().st_size > 0
    plot_task_experts(table, None, tmp_path / "no_zone.pdf", tmp_path / "no_zone.png")
    assert (tmp_path / "no_zone.png").stat().st_size > 0
