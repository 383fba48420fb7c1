"""Alignment zone: the block of MoE layers where routing divergence from English tracks the accuracy gap.

Per layer l, the divergence Div(lang, l) of the parallel comparison is correlated across target
languages with the gap acc_en - acc_lang (Pearson and Spearman). A layer is a candidate when

* the chosen correlation is at least ``threshold``,
* its divergence (mean over target languages) is at most the median over layers, and
* it is not among the first or last ``edge_layers`` MoE layers.

The zone is the largest contiguous block of candidates, where contiguous means adjacent in the
sorted list of MoE layers. Among blocks of equal size the one whose centre is closest to the
middle of the network wins, then the shallower one. A zone shorter than ``min_layers``, or fewer
than 3 target languages (too few for a correlation), falls back to the MoE layers whose relative
depth ``layer / num_layers`` lies in ``fallback`` (by default [0.375, 0.625), the middle zone of
RISE). An explicit ``override`` wins over both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from ramoe.routing.divergence import PARALLEL

log = logging.getLogger(__name__)

METRICS = ("spearman", "pearson")
MIN_LANGUAGES = 3  # a correlation over fewer target languages is undefined or meaningless

METHOD_DATA = "data"
METHOD_FALLBACK = "fallback"
METHOD_OVERRIDE = "override"


@dataclass(frozen=True)
class ZoneSettings:
    """Thresholds of the alignment-zone choice.

    ``fallback`` is a half-open interval [low, high) of relative depth ``layer / num_layers``.
    ``override`` is an inclusive (first_layer, last_layer) pair of MoE layers. ``accuracy_split``
    is the split whose accuracy gives the gap. It defaults to train because the zone feeds
    training, and choosing it on test accuracy would leak the test set.
    """

    metric: str = "spearman"
    threshold: float = 0.5
    edge_layers: int = 1
    min_layers: int = 2
    fallback: tuple[float, float] = (0.375, 0.625)
    override: tuple[int, int] | None = None
    accuracy_split: str = "train"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"invalid zone metric {self.metric!r}. Use one of {METRICS}.")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"invalid zone threshold {self.threshold}. A correlation threshold lies in [-1, 1].")
        if self.edge_layers < 0:
            raise ValueError(f"invalid edge_layers {self.edge_layers}. Use 0 or more.")
        if self.min_layers < 1:
            raise ValueError(f"invalid min_layers {self.min_layers}. Use 1 or more.")
        low, high = self.fallback
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"invalid fallback depth interval {self.fallback}. Use 0 <= low < high <= 1.")
        if self.override is not None:
            first, last = self.override
            if first > last:
                raise ValueError(
                    f"invalid zone override (first_layer={first}, last_layer={last}). "
                    "first_layer must be <= last_layer."
                )


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Compute the Pearson correlation, NaN when fewer than 2 points, a value is NaN or either side is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 2 or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        return float("nan")
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Compute the Spearman correlation: Pearson on ranks, tied values sharing their average rank.

    NaN under the same conditions as ``pearson``.
    """
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        return float("nan")
    x_ranks = pl.Series(np.asarray(x, dtype=np.float64)).rank("average").to_numpy()
    y_ranks = pl.Series(np.asarray(y, dtype=np.float64)).rank("average").to_numpy()
    return pearson(x_ranks, y_ranks)


def _check_layers(moe_layers: list[int], num_layers: int) -> list[int]:
    layers = sorted(set(moe_layers))
    if not layers:
        raise ValueError("moe_layers is empty, but the model needs at least one MoE layer.")
    if len(layers) != len(moe_layers):
        raise ValueError(f"moe_layers {moe_layers} contains repeated layers.")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"moe_layers {layers} must lie in 0..{num_layers - 1} for num_layers={num_layers}.")
    return layers


def _check_override(override: tuple[int, int], layers: list[int]) -> None:
    first, last = override
    if first not in layers or last not in layers:
        raise ValueError(
            f"zone override (first_layer={first}, last_layer={last}) is outside the MoE layers "
            f"{layers[0]}..{layers[-1]} ({layers}). Choose first_layer and last_layer among these layers."
        )


