"""Entropy-normalised JSD, derangements and per-layer divergence on hand-computed cases."""

import math

import numpy as np
import polars as pl
import pytest

from ramoe.routing.divergence import (
    derangement,
    divergence_by_layer,
    divergence_table,
    entropy,
    jsd,
    normalized_jsd,
)
from ramoe.routing.figures import plot_divergence_by_layer

LN2 = math.log(2)


# ---- entropy, JSD and normalised JSD ----------------------------------------------------------


def test_entropy_uniform_is_log_e():
    for num_experts in (2, 4, 16):
        assert entropy(np.full(num_experts, 1 / num_experts)) == pytest.approx(math.log(num_experts))


def test_entropy_one_hot_is_zero():
    assert entropy(np.array([0.0, 1.0, 0.0])) == 0.0


def test_entropy_batched_shape():
    p = np.array([[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [0.5, 0.5]]])
    np.testing.assert_allclose(entropy(p), [[LN2, 0.0], [0.0, LN2]])


def test_jsd_disjoint_one_hot_is_ln2():
    assert jsd(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(LN2)


def test_jsd_identical_is_zero():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert jsd(p, p) == pytest.approx(0.0, abs=1e-15)


def test_normalized_jsd_disjoint_one_hot_is_one():
    # JSD = ln 2, and both entropies are 0, so the denominator is ln 2 - 0 = ln 2.
    assert normalized_jsd(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_normalized_jsd_hand_example_e4():
    p = np.array([0.5, 0.5, 0.0, 0.0])
    q = np.array([0.5, 0.0, 0.5, 0.0])
    # M = [0.5, 0.25, 0.25, 0] (the last entry clamps to 1e-10, but P = Q = 0 there).
    # KL(P||M) = 0.5 ln(0.5/0.5) + 0.5 ln(0.5/0.25) = 0.5 ln 2, and KL(Q||M) = 0.5 ln 2 likewise,
    # so JSD = (0.5 ln 2 + 0.5 ln 2) / 2 = 0.5 ln 2.
    # H(P) = H(Q) = ln 2, so the denominator is ln 4 - (ln 2 + ln 2) / 2 = ln 2.
    # D = 0.5 ln 2 / ln 2 = 0.5.
    assert jsd(p, q) == pytest.approx(0.5 * LN2)
    assert normalized_jsd(p, q) == pytest.approx(0.5)


def test_normalized_jsd_uniform_pair_is_zero_not_nan():
    # log E - mean entropy = ln 4 - ln 4 = 0 is clamped at 1e-6, so D = 0 / 1e-6 = 0.
    uniform = np.full(4, 0.25)
    with np.errstate(all="raise"):
        value = normalized_jsd(uniform, uniform)
    assert value == 0.0


def test_normalized_jsd_denominator_clamp():
    # P = [0.5 + d, 0.5 - d] and Q = [0.5 - d, 0.5 + d] with d = 1e-4: JSD is about 2 d^2 = 2e-8
    # and log 2 - H is also about 2 d^2 = 2e-8, below 1e-6, so D = JSD / 1e-6, about 0.02.
    d = 1e-4
    p = np.array([0.5 + d, 0.5 - d])
    q = np.array([0.5 - d, 0.5 + d])
    assert jsd(p, q) == pytest.approx(2 * d**2, rel=1e-3)
    assert normalized_jsd(p, q) == pytest.approx(jsd(p, q) / 1e-6)
    assert normalized_jsd(p, q) == pytest.approx(0.02, rel=1e-3)


def test_jsd_zeros_are_finite():
    # Zeros where both P and Q are 0 (M clamps to 1e-10) and where only one is 0.
    p = np.array([1.0, 0.0, 0.0])
    q = np.array([0.0, 1.0, 0.0])
    with np.errstate(all="raise"):
        value = jsd(p, q)
        same = jsd(p, p)
    assert value == pytest.approx(LN2)
    assert same == 0.0


def test_jsd_mixture_clamp_tiny_mass():
    # P[0] = 1e-12 and Q[0] = 0 give M[0] = 5e-13, clamped to 1e-10. The result stays finite.
    p = np.array([1e-12, 1 - 1e-12])
    q = np.array([0.0, 1.0])
    with np.errstate(all="raise"):
        value = jsd(p, q)
    assert np.isfinite(value)
    assert abs(value) < 1e-10


def test_jsd_rejects_negative():
    with pytest.raises(ValueError, match="negative"):
        jsd(np.array([1.5, -0.5]), np.array([0.5, 0.5]))


def test_jsd_rejects_expert_mismatch():
    with pytest.raises(ValueError, match="same number of experts"):
        jsd(np.array([0.5, 0.5]), np.array([0.2, 0.3, 0.5]))


# ---- derangement ------------------------------------------------------------------------------


def test_derangement_has_no_fixed_points():
    for n in range(2, 30):
        for seed in range(5):
            permutation = derangement(n, seed)
            assert sorted(permutation.tolist()) == list(range(n))
            assert not np.any(permutation == np.arange(n))


def test_derangement_is_deterministic():
    np.testing.assert_array_equal(derangement(50, 7), derangement(50, 7))


def test_derangement_depends_on_seed():
    assert not np.array_equal(derangement(50, 0), derangement(50, 1))


def test_derangement_of_two_swaps():
    np.testing.assert_array_equal(derangement(2, 123), [1, 0])


def test_derangement_rejects_one_element():
    with pytest.raises(ValueError, match="n=1"):
        derangement(1, 0)


# ---- divergence_by_layer on a 2-item, 2-layer table -------------------------------------------


def trace(lang, rows):
    return pl.DataFrame(
        [
            {"item_id": item, "lang": lang, "layer": layer, "n_tokens": 5, "probs": probs,
             "topk_counts": [0] * len(probs), "entropy": ent}
            for item, layer, probs, ent in rows
        ]
    )


# E = 2. Rows: (item_id, layer, probs, per-sequence mean entropy). Items are listed out of order.
ENGLISH = trace("en", [
    ("i2", 1, [0.0, 1.0], 2.0), ("i1", 1, [1.0, 0.0], 1.0),
    ("i1", 2, [0.5, 0.5], 3.0), ("i2", 2, [0.5, 0.5], 4.0),
])
TARGET = trace("xa", [
    ("i1", 1, [1.0, 0.0], 0.0), ("i2", 1, [0.0, 1.0], 0.2),
    ("i1", 2, [1.0, 0.0], 0.4), ("i2", 2, [0.5, 0.5], 0.6),
])

# [0.5, 0.5] against [1, 0]: M = [0.75, 0.25].
# KL(P||M) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3), KL(Q||M) = 1 ln(1/0.75) = ln(4/3),
# so JSD = (0.5 + 1) ln(4/3) / 2 = 0.75 ln(4/3).
# H(P) = ln 2 and H(Q) = 0, so the denominator is ln 2 - ln 2 / 2 = 0.5 ln 2 and D = 1.5 ln(4/3) / ln 2.
HALF_VS_ONE_HOT_JSD = 0.75 * math.log(4 / 3)
HALF_VS_ONE_HOT_D = 1.5 * math.log(4 / 3) / LN2


def values(frame, comparison, layer):
    row = frame.filter((pl.col("comparison") == comparison) & (pl.col("layer") == layer))
    assert row.height == 1
    return row.row(0, named=True)


def test_divergence_columns():
    frame = divergence_by_layer(ENGLISH, TARGET, model="m", task="t")
    assert frame.columns == ["model", "task", "lang", "layer", "comparison", "hjsd", "jsd", "entropy", "n_items"]
    assert frame.height == 6


def test_divergence_parallel_hand_values():
    frame = divergence_by_layer(ENGLISH, TARGET, model="m", task="t")
    # Layer 1: i1 [1,0] vs [1,0] and i2 [0,1] vs [0,1] are identical, so 0.
    layer1 = values(frame, "parallel", 1)
    assert layer1["hjsd"] == pytest.approx(0.0, abs=1e-12)
    assert layer1["jsd"] == pytest.approx(0.0, abs=1e-12)
    assert layer1["entropy"] == pytest.approx((0.0 + 0.2) / 2)
    assert layer1["lang"] == "xa"
    assert layer1["n_items"] == 2
    # Layer 2: i1 [0.5,0.5] vs [1,0] (values above) and i2 [0.5,0.5] vs [0.5,0.5] = 0, mean of the two.
    layer2 = values(frame, "parallel", 2)
    assert layer2["hjsd"] == pytest.approx(HALF_VS_ONE_HOT_D / 2)
    assert layer2["jsd"] == pytest.approx(HALF_VS_ONE_HOT_JSD / 2)
    assert layer2["entropy"] == pytest.approx((0.4 + 0.6) / 2)


def test_divergence_nonparallel_hand_values():
    frame = divergence_by_layer(ENGLISH, TARGET, model="m", task="t")
    # With 2 items the only derangement swaps them: English i1 meets xa i2 and English i2 meets xa i1.
    # Layer 1: [1,0] vs [0,1] and [0,1] vs [1,0], each JSD = ln 2 and D = 1.
    layer1 = values(frame, "control_nonparallel", 1)
    assert layer1["hjsd"] == pytest.approx(1.0)
    assert layer1["jsd"] == pytest.approx(LN2)
    assert layer1["lang"] == "xa"
    # Layer 2: English i1 [0.5,0.5] vs xa i2 [0.5,0.5] = 0 and English i2 [0.5,0.5] vs xa i1 [1,0].
    layer2 = values(frame, "control_nonparallel", 2)
    assert layer2["hjsd"] == pytest.approx(HALF_VS_ONE_HOT_D / 2)
    assert layer2["jsd"] == pytest.approx(HALF_VS_ONE_HOT_JSD / 2)
    assert layer2["entropy"] == pytest.approx(0.5)


def test_divergence_english_control_hand_values():
    frame = divergence_by_layer(ENGLISH, TARGET, model="m", task="t")
    # Layer 1: English i1 [1,0] vs English i2 [0,1] in both directions, so JSD = ln 2 and D = 1.
    layer1 = values(frame, "control_english", 1)
    assert layer1["hjsd"] == pytest.approx(1.0)
    assert layer1["jsd"] == pytest.approx(LN2)
    assert layer1["lang"] == "en"
    assert layer1["entropy"] == pytest.approx((1.0 + 2.0) / 2)
    # Layer 2: both English items are [0.5, 0.5], so 0.
    layer2 = values(frame, "control_english", 2)
    assert layer2["hjsd"] == pytest.approx(0.0, abs=1e-12)
    assert layer2["jsd"] == pytest.approx(0.0, abs=1e-12)
    assert layer2["entropy"] == pytest.approx((3.0 + 4.0) / 2)


def as_trace_dtypes(frame):
    """Cast to the column types that ramoe.routing.traces writes (int16 layer, float32 probs)."""
    return frame.with_columns(
        pl.col("layer").cast(pl.Int16), pl.col("n_tokens").cast(pl.Int32),
        pl.col("probs").cast(pl.List(pl.Float32)), pl.col("topk_counts").cast(pl.List(pl.Int32)),
        pl.col("entropy").cast(pl.Float32),
    )


def test_divergence_accepts_trace_dtypes():
    frame = divergence_by_layer(as_trace_dtypes(ENGLISH), as_trace_dtypes(TARGET), model="m", task="t")
    assert frame["layer"].dtype == pl.Int64
    assert values(frame, "control_nonparallel", 1)["hjsd"] == pytest.approx(1.0)
    assert values(frame, "parallel", 2)["hjsd"] == pytest.approx(HALF_VS_ONE_HOT_D / 2, rel=1e-6)


def test_divergence_drops_unmatched_items():
    extra = trace("xa", [("i3", 1, [0.5, 0.5], 0.0), ("i3", 2, [0.5, 0.5], 0.0)])
    frame = divergence_by_layer(ENGLISH, pl.concat([TARGET, extra]), model="m", task="t")
    parallel = frame.filter(pl.col("comparison") == "parallel")
    assert parallel["n_items"].to_list() == [2, 2]
    assert values(frame, "parallel", 1)["hjsd"] == pytest.approx(0.0, abs=1e-12)


def test_divergence_rejects_layer_mismatch():
    with pytest.raises(ValueError, match="different layers"):
        divergence_by_layer(ENGLISH, TARGET.filter(pl.col("layer") == 1), model="m", task="t")


def test_divergence_rejects_one_parallel_item():
    with pytest.raises(ValueError, match="at least 2 parallel items"):
        divergence_by_layer(ENGLISH, TARGET.filter(pl.col("item_id") == "i1"), model="m", task="t")


def test_divergence_rejects_unnormalised_probs():
    broken = TARGET.with_columns(pl.when(pl.col("item_id") == "i1").then(pl.lit([0.2, 0.2])).otherwise(pl.col("probs"))
                                 .alias("probs"))
    with pytest.raises(ValueError, match="do not sum to 1"):
        divergence_by_layer(ENGLISH, broken, model="m", task="t")


def test_divergence_table_english_control_once():
    other = TARGET.with_columns(pl.lit("xb").alias("lang"))
    frame = divergence_table(ENGLISH, {"xa": TARGET, "xb": other}, model="m", task="t")
    english = frame.filter(pl.col("comparison") == "control_english")
    assert english.height == 2
    assert english["lang"].unique().to_list() == ["en"]
    assert sorted(frame.filter(pl.col("comparison") == "parallel")["lang"].unique().to_list()) == ["xa", "xb"]


def test_divergence_table_rejects_wrong_language_key():
    with pytest.raises(ValueError, match="contains language"):
        divergence_table(ENGLISH, {"xb": TARGET}, model="m", task="t")


# ---- figure -----------------------------------------------------------------------------------


def test_plot_divergence_writes_files(tmp_path):
    other = TARGET.with_columns(pl.lit("xb").alias("lang"))
    frame = divergence_table(ENGLISH, {"xa": TARGET, "xb": other}, model="m", task="t")
    accuracy = pl.DataFrame({
        "model": ["m"] * 3, "task": ["t"] * 3, "lang": ["en", "xa", "xb"], "split": ["train"] * 3,
        "n": [10] * 3, "accuracy": [0.9, 0.6, 0.3],
    })
    zones = pl.DataFrame({"model": ["m"], "task": ["t"], "layer": [1], "first_layer": [1], "last_layer": [2],
                          "method": ["override"]})
    pdf, png = tmp_path / "divergence.pdf", tmp_path / "divergence.png"
    plot_divergence_by_layer(frame, accuracy, pdf, png, zones=zones)
    assert pdf.stat().st_size > 0
    assert png.stat().st_size > 0
