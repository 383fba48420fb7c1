"""Routing divergence between English and a target language, per layer, with two controls.

The distance between two routing distributions P and Q over E experts is the entropy-normalised
Jensen-Shannon divergence used by Bandarkar et al. (2025), "Multilingual Routing in
Mixture-of-Experts" (arXiv:2510.04694), in natural logs::

    M    = max((P + Q) / 2, 1e-10)
    JSD  = (KL(P || M) + KL(Q || M)) / 2            with 0 * log 0 = 0 for P and Q
    D    = JSD / max(log E - (H(P) + H(Q)) / 2, 1e-6)

Dividing by the gap between the maximum entropy log E and the mean entropy of P and Q keeps
flat routing distributions (whose JSD is small whatever experts they prefer) comparable with
peaked ones.

``divergence_by_layer`` averages D over parallel items. Its two controls pair item i with
item pi(i) of a seeded derangement. English against the English of another item shows how
similarly any two English sequences route. English against the target language of another
item shows the divergence left when the content differs, so parallel values below it come
from shared content.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

MIXTURE_FLOOR = 1e-10  # lower clamp of M before its log
DENOMINATOR_FLOOR = 1e-6  # lower clamp of log E - mean entropy
SUM_TOLERANCE = 1e-3  # allowed |sum(probs) - 1|, loose enough for float32 rounding

PARALLEL = "parallel"
CONTROL_ENGLISH = "control_english"
CONTROL_NONPARALLEL = "control_nonparallel"
COMPARISONS = (PARALLEL, CONTROL_NONPARALLEL, CONTROL_ENGLISH)

TRACE_COLUMNS = ("item_id", "lang", "layer", "probs", "entropy")


def _plogp(p: np.ndarray) -> np.ndarray:
    """Compute p * log(p) elementwise, with 0 * log 0 = 0."""
    positive = p > 0
    logs = np.log(p, out=np.zeros_like(p), where=positive)
    return np.where(positive, p * logs, 0.0)


def _as_distributions(p: np.ndarray | list, name: str) -> np.ndarray:
    array = np.asarray(p, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] < 1:
        raise ValueError(f"{name} must have an expert axis as its last axis, got shape {array.shape}.")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains negative or non-finite probabilities.")
    return array


def entropy(p: np.ndarray) -> np.ndarray:
    """Compute the Shannon entropy in nats over the last axis: (..., E) -> (...)."""
    p = _as_distributions(p, "p")
    return -_plogp(p).sum(axis=-1)


def jsd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Compute the Jensen-Shannon divergence in nats over the last axis: (..., E) x (..., E) -> (...).

    The mixture M is clamped at 1e-10 before its log, and terms with P = 0 (or Q = 0) count as 0.
    """
    p = _as_distributions(p, "p")
    q = _as_distributions(q, "q")
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"p and q must have the same number of experts, got {p.shape[-1]} and {q.shape[-1]}.")

    log_mixture = np.log(np.maximum((p + q) / 2, MIXTURE_FLOOR))
    kl_p = (_plogp(p) - np.where(p > 0, p * log_mixture, 0.0)).sum(axis=-1)
    kl_q = (_plogp(q) - np.where(q > 0, q * log_mixture, 0.0)).sum(axis=-1)
    return (kl_p + kl_q) / 2


