"""Alignment-zone choice on synthetic divergence and accuracy tables."""

import logging
import math

import polars as pl
import pytest

from ramoe.routing.zone import ZoneSettings, choose_zone, fallback_layers, pearson, spearman

# English accuracy 0.9, so the gaps acc_en - acc_lang are 0.1, 0.3, 0.5, 0.7 (mean 0.4).
ACCURACY = {"en": 0.9, "xa": 0.8, "xb": 0.6, "xc": 0.4, "xd": 0.2}


def accuracy_table(accuracy=ACCURACY, split="train"):
    rows = [{"model": "m", "task": "t", "lang": lang, "split": split, "n": 100, "accuracy": acc}
            for lang, acc in accuracy.items()]
    return pl.DataFrame(rows)


def divergence_table(means, slopes, langs=("xa", "xb", "xc", "xd")):
    """Parallel rows with Div(lang, l) = means[l] + slopes[l] * (gap - 0.4).

    Over the four languages the gaps average 0.4, so the mean over languages is means[l] and the
    correlation with the gap is +1 for a positive slope and -1 for a negative one.
    """
    rows = []
    for layer, mean in means.items():
        for lang in langs:
            gap = ACCURACY["en"] - ACCURACY[lang]
            value = mean + slopes[layer] * (gap - 0.4)
            rows.append({"model": "m", "task": "t", "lang": lang, "layer": layer, "comparison": "parallel",
                         "hjsd": value, "jsd": value / 2, "entropy": 1.0, "n_items": 10})
            rows.append({"model": "m", "task": "t", "lang": lang, "layer": layer,
                         "comparison": "control_nonparallel", "hjsd": 5.0, "jsd": 5.0, "entropy": 1.0, "n_items": 10})
    return pl.DataFrame(rows)


# 8 decoder layers, all MoE. Layers 3-5: low divergence that rises with the gap. Layer 0 correlates
# too but is an edge layer. Layer 1 correlates but its divergence 0.95 is above the median
# (sorted means 0.10, 0.12, 0.14, 0.80, 0.85, 0.90, 0.90, 0.95 give (0.80 + 0.85) / 2 = 0.825).
# Layers 2, 6 and 7 anti-correlate.
MEANS_8 = {0: 0.90, 1: 0.95, 2: 0.85, 3: 0.10, 4: 0.12, 5: 0.14, 6: 0.80, 7: 0.90}
SLOPES_8 = {0: 0.1, 1: 0.1, 2: -0.1, 3: 0.1, 4: 0.1, 5: 0.1, 6: -0.1, 7: -0.1}
LAYERS_8 = list(range(8))


def zone_row(zones):
    first, last, method = zones.select("first_layer", "last_layer", "method").unique().row(0)
    return first, last, method


def in_zone(zones):
    return zones.filter(pl.col("in_zone"))["layer"].to_list()


def test_zone_from_data():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    assert zone_row(zones) == (3, 5, "data")
    assert in_zone(zones) == [3, 4, 5]
    assert zones.filter(pl.col("candidate"))["layer"].to_list() == [3, 4, 5]


def test_zone_output_columns():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    assert zones.columns == ["model", "task", "layer", "divergence", "pearson", "spearman", "n_languages",
                             "candidate", "in_zone", "first_layer", "last_layer", "method"]
    assert zones["layer"].to_list() == LAYERS_8
    assert zones["n_languages"].unique().to_list() == [4]


def test_zone_reports_correlations_and_mean():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    by_layer = {row["layer"]: row for row in zones.iter_rows(named=True)}
    assert by_layer[3]["divergence"] == pytest.approx(0.10)
    assert by_layer[3]["pearson"] == pytest.approx(1.0)
    assert by_layer[3]["spearman"] == pytest.approx(1.0)
    assert by_layer[6]["spearman"] == pytest.approx(-1.0)


def test_zone_excludes_high_divergence_and_edges():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    by_layer = {row["layer"]: row for row in zones.iter_rows(named=True)}
    assert by_layer[1]["spearman"] == pytest.approx(1.0)
    assert by_layer[1]["candidate"] is False  # divergence 0.95 > median 0.825
    assert by_layer[0]["spearman"] == pytest.approx(1.0)
    assert by_layer[0]["candidate"] is False  # first MoE layer, edge_layers=1


def test_zone_pearson_metric():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings(metric="pearson"))
    assert zone_row(zones) == (3, 5, "data")


def test_zone_uses_accuracy_split():
    # Test-split accuracies reverse the gaps, so choosing on them would flip every correlation.
    reversed_accuracy = {"en": 0.9, "xa": 0.2, "xb": 0.4, "xc": 0.6, "xd": 0.8}
    accuracy = pl.concat([accuracy_table(), accuracy_table(reversed_accuracy, split="test")])
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy,
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    assert zone_row(zones) == (3, 5, "data")
    test_zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy,
                             moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings(accuracy_split="test"))
    assert zone_row(test_zones)[2] == "fallback"


def test_zone_tie_prefers_middle_block():
    # 12 layers, middle (12 - 1) / 2 = 5.5. Blocks {2, 3} (centre 2.5) and {6, 7} (centre 6.5) tie
    # on size, and {6, 7} is closer to the middle.
    means = {layer: 0.8 + 0.01 * layer for layer in range(12)}
    slopes = {layer: -0.1 for layer in range(12)}
    for layer in (2, 3, 6, 7):
        means[layer] = 0.1
        slopes[layer] = 0.1
    zones = choose_zone(divergence_table(means, slopes), accuracy_table(),
                        moe_layers=list(range(12)), num_layers=12, settings=ZoneSettings())
    assert zone_row(zones) == (6, 7, "data")


