"""RISE baseline: select language-relevant experts by depth zone and train only those experts.

RISE (Zheng et al., arXiv 2604.03592) fine-tunes a small set of K experts, about 2-3% of all
(layer, expert) pairs, and freezes everything else. The selection follows the official code,
GitHub ``init-neok/rise`` at commit 9d7cb274, files ``rise/routing_stats.py`` and
``rise/expert_selector.py``:

1. ``activation_frequencies``: a[lang, l, e] is the share of a language's non-padding tokens
   whose top-k at layer l contains expert e (``RoutingStatCollector.activation_frequencies``).
2. ``depth_zone``: layers split into shallow, middle and deep zones by depth.
3. ``rise_scores`` (``RISESelector._composite_spec`` and ``_composite_ovlp``, Eq. 8 of the
   paper), with the means taken over all languages, the target included:

   * shallow and deep layers: Spec = a_target / mean_lang(a) * (1 + alpha * a_target);
   * middle layers: Ovlp = 1 / (1 + CV) * (1 + alpha * mean_lang(a)), where CV is the
     population standard deviation of a over languages divided by its mean.

4. ``select_experts`` (``RISESelector.select`` and ``_redistribute_budgets``): the budget K is
   split across the zones, and each zone ranks all of its (layer, expert) pairs jointly.
5. ``freeze_for_rise``: only the selected experts train. In transformers 5 the experts of a
   layer are one fused tensor, so a gradient hook zeroes the slices of the unselected experts.
   The official code indexes per-expert modules instead and requires transformers < 5.

The official training settings are lr 2e-5, 3 epochs, effective batch 16 and weight decay 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
import torch

from ramoe.routing.adapters import MoELayout

log = logging.getLogger(__name__)

ZONES = ("shallow", "middle", "deep")

# Default budget shares of the shallow, middle and deep zones, and the default zone bounds as
# fractions of depth (RISEConfig defaults in the official rise/expert_selector.py). The official
# Phi-3.5-MoE config overrides the split with (0.125, 0.6875, 0.1875).
DEFAULT_SPLIT = (0.35, 0.25, 0.40)
DEFAULT_BOUNDS = (0.375, 0.625)
DEFAULT_ALPHA = 10.0

TRACE_COLUMNS = ("layer", "n_tokens", "topk_counts")
FREQUENCY_COLUMNS = ("lang", "layer", "expert", "freq")
SCORE_COLUMNS = ("layer", "expert", "zone", "score")

# Shares of a split may differ from a sum of 1 by float rounding, e.g. 0.35 + 0.25 + 0.40.
_SPLIT_SUM_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------
# Activation frequencies
# ---------------------------------------------------------------------------


def _sum_language_counts(lang: str, frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum one language's sequence trace per layer: (layers (L,), tokens (L,), top-k counts (L, E))."""
    missing = [column for column in TRACE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(
            f"sequence trace of language {lang!r} is missing columns {missing}. Its columns are "
            f"{frame.columns}. Read it with ramoe.routing.traces.read_sequence_trace."
        )
    if frame.is_empty():
        raise ValueError(f"sequence trace of language {lang!r} is empty. Trace at least one sequence per language.")
    if "lang" in frame.columns:
        other = sorted(set(frame["lang"].cast(pl.String).unique().to_list()) - {lang})
        if other:
            raise ValueError(
                f"sequence trace passed as language {lang!r} also has rows of languages {other}. "
                "Pass one frame per language, keyed by its language code."
            )
    widths = frame["topk_counts"].list.len().unique().to_list()
    if len(widths) != 1 or widths[0] == 0:
        raise ValueError(
            f"sequence trace of language {lang!r} has topk_counts of lengths {sorted(widths)}. "
            "Every row needs one count per expert."
        )

    layers = frame["layer"].cast(pl.Int64).to_numpy()
    tokens = frame["n_tokens"].cast(pl.Int64).to_numpy()
    counts = frame["topk_counts"].list.to_array(widths[0]).cast(pl.Array(pl.Int64, widths[0])).to_numpy()
    if (tokens <= 0).any():
        raise ValueError(
            f"sequence trace of language {lang!r} has rows with n_tokens <= 0. "
            "Every traced sequence needs at least one non-padding token."
        )
    # A token counts an expert at most once, so 0 <= topk_counts[e] <= n_tokens.
    if (counts < 0).any() or (counts > tokens[:, None]).any():
        raise ValueError(
            f"sequence trace of language {lang!r} has topk_counts outside [0, n_tokens]. "
            "Check that the topk_counts and n_tokens columns come from the same trace."
        )

    unique_layers, row_layer = np.unique(layers, return_inverse=True)
    layer_tokens = np.zeros(len(unique_layers), dtype=np.int64)
    layer_counts = np.zeros((len(unique_layers), counts.shape[1]), dtype=np.int64)
    np.add.at(layer_tokens, row_layer, tokens)
    np.add.at(layer_counts, row_layer, counts)
    return unique_layers, layer_tokens, layer_counts


def activation_frequencies(traces: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """Pool each language's top-k counts over its non-padding tokens, per layer and expert.

    ``traces`` maps a language code to its sequence trace (one row per sequence and layer, as
    ``ramoe.routing.traces.read_sequence_trace`` returns it). The result has one row per
    (lang, layer, expert) and the columns lang, layer, expert and freq, where

        freq = sum of topk_counts[e] / sum of n_tokens

    over the language's sequences at that layer. It is the share of tokens whose top-k contains
    expert e, so a layer's frequencies sum to top_k. Tokens are pooled, not averaged per
    sequence, as in ``RoutingStatCollector.activation_frequencies`` of the official code.
    """
    if not traces:
        raise ValueError("no sequence traces were given. Pass {lang: sequence-trace frame} for at least two languages.")

    parts = []
    num_experts = None
    for lang, frame in traces.items():
        layers, tokens, counts = _sum_language_counts(lang, frame)
        if num_experts is None:
            num_experts = counts.shape[1]
        elif counts.shape[1] != num_experts:
            raise ValueError(
                f"sequence trace of language {lang!r} has {counts.shape[1]} experts per layer, but an earlier "
                f"language has {num_experts}. Trace all languages with the same model."
            )
        freq = counts / tokens[:, None]  # (L, E), float64
        parts.append(
            pl.DataFrame(
                {
                    "lang": lang,
                    "layer": np.repeat(layers, num_experts),
                    "expert": np.tile(np.arange(num_experts, dtype=np.int64), len(layers)),
                    "freq": freq.reshape(-1),
                }
            )
        )
        log.debug("%s: %d layers, %d to %d non-padding tokens per layer", lang, len(layers), tokens.min(), tokens.max())
    return pl.concat(parts).sort("lang", "layer", "expert")


# ---------------------------------------------------------------------------
# Depth zones and scores
# ---------------------------------------------------------------------------


def _check_bounds(bounds: tuple[float, float]) -> None:
    if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
        raise ValueError(
            f"invalid zone bounds {bounds}. Give (shallow_end, middle_end) as fractions of depth "
            "with 0 <= shallow_end <= middle_end <= 1, e.g. (0.375, 0.625)."
        )


def depth_zone(layer: int, num_layers: int, bounds: tuple[float, float] = DEFAULT_BOUNDS) -> str:
    """Return the RISE zone ("shallow", "middle" or "deep") of decoder layer ``layer``.

    As in ``RISESelector.__init__`` of the official code, the zone boundaries are the layer
    indices L1 = round(num_layers * bounds[0]) and L2 = round(num_layers * bounds[1]): shallow
    is [0, L1), middle [L1, L2) and deep [L2, num_layers). Python's ``round`` rounds halves to
    even. Where num_layers * bound is an integer (8, 16, 24, 32 or 48 layers with the default
    bounds) this equals the relative-depth rule ``layer / num_layers < bound``.

    NOTE: elsewhere the zones differ from the relative-depth rule. With 4 layers, L1 = round(1.5)
    = 2 and L2 = round(2.5) = 2, so the middle zone is empty. With 27 or 28 layers the shallow
    zone is layers 0-9, where the relative-depth rule gives 0-10.
    """
    _check_bounds(bounds)
    if num_layers < 1:
        raise ValueError(f"invalid num_layers {num_layers}. A model has at least one decoder layer.")
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"layer {layer} is outside [0, {num_layers}). Pass the true decoder layer index and the "
            "model's total number of decoder layers (config.num_hidden_layers)."
        )
    shallow_end = round(num_layers * bounds[0])
    middle_end = round(num_layers * bounds[1])
    if layer < shallow_end:
        return "shallow"
    if layer < middle_end:
        return "middle"
    return "deep"


def _check_frequency_table(freqs: pl.DataFrame) -> list[str]:
    """Validate a frequency table and return its languages, sorted."""
    missing = [column for column in FREQUENCY_COLUMNS if column not in freqs.columns]
    if missing:
        raise ValueError(
            f"frequency table is missing columns {missing}. Its columns are {freqs.columns}. "
            "Build it with activation_frequencies."
        )
    if freqs.is_empty():
        raise ValueError("frequency table is empty. Build it from the traces of at least two languages.")
    if freqs["freq"].is_null().any() or freqs["freq"].is_nan().any() or (freqs["freq"] < 0).any():
        raise ValueError("frequency table has null, NaN or negative freq values. A frequency is a share in [0, 1].")
    if freqs.select("lang", "layer", "expert").is_duplicated().any():
        raise ValueError("frequency table has duplicate (lang, layer, expert) rows. Keep one row per triple.")

    languages = sorted(freqs["lang"].unique().to_list())
    # The mean and the CV are taken over languages, so every (layer, expert) needs all of them.
    per_pair = freqs.group_by("layer", "expert").agg(pl.len().alias("n_langs"))
    incomplete = per_pair.filter(pl.col("n_langs") != len(languages)).sort("layer", "expert")
    if not incomplete.is_empty():
        first = incomplete.row(0, named=True)
        raise ValueError(
            f"frequency table covers {len(incomplete)} (layer, expert) pairs in only some of the languages "
            f"{languages}, e.g. layer {first['layer']} expert {first['expert']} in {first['n_langs']}. "
            "Trace every language over the same layers."
        )
    return languages


def rise_scores(
    freqs: pl.DataFrame,
    *,
    target_lang: str,
    num_layers: int,
    alpha: float = DEFAULT_ALPHA,
    bounds: tuple[float, float] = DEFAULT_BOUNDS,
) -> pl.DataFrame:
    """Score every (layer, expert) for ``target_lang`` with the RISE rule of its depth zone.

    ``freqs`` is an ``activation_frequencies`` table. The languages are all languages in it,
    English and the target included, and at least two are required. ``num_layers`` is the
    model's total number of decoder layers, which sets the zones (see ``depth_zone``).

    Returns one row per (layer, expert), sorted by layer and expert, with the columns:

    * a_target: the target language's frequency, and a_mean: the mean over languages;
    * cv: population standard deviation over languages (ddof=0, as ``np.std`` in the official
      ``RISESelector._overlap``) divided by a_mean;
    * specificity = a_target / a_mean, and overlap = 1 / (1 + cv);
    * zone, and score: specificity * (1 + alpha * a_target) in the shallow and deep zones,
      overlap * (1 + alpha * a_mean) in the middle zone.

    Scores are computed in float64, where the official code uses float32.
    """
    languages = _check_frequency_table(freqs)
    if target_lang not in languages:
        raise ValueError(
            f"target_lang {target_lang!r} is not in the frequency table, whose languages are {languages}. "
            "Trace the target language too."
        )
    if len(languages) < 2:
        raise ValueError(
            f"frequency table has only the language {languages}. RISE scores an expert against the mean over "
            "languages, so trace at least English and the target."
        )

    parts = freqs.group_by("layer", "expert").agg(
        pl.col("freq").filter(pl.col("lang") == target_lang).first().alias("a_target"),
        pl.col("freq").mean().alias("a_mean"),
        pl.col("freq").std(ddof=0).alias("a_std"),
    )
    # Frequencies are non-negative, so a_mean == 0 means every language has a == 0 at this
    # (layer, expert). Then specificity := 0 and cv := 0, which is what the official code gets by
    # dividing by 1e-8 in place of a zero mean. The specificity score is then 0, but the overlap
    # score is 1 / (1 + 0) * (1 + 0) = 1, so a middle-zone expert that no language uses still
    # scores 1.
    used = pl.col("a_mean") > 0
    parts = parts.with_columns(
        pl.when(used).then(pl.col("a_target") / pl.col("a_mean")).otherwise(0.0).alias("specificity"),
        pl.when(used).then(pl.col("a_std") / pl.col("a_mean")).otherwise(0.0).alias("cv"),
    ).with_columns((1.0 / (1.0 + pl.col("cv"))).alias("overlap"))

    zones = {layer: depth_zone(layer, num_layers, bounds) for layer in parts["layer"].unique().sort().to_list()}
    parts = parts.with_columns(pl.col("layer").replace_strict(zones, return_dtype=pl.String).alias("zone"))
    parts = parts.with_columns(
        pl.when(pl.col("zone") == "middle")
        .then(pl.col("overlap") * (1.0 + alpha * pl.col("a_mean")))
        .otherwise(pl.col("specificity") * (1.0 + alpha * pl.col("a_target")))
        .alias("score")
    )
    return parts.select(
        "layer", "expert", "zone", "score", "a_target", "a_mean", "cv", "specificity", "overlap"
    ).sort("layer", "expert")


# ---------------------------------------------------------------------------
# Budget and selection
# ---------------------------------------------------------------------------


def budget_size(num_experts_total: int, fraction: float) -> int:
    """Return the RISE budget K = max(1, round(fraction * num_experts_total)).

    ``num_experts_total`` counts (layer, expert) pairs over all MoE layers. RISE trains about 2-3%
    of them: the official scripts use K = 128 for Qwen3-30B-A3B (2.1%) and K = 16 for
    Phi-3.5-MoE (3.1%). Python's ``round`` rounds halves to even.
    """
    if num_experts_total < 1:
        raise ValueError(f"invalid num_experts_total {num_experts_total}. Count the (layer, expert) pairs, at least 1.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"invalid budget fraction {fraction}. Give a share in (0, 1], e.g. 0.025 for 2.5%.")
    return max(1, round(fraction * num_experts_total))


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    shares = tuple(float(share) for share in split)
    if len(shares) != len(ZONES):
        raise ValueError(
            f"invalid budget split {list(split)}. Give one share per zone {ZONES}, e.g. (0.35, 0.25, 0.40)."
        )
    if any(not np.isfinite(share) or share < 0 for share in shares):
        raise ValueError(f"invalid budget split {list(split)}. Shares must be finite and non-negative.")
    if abs(sum(shares) - 1.0) > _SPLIT_SUM_TOLERANCE:
        raise ValueError(f"invalid budget split {list(split)}. The shares sum to {sum(shares)}, but must sum to 1.")
    return shares


def _zone_quotas(budget: int, split: tuple[float, float, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``budget`` across the zones and spill what a zone cannot take to the others.

    Follows ``RISESelector.select`` and ``_redistribute_budgets`` of the official code. The
    shallow and middle quotas are int(budget * share), rounded down in float arithmetic, and
    deep gets the remainder, so split[2] only enters through the check that the shares sum to 1.
    Float rounding makes a few quotas one lower than exact arithmetic gives, e.g.
    int(180 * 0.35) = 62, not 63. A zone's quota is then capped at its number of candidates, and
    the excess goes, repeatedly, to the zone with the most room left, the earlier zone in ZONES
    on a tie.
    """
    quotas = {"shallow": int(budget * split[0]), "middle": int(budget * split[1])}
    quotas["deep"] = budget - quotas["shallow"] - quotas["middle"]

    overflow = 0
    for zone in ZONES:
        excess = quotas[zone] - capacity[zone]
        if excess > 0:
            quotas[zone] = capacity[zone]
            overflow += excess
    while overflow > 0:
        room = {zone: capacity[zone] - quotas[zone] for zone in ZONES}
        # select_experts checks budget <= number of candidates, so some zone has room here.
        zone = max((zone for zone in ZONES if room[zone] > 0), key=lambda name: room[name])
        spilled = min(room[zone], overflow)
        quotas[zone] += spilled
        overflow -= spilled
    return quotas


def select_experts(scores: pl.DataFrame, budget: int, split: Sequence[float] = DEFAULT_SPLIT) -> pl.DataFrame:
    """Select ``budget`` experts: each zone's quota of its highest-scoring (layer, expert) pairs.

    ``scores`` is a ``rise_scores`` table (at least the columns layer, expert, zone and score).
    ``split`` gives the shares of the budget of the shallow, middle and deep zones, and
    ``_zone_quotas`` turns them into counts, spilling the quota of a zone with too few
    candidates to the other zones, so exactly ``budget`` rows are selected. Within a zone, all
    pairs of all its layers are ranked together by score, highest first. Ties go to the lower
    layer, then the lower expert id, as the stable sort over (layer, expert) order does in the
    official ``RISESelector.select``.

    Returns ``scores`` in its row order with a boolean column ``selected`` added.
    """
    missing = [column for column in SCORE_COLUMNS if column not in scores.columns]
    if missing:
        raise ValueError(
            f"score table is missing columns {missing}. Its columns are {scores.columns}. Build it with rise_scores."
        )
    shares = _check_split(split)
    if not 1 <= budget <= scores.height:
        raise ValueError(
            f"invalid budget {budget}. It must lie in [1, {scores.height}], the number of (layer, expert) "
            "candidates in the score table."
        )
    unknown = sorted(set(scores["zone"].unique().to_list()) - set(ZONES))
    if unknown:
        raise ValueError(f"score table has unknown zones {unknown}. Zones are {ZONES}.")
    if scores["score"].is_null().any() or scores["score"].is_nan().any():
        raise ValueError("score table has null or NaN scores, which cannot be ranked. Recompute it with rise_scores.")
    if scores.select("layer", "expert").is_duplicated().any():
        raise ValueError("score table has duplicate (layer, expert) rows. Keep one row per pair.")

    capacity = {zone: int((scores["zone"] == zone).sum()) for zone in ZONES}
    quotas = _zone_quotas(budget, shares, capacity)

    ranked = (
        scores.with_row_index("_row")
        .sort(["score", "layer", "expert"], descending=[True, False, False])
        .with_columns(pl.int_range(pl.len()).over("zone").alias("_rank"))
    )
    quota = pl.col("zone").replace_strict(quotas, return_dtype=pl.Int64)
    chosen = ranked.filter(pl.col("_rank") < quota)["_row"]
    selection = scores.with_columns(pl.Series("selected", np.isin(np.arange(scores.height), chosen.to_numpy())))

    log.info(
        "RISE selected %d experts: %s (quotas from split %s, candidates per zone %s)",
        budget,
        ", ".join(f"{zone} {quotas[zone]}" for zone in ZONES),
        list(shares),
        capacity,
    )
    return selection


def selected_by_layer(selection: pl.DataFrame) -> dict[int, list[int]]:
    """Return {layer: sorted expert ids} of the selected rows of a ``select_experts`` table."""
    if "selected" not in selection.columns:
        raise ValueError(
            f"selection table has no `selected` column. Its columns are {selection.columns}. "
            "Build it with select_experts."
        )
    chosen = selection.filter(pl.col("selected")).select("layer", "expert").sort("layer", "expert")
    by_layer: dict[int, list[int]] = {}
    for layer, expert in chosen.iter_rows():
        by_layer.setdefault(int(layer), []).append(int(expert))
    return by_layer


# ---------------------------------------------------------------------------
# Freezing: train only the selected slices of the fused expert tensors
# ---------------------------------------------------------------------------


def _moe_block_name(layout: MoELayout, layer: int) -> str:
    # The experts are a sibling of the router: "model.layers.3.mlp.gate" -> "model.layers.3.mlp".
    return layout.router_modules[layer].rsplit(".", 1)[0]


def expert_parameters(model: torch.nn.Module, layout: MoELayout) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """Find the fused expert tensors of every MoE layer: {layer: [(parameter name, parameter)]}.

    A fused expert tensor is a parameter under the ``experts`` module of the layer's MoE block
    whose dim 0 is the expert index, (num_experts, ...). These are gate_up_proj (E, 2*I, H) and
    down_proj (E, H, I), plus the biases (E, 2*I) and (E, H) in gpt_oss. The router, which is also
    (E, H), and shared experts (Qwen2-MoE ``shared_expert``, DeepSeek-V3 ``shared_experts``) are
    not under ``experts`` and are excluded.
    """
    named = list(model.named_parameters())
    by_layer: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
    for layer in layout.moe_layers:
        block = _moe_block_name(layout, layer)
        prefix = f"{block}.experts."
        found = [
            (name, parameter)
            for name, parameter in named
            if name.startswith(prefix) and parameter.dim() >= 1 and parameter.shape[0] == layout.num_experts
        ]
        if not found:
            in_block = [name for name, _ in named if name.startswith(f"{block}.")]
            raise ValueError(
                f"MoE layer {layer} has no fused expert tensor (a parameter under {prefix!r} with dim 0 == "
                f"{layout.num_experts} experts). Parameters of {block!r}: {in_block}. RISE needs the fused "
                "expert layout of transformers 5."
            )
        by_layer[layer] = found
    return by_layer


def _check_selection(layout: MoELayout, selected: Mapping[int, Sequence[int]]) -> dict[int, list[int]]:
    """Validate {layer: expert ids} against the layout and drop layers with no expert."""
    checked: dict[int, list[int]] = {}
    for layer, experts in selected.items():
        if layer not in layout.router_modules:
            raise ValueError(f"selected layer {layer} is not an MoE layer. MoE layers: {layout.moe_layers}.")
        ids = sorted({int(expert) for expert in experts})
        invalid = [expert for expert in ids if not 0 <= expert < layout.num_experts]
        if invalid:
            raise ValueError(
                f"selected experts {invalid} of layer {layer} are outside [0, {layout.num_experts}). "
                "Pass expert ids of this model."
            )
        if ids:
            checked[int(layer)] = ids
    if not checked:
        raise ValueError(
            "no experts were selected, so nothing would train. Pass {layer: [expert ids]} with at least one id."
        )
    return checked


def _zero_frozen_slices_hook(frozen: torch.Tensor):
    """Build a gradient hook that zeroes dim-0 slices where ``frozen`` (bool, (E,)) is true."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        # (E,) -> (E, 1, ..., 1) so that the mask broadcasts over the expert's slice.
        mask = frozen.to(grad.device).view(-1, *([1] * (grad.dim() - 1)))
        # masked_fill writes exact zeros even where the gradient is inf or NaN, unlike grad * 0.
        return grad.masked_fill(mask, 0.0)

    return hook


def freeze_for_rise(
    model: torch.nn.Module, layout: MoELayout, selected: Mapping[int, Sequence[int]]
) -> tuple[list[torch.nn.Parameter], list[torch.utils.hooks.RemovableHandle]]:
    """Freeze ``model`` except the selected experts, given as {layer: expert ids}.

    Sets requires_grad=False on every parameter except the fused expert tensors (see
    ``expert_parameters``) of the layers that have selected experts. Routers, attention,
    embeddings, norms, shared experts and the expert tensors of other layers are frozen. On each
    trainable tensor a gradient hook zeroes the slices (dim 0) of the unselected experts of the
    layer, so only the selected slices receive a gradient.

    Returns (trainable parameters, hook handles). Call ``handle.remove()`` on each handle after
    training, because the hooks stay on the parameters otherwise.

    The optimizer must use weight_decay=0 for these tensors. torch.optim.AdamW defaults to
    weight_decay=0.01, and decoupled weight decay multiplies the whole tensor by
    (1 - lr * weight_decay), which would shrink the frozen slices although their gradient is 0.
    With weight_decay=0, AdamW leaves the frozen slices exactly unchanged: their gradient is
    always 0, so both moment estimates stay 0 and the update m / (sqrt(v) + eps) is 0. The
    official RISE training also uses weight decay 0.
    """
    chosen = _check_selection(layout, selected)
    tensors = expert_parameters(model, layout)

    for parameter in model.parameters():
        parameter.requires_grad_(False)

    trainable: list[torch.nn.Parameter] = []
    handles: list[torch.utils.hooks.RemovableHandle] = []
    trained_elements = 0
    for layer, experts in chosen.items():
        frozen = torch.ones(layout.num_experts, dtype=torch.bool)
        frozen[experts] = False
        for _name, parameter in tensors[layer]:
            parameter.requires_grad_(True)
            trainable.append(parameter)
            handles.append(parameter.register_hook(_zero_frozen_slices_hook(frozen)))
            # Each expert's slice has numel / E elements.
            trained_elements += parameter.numel() // layout.num_experts * len(experts)

    total_elements = sum(parameter.numel() for parameter in model.parameters())
    log.info(
        "RISE trains %d experts in %d layers %s: %d of %d parameters (%.4f%%), counting only the "
        "selected slices of %d fused expert tensors",
        sum(len(experts) for experts in chosen.values()),
        len(chosen),
        sorted(chosen),
        trained_elements,
        total_elements,
        100.0 * trained_elements / total_elements,
        len(trainable),
    )
    return trainable, handles
