"""Statistics, result tables and figures of the method comparison, on hand-made data."""

import math

import numpy as np
import polars as pl
import pytest

from ramoe.analysis.figures import merged_labels, plot_ci_vs_gain, plot_main_results
from ramoe.analysis.results import METHODS, ci_vs_gain, main_results, method_summary
from ramoe.analysis.stats import bootstrap_mean_ci, correlation, paired_difference

N_BOOT = 500
N_PERM = 2000


def examples(patterns, parse_failures=frozenset()):
    """Build a per-example frame from {(method, seed, lang, train_lang): "1010"}, one character per item.

    Item ids are "0", "1", ... by position. ``parse_failures`` contains (method, seed, lang, train_lang, item_id).
    """
    rows = []
    for (method, seed, lang, train_lang), pattern in patterns.items():
        for index, flag in enumerate(pattern):
            item = str(index)
            rows.append({
                "model": "m", "method": method, "seed": seed, "task": "t", "lang": lang, "train_lang": train_lang,
                "split": "test", "item_id": item, "correct": flag == "1",
                "parse_failure": (method, seed, lang, train_lang, item) in parse_failures,
            })
    return pl.DataFrame(rows, schema_overrides={"train_lang": pl.String})


# Two target languages (xa, xb) and English, 4 test items; fine-tuned methods have seeds 0 and 1.
PATTERNS = {
    ("base", 0, "en", None): "1110",
    ("base", 0, "xa", None): "1000",
    ("base", 0, "xb", None): "0000",
    ("steering", 0, "en", None): "1110",
    ("steering", 0, "xa", None): "1100",
    ("steering", 0, "xb", None): "1000",
    ("sft", 0, "xa", "xa"): "1100", ("sft", 1, "xa", "xa"): "1010",
    ("ramoe", 0, "xa", "xa"): "1110", ("ramoe", 1, "xa", "xa"): "1101",
    ("rise", 0, "xa", "xa"): "1000", ("rise", 1, "xa", "xa"): "1100",
    ("sft", 0, "xb", "xb"): "1000", ("sft", 1, "xb", "xb"): "0000",
    ("ramoe", 0, "xb", "xb"): "1100", ("ramoe", 1, "xb", "xb"): "1000",
    ("rise", 0, "xb", "xb"): "0000", ("rise", 1, "xb", "xb"): "0000",
    # English after fine-tuning on xa and on xb.
    ("sft", 0, "en", "xa"): "1100", ("sft", 1, "en", "xa"): "1110",
    ("ramoe", 0, "en", "xa"): "1110", ("ramoe", 1, "en", "xa"): "1110",
    ("rise", 0, "en", "xa"): "1110", ("rise", 1, "en", "xa"): "1111",
    ("sft", 0, "en", "xb"): "1000", ("sft", 1, "en", "xb"): "1100",
    ("ramoe", 0, "en", "xb"): "1110", ("ramoe", 1, "en", "xb"): "1100",
    ("rise", 0, "en", "xb"): "1110", ("rise", 1, "en", "xb"): "1110",
}
# Base fails to parse items 0 and 1 in xb.
PARSE_FAILURES = {("base", 0, "xb", None, "0"), ("base", 0, "xb", None, "1")}
# A train row that must be ignored: it would raise base xa accuracy if counted.
TRAIN_ROW = {"model": "m", "method": "base", "seed": 0, "task": "t", "lang": "xa", "train_lang": None,
             "split": "train", "item_id": "9", "correct": True, "parse_failure": False}
HAND_MADE = pl.concat([examples(PATTERNS, PARSE_FAILURES), pl.DataFrame([TRAIN_ROW],
                                                                         schema_overrides={"train_lang": pl.String})])


def row(frame, **keys):
    selected = frame.filter(pl.all_horizontal(pl.col(name) == value for name, value in keys.items()))
    assert selected.height == 1, f"expected one row for {keys}, got {selected.height}"
    return selected.row(0, named=True)


# bootstrap_mean_ci


