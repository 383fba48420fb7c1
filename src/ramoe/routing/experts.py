"""Task experts and language-specific experts from top-k activation rates.

The activation rate of expert e at layer l is the mean over sequences of a_i[e] / L_i, where
a_i[e] is the number of tokens of sequence i whose top-k contains e and L_i its number of
tokens. As in Bandarkar et al. (2025), "Multilingual Routing in Mixture-of-Experts"
(arXiv:2510.04694), the task-specificity of an expert is

    delta(l, e) = rate over English task sequences - rate over general English text,

and e is a task expert of layer l iff delta > tau, keeping at most ``top_k`` experts per layer
(those with the largest delta). Language-specific experts use the same rule with a language's
task sequences against the English task sequences.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

TRACE_COLUMNS = ("layer", "n_tokens", "topk_counts")


def activation_rates(trace: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Compute (layers, rates): the sorted layer ids (n_layers,) and the (n_layers, E) mean of a_i[e] / L_i.

    Each layer averages over the sequences that have a row at that layer. A rate is a share of
    tokens, so it lies in [0, 1]. With k experts per token, a layer's rates sum to k.
    """
    missing = [column for column in TRACE_COLUMNS if column not in trace.columns]
    if missing:
        raise ValueError(f"routing table is missing columns {missing}. Its columns are {trace.columns}.")
    if trace.is_empty():
        raise ValueError("routing table is empty, but activation rates need at least one sequence.")
    if (trace["n_tokens"] <= 0).any():
        raise ValueError("routing table has sequences with n_tokens <= 0. Every sequence needs at least one token.")
    widths = trace["topk_counts"].list.len().unique().to_list()
    if len(widths) != 1:
        raise ValueError(
            f"routing table mixes topk_counts of lengths {sorted(widths)}, but every row needs the same E."
        )
    num_experts = widths[0]

    counts = trace["topk_counts"].list.to_array(num_experts).to_numpy().astype(np.float64)
    lengths = trace["n_tokens"].to_numpy().astype(np.float64)
    if np.any(counts < 0) or np.any(counts > lengths[:, None]):
        raise ValueError(
            "routing table has topk_counts outside [0, n_tokens]. A count is a number of the sequence's tokens."
        )
    shares = counts / lengths[:, None]

    layer_ids = trace["layer"].to_numpy()
    layers = np.unique(layer_ids)
    rates = np.stack([shares[layer_ids == layer].mean(axis=0) for layer in layers])
    return layers, rates


def _select(delta: np.ndarray, tau: float, top_k: int) -> np.ndarray:
    """Mark, per row of delta (layers, E), the at most top_k largest entries above tau."""
    # A stable sort on -delta breaks ties towards the lower expert id.
    order = np.argsort(-delta, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(delta.shape[1])[None, :].repeat(delta.shape[0], axis=0), axis=1)
    return (delta > tau) & (rank < top_k)


def _delta_table(
    trace: pl.DataFrame, reference: pl.DataFrame, *, tau: float, top_k: int, name: str, reference_name: str
) -> pl.DataFrame:
    if top_k < 1:
        raise ValueError(f"invalid top_k {top_k}. Keep at least 1 expert per layer.")
    layers, rates = activation_rates(trace)
    reference_layers, reference_rates = activation_rates(reference)
    if not np.array_equal(layers, reference_layers):
        raise ValueError(
            f"{name} and {reference_name} routing tables cover different layers: "
            f"{layers.tolist()} and {reference_layers.tolist()}. Both must come from the same model."
        )
    if rates.shape[1] != reference_rates.shape[1]:
        raise ValueError(f"{name} and {reference_name} have {rates.shape[1]} and {reference_rates.shape[1]} experts.")

    delta = rates - reference_rates
    selected = _select(delta, tau, top_k)
    num_layers, num_experts = delta.shape
    log.info("%s against %s: %d experts selected over %d layers (tau=%g, top_k=%d)",
             name, reference_name, int(selected.sum()), num_layers, tau, top_k)
    return pl.DataFrame(
        {
            "layer": np.repeat(layers, num_experts),
            "expert": np.tile(np.arange(num_experts), num_layers),
            "delta": delta.ravel(),
            "selected": selected.ravel(),
        },
        schema_overrides={"layer": pl.Int64, "expert": pl.Int64},
    )


def task_experts(
    task_trace: pl.DataFrame, general_trace: pl.DataFrame, *, tau: float, top_k: int, model: str, task: str
) -> pl.DataFrame:
    """Find the task experts of every layer: English task sequences against general English text.

    Returns one row per (layer, expert) with columns model, task, layer, expert, delta, selected.
    """
    table = _delta_table(task_trace, general_trace, tau=tau, top_k=top_k,
                         name=f"{model}/{task}/en", reference_name="general English")
    return table.select(pl.lit(model).alias("model"), pl.lit(task).alias("task"), pl.all())


def language_experts(
    lang_trace: pl.DataFrame,
    english_trace: pl.DataFrame,
    *,
    tau: float,
    top_k: int,
    model: str,
    task: str,
    lang: str,
) -> pl.DataFrame:
    """Find the language-specific experts of every layer: a language's task sequences against English ones.

    Returns one row per (layer, expert) with columns model, task, lang, layer, expert, delta, selected.
    """
    table = _delta_table(lang_trace, english_trace, tau=tau, top_k=top_k,
                         name=f"{model}/{task}/{lang}", reference_name=f"{model}/{task}/en")
    return table.select(pl.lit(model).alias("model"), pl.lit(task).alias("task"), pl.lit(lang).alias("lang"), pl.all())


def expert_mask(task_expert_table: pl.DataFrame) -> dict:
    """Convert a ``task_experts`` table of one (model, task) into a JSON-ready mask.

    Returns ``{"num_experts": E, "layers": {str(layer): [expert ids]}}`` with every layer of the
    table, an empty list where no expert is selected, and expert ids ascending.
    """
    pairs = task_expert_table.select("model", "task").unique()
    if pairs.height != 1:
        raise ValueError(f"expert_mask takes the table of one (model, task), got {sorted(pairs.rows())}.")
    per_layer = task_expert_table.group_by("layer").agg(pl.len().alias("n"), pl.col("expert").max().alias("max"))
    num_experts = int(per_layer["max"].max()) + 1
    if per_layer["n"].unique().to_list() != [num_experts]:
        raise ValueError(f"task expert table must have one row per expert 0..{num_experts - 1} at every layer.")

    layers: dict[str, list[int]] = {}
    for layer in sorted(task_expert_table["layer"].unique().to_list()):
        rows = task_expert_table.filter((pl.col("layer") == layer) & pl.col("selected"))
        layers[str(layer)] = sorted(int(expert) for expert in rows["expert"].to_list())
    return {"num_experts": num_experts, "layers": layers}