def test_zone_fallback_without_correlation(caplog):
    slopes = {layer: -0.1 for layer in LAYERS_8}
    with caplog.at_level(logging.WARNING, logger="ramoe.routing.zone"):
        zones = choose_zone(divergence_table(MEANS_8, slopes), accuracy_table(),
                            moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    # Relative depth layer / 8 in [0.375, 0.625): 3/8 = 0.375 and 4/8 = 0.5, while 5/8 = 0.625 is out.
    assert zone_row(zones) == (3, 4, "fallback")
    assert in_zone(zones) == [3, 4]
    assert zones["candidate"].any() is False
    assert "fallback zone [3, 4]" in caplog.text


def test_zone_fallback_single_candidate():
    # Only layer 4 is a candidate, a block of 1 < min_layers = 2.
    slopes = {layer: -0.1 for layer in LAYERS_8}
    slopes[4] = 0.1
    zones = choose_zone(divergence_table(MEANS_8, slopes), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    assert zone_row(zones) == (3, 4, "fallback")
    one_layer = choose_zone(divergence_table(MEANS_8, slopes), accuracy_table(),
                            moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings(min_layers=1))
    assert zone_row(one_layer) == (4, 4, "data")


def test_zone_fallback_few_languages(caplog):
    with caplog.at_level(logging.WARNING, logger="ramoe.routing.zone"):
        zones = choose_zone(divergence_table(MEANS_8, SLOPES_8, langs=("xa", "xb")), accuracy_table(),
                            moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())
    assert zone_row(zones) == (3, 4, "fallback")
    assert zones["spearman"].null_count() == 8
    assert zones["pearson"].null_count() == 8
    assert "too few for a correlation" in caplog.text


def test_zone_fallback_skips_dense_layer():
    # Layer 0 is dense. The fallback still uses depth over all 8 decoder layers.
    means = {layer: MEANS_8[layer] for layer in range(1, 8)}
    slopes = {layer: -0.1 for layer in range(1, 8)}
    zones = choose_zone(divergence_table(means, slopes), accuracy_table(),
                        moe_layers=list(range(1, 8)), num_layers=8, settings=ZoneSettings())
    assert zone_row(zones) == (3, 4, "fallback")
    assert zones["layer"].to_list() == list(range(1, 8))


def test_fallback_layers_at_least_one():
    # 4 layers with MoE at 0 and 3: depths 0 and 0.75, neither in [0.375, 0.625). 0.75 is closer to 0.5.
    assert fallback_layers([0, 3], 4, (0.375, 0.625)) == [3]
    assert fallback_layers(list(range(8)), 8, (0.375, 0.625)) == [3, 4]
    assert fallback_layers(list(range(16)), 16, (0.375, 0.625)) == [6, 7, 8, 9]


def test_zone_override_inside():
    zones = choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                        moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings(override=(2, 6)))
    assert zone_row(zones) == (2, 6, "override")
    assert in_zone(zones) == [2, 3, 4, 5, 6]


def test_zone_override_outside_raises():
    settings = ZoneSettings(override=(6, 9))
    with pytest.raises(ValueError, match=r"first_layer=6, last_layer=9.*1\.\.7"):
        choose_zone(divergence_table({layer: 0.5 for layer in range(1, 8)}, {layer: 0.1 for layer in range(1, 8)}),
                    accuracy_table(), moe_layers=list(range(1, 8)), num_layers=8, settings=settings)


def test_zone_override_on_dense_layer_raises():
    settings = ZoneSettings(override=(0, 3))
    with pytest.raises(ValueError, match="first_layer=0"):
        choose_zone(divergence_table({layer: 0.5 for layer in range(1, 8)}, {layer: 0.1 for layer in range(1, 8)}),
                    accuracy_table(), moe_layers=list(range(1, 8)), num_layers=8, settings=settings)


def test_zone_missing_english_accuracy_raises():
    accuracy = accuracy_table({lang: acc for lang, acc in ACCURACY.items() if lang != "en"})
    with pytest.raises(ValueError, match="no English row"):
        choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy,
                    moe_layers=LAYERS_8, num_layers=8, settings=ZoneSettings())


def test_zone_rejects_layer_outside_moe():
    with pytest.raises(ValueError, match=r"layers \[0\]"):
        choose_zone(divergence_table(MEANS_8, SLOPES_8), accuracy_table(),
                    moe_layers=list(range(1, 8)), num_layers=8, settings=ZoneSettings())


@pytest.mark.parametrize(
    "kwargs",
    [{"metric": "kendall"}, {"threshold": 1.5}, {"edge_layers": -1}, {"min_layers": 0},
     {"fallback": (0.6, 0.4)}, {"override": (5, 3)}],
)
def test_zone_settings_reject_invalid(kwargs):
    with pytest.raises(ValueError, match="invalid"):
        ZoneSettings(**kwargs)


def test_spearman_with_ties():
    # x ranks [2, 2, 2, 4] (ties averaged) against y ranks [1, 2, 3, 4]: deviations [-0.5, -0.5, -0.5, 1.5]
    # and [-1.5, -0.5, 0.5, 1.5], covariance sum 3, variance sums 3 and 5, so r = 3 / sqrt(15).
    assert spearman([0, 0, 0, 1], [0.1, 0.3, 0.5, 0.7]) == pytest.approx(3 / math.sqrt(15))


def test_spearman_monotone_is_one():
    assert spearman([1, 2, 3, 100], [0.1, 0.3, 0.5, 0.7]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 100], [0.1, 0.3, 0.5, 0.7]) < 0.8


def test_pearson_constant_is_nan():
    assert math.isnan(pearson([1, 1, 1], [0.1, 0.2, 0.3]))