def test_bootstrap_mean_exact_and_covered():
    values = np.array([1, 0, 1, 1, 0, 1, 1, 0, 1, 1], dtype=float)
    mean, low, high = bootstrap_mean_ci(values, n_boot=N_BOOT, seed=3)
    assert mean == pytest.approx(0.7)
    assert low <= mean <= high
    assert low < high
    assert low >= 0.0
    assert high <= 1.0


def test_bootstrap_constant_zero_width():
    assert bootstrap_mean_ci(np.full(7, 0.1), n_boot=N_BOOT) == (pytest.approx(0.1),) * 3
    mean, low, high = bootstrap_mean_ci(np.full(7, 0.1), n_boot=N_BOOT)
    assert low == high == mean


def test_bootstrap_single_item():
    assert bootstrap_mean_ci(np.array([0.25])) == (0.25, 0.25, 0.25)
    assert bootstrap_mean_ci(np.array([[1.0, 0.0]])) == (0.5, 0.5, 0.5)


def test_bootstrap_deterministic_with_seed():
    values = np.random.default_rng(1).integers(0, 2, size=50)
    assert bootstrap_mean_ci(values, n_boot=N_BOOT, seed=7) == bootstrap_mean_ci(values, n_boot=N_BOOT, seed=7)
    assert bootstrap_mean_ci(values, n_boot=N_BOOT, seed=7) != bootstrap_mean_ci(values, n_boot=N_BOOT, seed=8)


def test_bootstrap_2d_averages_seeds():
    # Per-item seed means are 0.5, 1.0, 0.0, 0.5, mean 0.5.
    values = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=float)
    mean, low, high = bootstrap_mean_ci(values, n_boot=N_BOOT, seed=2)
    assert mean == pytest.approx(0.5)
    # Resampling rows of the matrix is resampling the per-item means with the same draws.
    assert (mean, low, high) == bootstrap_mean_ci(np.array([0.5, 1.0, 0.0, 0.5]), n_boot=N_BOOT, seed=2)
    # Treating the 8 cells as items would resample something else and give another interval.
    assert (low, high) != bootstrap_mean_ci(values.ravel(), n_boot=N_BOOT, seed=2)[1:]


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="level=1.5"):
        bootstrap_mean_ci(np.array([1.0, 0.0]), level=1.5)


# paired_difference


def test_paired_known_difference():
    a = np.array([1, 1, 1, 0, 1, 0])
    b = np.array([1, 0, 0, 0, 1, 1])
    # d = 0, 1, 1, 0, 0, -1: mean 1/6.
    result = paired_difference(a, b, n_boot=N_BOOT, n_perm=N_PERM)
    assert result["diff"] == pytest.approx(1 / 6)
    assert result["ci_low"] <= result["diff"] <= result["ci_high"]
    assert result["n_items"] == 6
    assert 0.0 < result["p_value"] <= 1.0


def test_paired_2d_averages_seeds_per_item():
    a = np.array([[1, 1], [1, 0], [0, 0], [1, 1]])
    b = np.array([[1, 0], [0, 0], [0, 0], [1, 1]])
    # d = 0.5, 0.5, 0, 0: mean 0.25.
    result = paired_difference(a, b, n_boot=N_BOOT, n_perm=N_PERM)
    assert result["diff"] == pytest.approx(0.25)
    assert result["n_items"] == 4


def test_paired_identical_inputs():
    a = np.array([[1, 0], [0, 1], [1, 1]])
    result = paired_difference(a, a.copy(), n_boot=N_BOOT, n_perm=N_PERM)
    assert result["diff"] == 0.0
    assert result["ci_low"] == result["ci_high"] == 0.0
    assert result["p_value"] == 1.0


def test_paired_clear_win_significant():
    a = np.ones(40)
    b = np.zeros(40)
    b[:3] = 1.0
    result = paired_difference(a, b, n_boot=N_BOOT, n_perm=N_PERM, seed=5)
    assert result["diff"] == pytest.approx(37 / 40)
    assert result["p_value"] < 0.01
    # No sign flip reaches the observed mean, so only the +1 correction remains.
    assert result["p_value"] == pytest.approx(1 / (1 + N_PERM))