def fallback_layers(layers: list[int], num_layers: int, depth: tuple[float, float]) -> list[int]:
    """Select the MoE layers whose relative depth ``layer / num_layers`` lies in [low, high), at least one.

    When no MoE layer falls inside, the MoE layer whose depth is closest to the interval's
    centre is returned alone (the shallower one on a tie).
    """
    low, high = depth
    inside = [layer for layer in layers if low <= layer / num_layers < high]
    if inside:
        return inside
    centre = (low + high) / 2
    return [min(layers, key=lambda layer: (abs(layer / num_layers - centre), layer))]


def _largest_block(candidate: list[bool], layers: list[int], num_layers: int) -> list[int]:
    """Find the largest run of adjacent candidates, breaking ties by closeness of its centre to the network's middle."""
    blocks: list[list[int]] = []
    current: list[int] = []
    for layer, is_candidate in zip(layers, candidate, strict=True):
        if is_candidate:
            current.append(layer)
        elif current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    if not blocks:
        return []

    middle = (num_layers - 1) / 2
    return min(blocks, key=lambda block: (-len(block), abs((block[0] + block[-1]) / 2 - middle), block[0]))


def _accuracy_lookup(accuracy: pl.DataFrame, model: str, task: str, split: str) -> dict[str, float]:
    rows = accuracy.filter((pl.col("model") == model) & (pl.col("task") == task) & (pl.col("split") == split))
    repeated = rows.group_by("lang").len().filter(pl.col("len") > 1)["lang"].to_list()
    if repeated:
        raise ValueError(f"accuracy table has several rows for {model}/{task}/{split} and languages {repeated}.")
    return dict(zip(rows["lang"].to_list(), rows["accuracy"].to_list(), strict=True))


def _layer_statistics(values: np.ndarray, gap: np.ndarray, settings: ZoneSettings) -> dict[str, np.ndarray]:
    """Compute the per-layer columns from the (languages, layers) divergence matrix and the (languages,) gap.

    Returns the mean divergence over languages, the Pearson and Spearman correlations (NaN with
    fewer than MIN_LANGUAGES languages) and the candidate mask.
    """
    num_langs, num_layers = values.shape
    mean_divergence = values.mean(axis=0)
    pearsons = np.full(num_layers, np.nan)
    spearmans = np.full(num_layers, np.nan)
    if num_langs >= MIN_LANGUAGES:
        for j in range(num_layers):
            pearsons[j] = pearson(values[:, j], gap)
            spearmans[j] = spearman(values[:, j], gap)
    correlation = spearmans if settings.metric == "spearman" else pearsons

    median = np.nanmedian(mean_divergence) if np.any(np.isfinite(mean_divergence)) else np.nan
    positions = np.arange(num_layers)
    interior = (positions >= settings.edge_layers) & (positions < num_layers - settings.edge_layers)
    # NaN compares False, so layers without a correlation or divergence are never candidates.
    candidate = (correlation >= settings.threshold) & (mean_divergence <= median) & interior
    return {"divergence": mean_divergence, "pearson": pearsons, "spearman": spearmans, "candidate": candidate}


def _pick_zone(
    candidate: list[bool], num_langs: int, *, model: str, task: str, layers: list[int], num_layers: int,
    settings: ZoneSettings,
) -> tuple[list[int], str]:
    """Return the zone's MoE layers and the method that chose them: override, data or fallback."""
    if settings.override is not None:
        first, last = settings.override
        return [layer for layer in layers if first <= layer <= last], METHOD_OVERRIDE

    if num_langs < MIN_LANGUAGES:
        zone = fallback_layers(layers, num_layers, settings.fallback)
        log.warning("%s/%s: %d target languages are too few for a correlation (need %d), so using fallback zone %s",
                    model, task, num_langs, MIN_LANGUAGES, zone)
        return zone, METHOD_FALLBACK

    block = _largest_block(candidate, layers, num_layers)
    if len(block) >= settings.min_layers:
        return block, METHOD_DATA

    zone = fallback_layers(layers, num_layers, settings.fallback)
    if block:
        log.warning(
            "%s/%s: largest block of candidate layers %s is shorter than min_layers=%d, so using fallback zone %s",
            model, task, block, settings.min_layers, zone,
        )
    else:
        log.warning("%s/%s: no layer is a candidate, so using fallback zone %s", model, task, zone)
    return zone, METHOD_FALLBACK