def normalized_jsd(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Compute JSD / max(log E - (H(p) + H(q)) / 2, 1e-6) over the last axis: (..., E) x (..., E) -> (...)."""
    p = _as_distributions(p, "p")
    q = _as_distributions(q, "q")
    num_experts = p.shape[-1]
    denominator = np.log(num_experts) - (entropy(p) + entropy(q)) / 2
    return jsd(p, q) / np.maximum(denominator, DENOMINATOR_FLOOR)


def derangement(n: int, seed: int) -> np.ndarray:
    """Draw a permutation of range(n) without fixed points, uniformly over derangements.

    Rejection sampling: about 1/e of all permutations are derangements, so the expected
    number of draws is e (about 2.7). The same (n, seed) always gives the same result.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got n={n}.")
    rng = np.random.default_rng(seed)
    identity = np.arange(n)
    while True:
        permutation = rng.permutation(n)
        if not np.any(permutation == identity):
            return permutation


def _single_lang(table: pl.DataFrame, name: str) -> str:
    missing = [column for column in TRACE_COLUMNS if column not in table.columns]
    if missing:
        raise ValueError(f"{name} routing table is missing columns {missing}. Its columns are {table.columns}.")
    langs = table["lang"].unique().to_list()
    if len(langs) != 1:
        raise ValueError(f"{name} routing table must contain one language, found {sorted(langs)}.")
    return langs[0]


def _probability_cube(table: pl.DataFrame, item_ids: list[str], layers: list[int], name: str) -> np.ndarray:
    """Gather probs into an (items, layers, E) array, in the order of ``item_ids`` and ``layers``."""
    rows = table.filter(pl.col("item_id").is_in(item_ids) & pl.col("layer").is_in(layers))
    duplicates = rows.group_by("item_id", "layer").len().filter(pl.col("len") > 1)
    if duplicates.height:
        raise ValueError(f"{name} routing table has repeated (item_id, layer) rows, e.g. {duplicates.row(0)[:2]}.")
    expected = len(item_ids) * len(layers)
    if rows.height != expected:
        raise ValueError(
            f"{name} routing table has {rows.height} of the {expected} (item_id, layer) rows for "
            f"{len(item_ids)} items and layers {layers}. Every item needs a row at every layer."
        )

    widths = rows["probs"].list.len().unique().to_list()
    if len(widths) != 1:
        raise ValueError(
            f"{name} routing table mixes probs of lengths {sorted(widths)}, but every row needs the same E."
        )
    num_experts = widths[0]

    item_position = {item: i for i, item in enumerate(item_ids)}
    layer_position = {layer: j for j, layer in enumerate(layers)}
    cube = np.empty((len(item_ids), len(layers), num_experts), dtype=np.float64)
    probs = rows["probs"].list.to_array(num_experts).to_numpy()
    for row, (item, layer) in enumerate(zip(rows["item_id"].to_list(), rows["layer"].to_list(), strict=True)):
        cube[item_position[item], layer_position[layer]] = probs[row]

    sums = cube.sum(axis=-1)
    if np.any(np.abs(sums - 1) > SUM_TOLERANCE):
        worst = float(sums.flat[np.argmax(np.abs(sums - 1))])
        raise ValueError(
            f"{name} routing table has probs that do not sum to 1 (one sums to {worst:.6f}). "
            "probs must be the mean router softmax over a sequence's tokens."
        )
    return cube


def _mean_entropy(table: pl.DataFrame, item_ids: list[str], layers: list[int]) -> np.ndarray:
    """Average the per-sequence routing entropy (nats) over the given items, one value per layer."""
    by_layer = (
        table.filter(pl.col("item_id").is_in(item_ids))
        .group_by("layer")
        .agg(pl.col("entropy").mean())
    )
    lookup = dict(zip(by_layer["layer"].to_list(), by_layer["entropy"].to_list(), strict=True))
    return np.array([lookup[layer] for layer in layers], dtype=np.float64)


def _rows(
    model: str, task: str, lang: str, comparison: str, layers: list[int],
    p: np.ndarray, q: np.ndarray, mean_entropy: np.ndarray,
) -> pl.DataFrame:
    """Average D and JSD of (items, layers, E) pairs over items into one row per layer."""
    return pl.DataFrame(
        {
            "model": model,
            "task": task,
            "lang": lang,
            "layer": layers,
            "comparison": comparison,
            "hjsd": normalized_jsd(p, q).mean(axis=0),
            "jsd": jsd(p, q).mean(axis=0),
            "entropy": mean_entropy,
            "n_items": p.shape[0],
        },
        schema_overrides={"layer": pl.Int64, "n_items": pl.Int64},
    )


def _shared_layers(english: pl.DataFrame, target: pl.DataFrame, lang: str) -> list[int]:
    english_layers = sorted(english["layer"].unique().to_list())
    target_layers = sorted(target["layer"].unique().to_list())
    if english_layers != target_layers:
        raise ValueError(
            f"English and {lang!r} routing tables cover different layers: {english_layers} and {target_layers}. "
            "Both must come from the same model."
        )
    return english_layers


def english_control(english: pl.DataFrame, *, model: str, task: str, seed: int = 0) -> pl.DataFrame:
    """Compute the English-against-English control: D(q_en_i, q_en_pi(i)) averaged over all English items.

    pi is ``derangement(n, seed)`` over the sorted item ids of ``english``, so the control does
    not depend on which target language it is reported with.
    """
    _single_lang(english, "English")
    item_ids = sorted(english["item_id"].unique().to_list())
    layers = sorted(english["layer"].unique().to_list())
    if len(item_ids) < 2:
        raise ValueError(f"the English control needs at least 2 items, got {len(item_ids)}.")

    cube = _probability_cube(english, item_ids, layers, "English")
    partner = derangement(len(item_ids), seed)
    mean_entropy = _mean_entropy(english, item_ids, layers)
    return _rows(model, task, "en", CONTROL_ENGLISH, layers, cube, cube[partner], mean_entropy)


def divergence_by_layer(
    english: pl.DataFrame,
    target: pl.DataFrame,
    *,
    model: str,
    task: str,
    seed: int = 0,
    include_english_control: bool = True,
) -> pl.DataFrame:
    """Compute per-layer routing divergence of one target language from English, with controls.

    ``english`` and ``target`` are per-sequence routing tables of the same task and model.
    Parallel items are the item ids present in both. Returns one row per (comparison, layer)
    with columns model, task, lang, layer, comparison, hjsd, jsd, entropy, n_items:

    * ``parallel``: D(q_en_i, q_lang_i), lang = the target language.
    * ``control_nonparallel``: D(q_en_i, q_lang_pi(i)), lang = the target language, where pi is
      ``derangement(n, seed)`` over the sorted parallel item ids.
    * ``control_english`` (with ``include_english_control``): see ``english_control``, lang = "en".

    ``hjsd`` and ``jsd`` are means over items. ``entropy`` is the mean over the same items of
    the per-sequence routing entropy (nats) of the language in the ``lang`` column.
    """
    _single_lang(english, "English")
    lang = _single_lang(target, "target")
    layers = _shared_layers(english, target, lang)

    english_items = set(english["item_id"].to_list())
    target_items = set(target["item_id"].to_list())
    item_ids = sorted(english_items & target_items)
    if len(item_ids) < 2:
        raise ValueError(
            f"English and {lang!r} share {len(item_ids)} item ids, but the controls need at least 2 parallel items."
        )
    unmatched = len(english_items | target_items) - len(item_ids)
    if unmatched:
        log.warning("%s/%s/%s: left out %d item ids that are in only one of English and %s",
                    model, task, lang, unmatched, lang)

    english_cube = _probability_cube(english, item_ids, layers, "English")
    target_cube = _probability_cube(target, item_ids, layers, lang)
    partner = derangement(len(item_ids), seed)
    target_entropy = _mean_entropy(target, item_ids, layers)

    frames = [
        _rows(model, task, lang, PARALLEL, layers, english_cube, target_cube, target_entropy),
        _rows(model, task, lang, CONTROL_NONPARALLEL, layers, english_cube, target_cube[partner], target_entropy),
    ]
    if include_english_control:
        frames.append(english_control(english, model=model, task=task, seed=seed))
    log.info("%s/%s/%s: routing divergence over %d parallel items and %d layers", model, task, lang,
             len(item_ids), len(layers))
    return pl.concat(frames)


def divergence_table(
    english: pl.DataFrame, targets: Mapping[str, pl.DataFrame], *, model: str, task: str, seed: int = 0
) -> pl.DataFrame:
    """Run ``divergence_by_layer`` for every target language, with the English control once.

    ``targets`` maps a language code to its routing table. The result has the columns of
    ``divergence_by_layer``, sorted by comparison, lang and layer.
    """
    if not targets:
        raise ValueError("targets is empty. Pass at least one target-language routing table.")
    frames = [english_control(english, model=model, task=task, seed=seed)]
    for lang in sorted(targets):
        frame = divergence_by_layer(english, targets[lang], model=model, task=task, seed=seed,
                                    include_english_control=False)
        found = frame["lang"].unique().to_list()
        if found != [lang]:
            raise ValueError(f"the routing table passed as {lang!r} contains language {found}.")
        frames.append(frame)
    return pl.concat(frames).sort("comparison", "lang", "layer")