def test_paired_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        paired_difference(np.zeros((4, 2)), np.zeros((4, 3)))


def test_paired_deterministic_with_seed():
    a = np.random.default_rng(0).integers(0, 2, size=(30, 2))
    b = np.random.default_rng(1).integers(0, 2, size=(30, 2))
    first = paired_difference(a, b, n_boot=N_BOOT, n_perm=N_PERM, seed=4)
    assert first == paired_difference(a, b, n_boot=N_BOOT, n_perm=N_PERM, seed=4)


# correlation


def test_correlation_known_pearson():
    # dx = -1.5, -0.5, 0.5, 1.5 and dy = -3, -1, 0, 4: r = 11 / sqrt(5 * 26).
    result = correlation([1, 2, 3, 4], [2, 4, 5, 9])
    assert result["pearson"] == pytest.approx(11 / math.sqrt(130))
    assert result["spearman"] == pytest.approx(1.0)
    assert result["n"] == 4


def test_correlation_spearman_monotone():
    x = np.array([0.1, 0.5, 1.0, 2.0, 3.0])
    assert correlation(x, x**3)["spearman"] == pytest.approx(1.0)
    assert correlation(x, np.exp(-x))["spearman"] == pytest.approx(-1.0)
    assert correlation(x, x**3)["pearson"] < 1.0


def test_correlation_spearman_ties():
    # Ranks with ties averaged: x -> 1, 2.5, 2.5, 4 and y -> 1, 2, 3, 4.
    expected = correlation([1, 2.5, 2.5, 4], [1, 2, 3, 4])["pearson"]
    assert correlation([0, 1, 1, 5], [1, 2, 3, 4])["spearman"] == pytest.approx(expected)


def test_correlation_undefined_cases():
    two = correlation([1, 2], [3, 5])
    assert math.isnan(two["pearson"])
    assert math.isnan(two["spearman"])
    assert two["n"] == 2
    constant = correlation([1, 1, 1, 1], [1, 2, 3, 4])
    assert math.isnan(constant["pearson"])
    assert math.isnan(constant["spearman"])


def test_correlation_drops_nan_pairs():
    result = correlation([1, 2, np.nan, 3, 4], [2, 4, 7, 5, 9])
    assert result["n"] == 4
    assert result["pearson"] == pytest.approx(11 / math.sqrt(130))


# main_results and method_summary


def test_main_results_accuracy_by_hand():
    table = main_results(HAND_MADE, n_boot=N_BOOT, seed=0)
    assert row(table, method="base", lang="xa")["accuracy"] == 0.25
    assert row(table, method="base", lang="xa")["n"] == 4
    assert row(table, method="steering", lang="xb")["accuracy"] == 0.25
    assert row(table, method="sft", lang="xa", seed=1)["accuracy"] == 0.5
    assert row(table, method="ramoe", lang="xb", seed=0)["accuracy"] == 0.5
    assert row(table, method="rise", lang="en", train_lang="xa", seed=1)["accuracy"] == 1.0
    assert row(table, method="base", lang="xb")["parse_failure_rate"] == 0.5
    assert row(table, method="base", lang="en")["parse_failure_rate"] == 0.0
    # 2 base/steering x 3 langs + 3 fine-tuned x 2 seeds x 4 (lang, train_lang) pairs.
    assert table.height == 6 + 24


def test_main_results_train_lang_and_ci():
    table = main_results(HAND_MADE, n_boot=N_BOOT, seed=0)
    assert set(table.filter(pl.col("method").is_in(["base", "steering"]))["train_lang"].to_list()) == {""}
    assert table["train_lang"].null_count() == 0
    for record in table.iter_rows(named=True):
        assert record["ci_low"] <= record["accuracy"] <= record["ci_high"]
    assert table.columns == ["model", "task", "lang", "train_lang", "method", "seed", "n", "accuracy", "ci_low",
                             "ci_high", "parse_failure_rate", "f1"]
    # No span-answer task and no score column: f1 is null.
    assert table["f1"].null_count() == table.height