def _zone_for_task(
    divergence: pl.DataFrame,
    accuracy: dict[str, float],
    *,
    model: str,
    task: str,
    layers: list[int],
    num_layers: int,
    settings: ZoneSettings,
    column: str,
) -> pl.DataFrame:
    langs = sorted(divergence["lang"].unique().to_list())
    if "en" not in accuracy:
        raise ValueError(f"accuracy table has no English row for {model}/{task}/{settings.accuracy_split}.")
    missing = [lang for lang in langs if lang not in accuracy]
    if missing:
        raise ValueError(
            f"accuracy table has no row for {model}/{task}/{settings.accuracy_split} and languages {missing}."
        )
    gap = np.array([accuracy["en"] - accuracy[lang] for lang in langs], dtype=np.float64)

    # (languages, layers) divergence matrix, NaN where a layer is absent from the table.
    lookup = {(lang, layer): value for lang, layer, value in divergence.select("lang", "layer", column).iter_rows()}
    values = np.array([[lookup.get((lang, layer), np.nan) for layer in layers] for lang in langs], dtype=np.float64)

    statistics = _layer_statistics(values, gap, settings)
    candidate = statistics["candidate"].tolist()
    zone, method = _pick_zone(candidate, len(langs), model=model, task=task, layers=layers,
                              num_layers=num_layers, settings=settings)
    log.info("%s/%s: alignment zone layers %d-%d (method %s)", model, task, zone[0], zone[-1], method)

    return pl.DataFrame(
        {
            "model": model,
            "task": task,
            "layer": layers,
            "divergence": statistics["divergence"],
            "pearson": statistics["pearson"],
            "spearman": statistics["spearman"],
            "n_languages": len(langs),
            "candidate": candidate,
            "in_zone": [layer in zone for layer in layers],
            "first_layer": zone[0],
            "last_layer": zone[-1],
            "method": method,
        },
        schema_overrides={"layer": pl.Int64, "n_languages": pl.Int64, "first_layer": pl.Int64, "last_layer": pl.Int64},
    ).with_columns(pl.col("divergence", "pearson", "spearman").fill_nan(None))


def choose_zone(
    divergence: pl.DataFrame,
    accuracy: pl.DataFrame,
    *,
    moe_layers: list[int],
    num_layers: int,
    settings: ZoneSettings,
    divergence_column: str = "hjsd",
) -> pl.DataFrame:
    """Choose the alignment zone of every task of one model.

    ``divergence`` is the output of ``divergence_table`` (only ``parallel`` rows are used) and
    ``accuracy`` has columns model, task, lang, split, accuracy. ``moe_layers`` are the true
    decoder indices of the model's MoE layers and ``num_layers`` its number of decoder layers.
    Returns one row per (model, task, MoE layer) with columns model, task, layer, divergence,
    pearson, spearman, n_languages, candidate, in_zone, first_layer, last_layer, method.
    Raises ValueError when the override is not a pair of MoE layers or an accuracy is missing.
    """
    layers = _check_layers(list(moe_layers), num_layers)
    if settings.override is not None:
        _check_override(settings.override, layers)
    if divergence_column not in divergence.columns:
        raise ValueError(f"divergence table has no column {divergence_column!r}. Its columns are {divergence.columns}.")

    parallel = divergence.filter(pl.col("comparison") == PARALLEL)
    if parallel.is_empty():
        raise ValueError("divergence table has no 'parallel' rows.")
    models = parallel["model"].unique().to_list()
    if len(models) != 1:
        raise ValueError(
            f"choose_zone takes one model at a time because MoE layers differ by model, got {sorted(models)}."
        )
    extra = sorted(set(parallel["layer"].to_list()) - set(layers))
    if extra:
        raise ValueError(f"divergence table has layers {extra} that are not among the MoE layers {layers}.")

    frames = []
    for model, task in parallel.select("model", "task").unique().sort("model", "task").iter_rows():
        rows = parallel.filter((pl.col("model") == model) & (pl.col("task") == task))
        frames.append(
            _zone_for_task(
                rows,
                _accuracy_lookup(accuracy, model, task, settings.accuracy_split),
                model=model,
                task=task,
                layers=layers,
                num_layers=num_layers,
                settings=settings,
                column=divergence_column,
            )
        )
    return pl.concat(frames)