def test_f1_of_span_answers_by_hand():
    """Token F1 averages over items (and over seeds in the summary); exact match stays the accuracy."""
    span_rows = examples({("base", 0, "de", None): "10", ("sft", 0, "de", "de"): "11",
                          ("sft", 1, "de", "de"): "01"}, set())
    scores = {("base", 0): [1.0, 0.5], ("sft", 0): [1.0, 1.0], ("sft", 1): [0.25, 1.0]}
    span_rows = span_rows.with_columns(
        score=pl.Series([value for key in scores for value in scores[key]], dtype=pl.Float64),
        task=pl.lit("xquad"),
    )
    numeric_rows = examples({("base", 0, "de", None): "10"}, set()).with_columns(score=pl.lit(None, pl.Float64))
    frame = pl.concat([span_rows, numeric_rows])

    table = main_results(frame, n_boot=N_BOOT, seed=0)
    assert row(table, task="xquad", method="base")["f1"] == 0.75
    assert row(table, task="xquad", method="base")["accuracy"] == 0.5
    assert row(table, task="xquad", method="sft", seed=1)["f1"] == 0.625
    assert row(table, task="t", method="base")["f1"] is None

    summary = method_summary(frame, n_boot=N_BOOT, seed=0)
    assert row(summary, task="xquad", method="sft")["f1"] == pytest.approx((1.0 + 1.0 + 0.25 + 1.0) / 4)
    assert row(summary, task="xquad", method="sft")["accuracy"] == 0.75
    assert row(summary, task="t", method="base")["f1"] is None


def test_main_results_method_order():
    table = main_results(HAND_MADE, n_boot=N_BOOT, seed=0)
    xa = table.filter(pl.col("lang") == "xa")
    assert xa.select("method", "seed").rows() == [
        ("base", 0), ("steering", 0), ("sft", 0), ("sft", 1), ("ramoe", 0), ("ramoe", 1), ("rise", 0), ("rise", 1),
    ]
    assert table["lang"].to_list() == sorted(table["lang"].to_list())
    english = table.filter(pl.col("lang") == "en").select("method", "train_lang", "seed").rows()
    assert english[:4] == [("base", "", 0), ("steering", "", 0), ("sft", "xa", 0), ("sft", "xa", 1)]


def test_main_results_unknown_method():
    broken = HAND_MADE.with_columns(pl.col("method").replace({"rise": "lora"}))
    with pytest.raises(ValueError, match="'lora'"):
        main_results(broken, n_boot=N_BOOT, seed=0)


def test_main_results_duplicate_item():
    duplicated = pl.concat([HAND_MADE, HAND_MADE.filter(pl.col("split") == "test").head(1)])
    with pytest.raises(ValueError, match="repeat an item"):
        main_results(duplicated, n_boot=N_BOOT, seed=0)


def test_fine_tuned_without_train_lang():
    broken = HAND_MADE.with_columns(
        pl.when(pl.col("method") == "sft").then(None).otherwise(pl.col("train_lang")).alias("train_lang"))
    with pytest.raises(ValueError, match="empty train_lang"):
        main_results(broken, n_boot=N_BOOT, seed=0)


def test_method_summary_by_hand():
    summary = method_summary(HAND_MADE, n_boot=N_BOOT, seed=0)
    sft = row(summary, method="sft", lang="xa")
    assert (sft["n_seeds"], sft["n"], sft["accuracy"]) == (2, 4, 0.5)
    assert sft["gain_over_base"] == pytest.approx(0.25)
    assert row(summary, method="ramoe", lang="xa")["accuracy"] == 0.75
    assert row(summary, method="rise", lang="xa")["accuracy"] == 0.375
    assert row(summary, method="ramoe", lang="xb")["accuracy"] == 0.375
    assert row(summary, method="ramoe", lang="xb")["gain_over_base"] == pytest.approx(0.375)
    # English after fine-tuning on xb: sft seeds 0.25 and 0.5, base English 0.75.
    english = row(summary, method="sft", lang="en", train_lang="xb")
    assert english["accuracy"] == pytest.approx(0.375)
    assert english["gain_over_base"] == pytest.approx(-0.375)
    base = row(summary, method="base", lang="xa")
    assert (base["train_lang"], base["n_seeds"], base["gain_over_base"]) == ("", 1, 0.0)
    assert row(summary, method="base", lang="xb")["parse_failure_rate"] == 0.5


def test_method_summary_ci_over_items():
    summary = method_summary(HAND_MADE, n_boot=N_BOOT, seed=0)
    # Per-item means of ramoe on xa over seeds 0 and 1: 1, 1, 0.5, 0.5.
    expected = bootstrap_mean_ci(np.array([1.0, 1.0, 0.5, 0.5]), n_boot=N_BOOT, seed=0)
    ramoe = row(summary, method="ramoe", lang="xa")
    assert (ramoe["accuracy"], ramoe["ci_low"], ramoe["ci_high"]) == pytest.approx(expected)


def test_method_summary_order():
    summary = method_summary(HAND_MADE, n_boot=N_BOOT, seed=0)
    assert summary.filter(pl.col("lang") == "xb")["method"].to_list() == list(METHODS)


def test_method_summary_seed_missing_item():
    broken = HAND_MADE.filter(~((pl.col("method") == "sft") & (pl.col("seed") == 1) & (pl.col("lang") == "xa")
                                & (pl.col("item_id") == "2")))
    with pytest.raises(ValueError, match=r"\('2', 1\)"):
        method_summary(broken, n_boot=N_BOOT, seed=0)


# ci_vs_gain

# Three target languages, 4 items, seeds 0 and 1; ramoe also has seed 2, which sft lacks.
GAIN_PATTERNS = {
    # xa: sft per item 1, 1, 0, 0 and ramoe 1, 1, 0.5, 0: gain 0.125.
    ("sft", 0, "xa", "xa"): "1100", ("sft", 1, "xa", "xa"): "1100",
    ("ramoe", 0, "xa", "xa"): "1110", ("ramoe", 1, "xa", "xa"): "1100", ("ramoe", 2, "xa", "xa"): "1111",
    # xb: sft 1, 0, 0, 0 and ramoe 1, 1, 1, 0: gain 0.5.
    ("sft", 0, "xb", "xb"): "1000", ("sft", 1, "xb", "xb"): "1000",
    ("ramoe", 0, "xb", "xb"): "1110", ("ramoe", 1, "xb", "xb"): "1110",
    # xc: identical results, gain 0.
    ("sft", 0, "xc", "xc"): "1100", ("sft", 1, "xc", "xc"): "1010",
    ("ramoe", 0, "xc", "xc"): "1100", ("ramoe", 1, "xc", "xc"): "1010",
    # English rows after fine-tuning must not enter the comparison.
    ("sft", 0, "en", "xa"): "0000", ("ramoe", 0, "en", "xa"): "1111",
}
CATEGORIES = pl.DataFrame({
    "model": ["m", "m", "m"], "task": ["t", "t", "t"], "lang": ["xa", "xb", "xc"], "n": [8, 8, 8],
    "cc": [0.5, 0.25, 0.5], "ci": [0.25, 0.5, 0.0], "ic": [0.125, 0.125, 0.25], "ii": [0.125, 0.125, 0.25],
})


def gain_table():
    return ci_vs_gain(examples(GAIN_PATTERNS), CATEGORIES, n_boot=N_BOOT, n_perm=N_PERM, seed=0)


def test_ci_vs_gain_by_hand():
    table = gain_table()
    assert table["lang"].to_list() == ["xa", "xb", "xc"]
    xa = row(table, lang="xa")
    assert (xa["ci_share"], xa["n_ci"], xa["n_items"], xa["n_seeds"]) == (0.25, 2, 4, 2)
    assert (xa["sft_accuracy"], xa["ramoe_accuracy"]) == (0.5, 0.625)
    assert xa["gain"] == pytest.approx(0.125)
    xb = row(table, lang="xb")
    assert (xb["ci_share"], xb["n_ci"]) == (0.5, 4)
    assert xb["gain"] == pytest.approx(0.5)
    assert xb["gain_ci_low"] <= xb["gain"] <= xb["gain_ci_high"]
    assert 0.0 < xb["p_value"] <= 1.0


def test_ci_vs_gain_zero_ci_kept(caplog):
    with caplog.at_level("WARNING", logger="ramoe.analysis.results"):
        table = gain_table()
    xc = row(table, lang="xc")
    assert (xc["n_ci"], xc["gain"], xc["p_value"]) == (0, 0.0, 1.0)
    messages = [record.getMessage() for record in caplog.records if "no ci train items" in record.getMessage()]
    assert len(messages) == 1
    assert "'xc'" in messages[0]


def test_ci_vs_gain_correlation_columns():
    table = gain_table()
    # x = 0.25, 0.5, 0 and y = 3/24, 12/24, 0: dx = (0, 1, -1) / 4, dy = (-2, 7, -5) / 24, r = 12 / sqrt(156).
    assert table["pearson_r"].to_list() == pytest.approx([12 / math.sqrt(156)] * 3)
    assert table["spearman_r"].to_list() == pytest.approx([1.0] * 3)
    assert table["n_pairs"].to_list() == [3, 3, 3]


def test_ci_vs_gain_missing_item():
    patterns = dict(GAIN_PATTERNS)
    broken = examples(patterns).filter(
        ~((pl.col("method") == "sft") & (pl.col("lang") == "xb") & (pl.col("item_id") == "3")))
    with pytest.raises(ValueError, match=r"'sft' lacks 1 test items.*\['3'\]"):
        ci_vs_gain(broken, CATEGORIES, n_boot=N_BOOT, n_perm=N_PERM, seed=0)


def test_ci_vs_gain_missing_categories():
    with pytest.raises(ValueError, match="lang 'xb'"):
        ci_vs_gain(examples(GAIN_PATTERNS), CATEGORIES.filter(pl.col("lang") != "xb"), n_boot=N_BOOT,
                   n_perm=N_PERM, seed=0)


# figures


def assert_written(pdf, png):
    assert pdf.read_bytes().startswith(b"%PDF")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_main_results_writes(tmp_path):
    summary = method_summary(HAND_MADE, n_boot=N_BOOT, seed=0)
    pdf, png = tmp_path / "main_results.pdf", tmp_path / "main_results.png"
    plot_main_results(summary, pdf, png)
    assert_written(pdf, png)


def test_plot_ci_vs_gain_writes(tmp_path):
    pdf, png = tmp_path / "ci_vs_gain.pdf", tmp_path / "ci_vs_gain.png"
    plot_ci_vs_gain(gain_table(), pdf, png)
    assert_written(pdf, png)


def test_plot_ci_vs_gain_two_points(tmp_path):
    # Two points: no fit line and an undefined correlation must still plot.
    table = gain_table().filter(pl.col("lang") != "xc").with_columns(
        pearson_r=pl.lit(float("nan")), spearman_r=pl.lit(float("nan")), n_pairs=pl.lit(2))
    pdf, png = tmp_path / "two.pdf", tmp_path / "two.png"
    plot_ci_vs_gain(table, pdf, png)
    assert_written(pdf, png)


def test_merged_labels_join_overlapping_points():
    labels = ["xa", "xb", "xc", "xd"]
    x = np.array([0.0, 0.007, 0.44, 0.01])
    y = np.array([0.0, 0.0, 0.0, 0.0005])
    # Spans 0.88 (x) and 0.09 (y): xa, xb and xd lie within 3% of both, xc is far away on x.
    merged = merged_labels(labels, x, y, (0.88, 0.09))
    assert merged == [("xa, xb, xd", 0.0, 0.0), ("xc", 0.44, 0.0)]
    assert merged_labels(["xa", "xb"], np.array([0.1, 0.9]), np.array([0.0, 0.0]), (0.8, 0.0)) == [
        ("xa", 0.1, 0.0), ("xb", 0.9, 0.0)]
