"""Figures of routing divergence by layer and of task experts, written as PDF and PNG."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.colors import Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ramoe.plotting import save_figure  # noqa: E402
from ramoe.routing.divergence import CONTROL_ENGLISH, CONTROL_NONPARALLEL, PARALLEL  # noqa: E402

log = logging.getLogger(__name__)

METRIC_LABELS = {"hjsd": "entropy-normalised JSD", "jsd": "JSD (nats)"}
ZONE_COLOR = "#f2cc8f"
CONTROL_COLOR = "0.45"


def _zone_bounds(zones: pl.DataFrame | None, model: str, task: str) -> tuple[int, int, str] | None:
    if zones is None:
        return None
    rows = zones.filter((pl.col("model") == model) & (pl.col("task") == task))
    if rows.is_empty():
        return None
    first, last, method = rows.select("first_layer", "last_layer", "method").row(0)
    return first, last, method


LANGUAGE_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LANGUAGE_STYLES = ("-", "-.")


def _target_accuracy(accuracy: pl.DataFrame, split: str) -> dict[tuple[str, str, str], float]:
    rows = accuracy.filter(pl.col("split") == split)
    return {(m, t, lang): acc for m, t, lang, acc in rows.select("model", "task", "lang", "accuracy").iter_rows()}


def plot_divergence_by_layer(
    divergence: pl.DataFrame,
    accuracy: pl.DataFrame,
    pdf: str | Path,
    png: str | Path,
    *,
    columns: Sequence[str] = ("hjsd", "jsd"),
    zones: pl.DataFrame | None = None,
    accuracy_split: str = "train",
) -> None:
    """Plot divergence from English against layer: one row of panels per (model, task), one panel per metric.

    Each target language is one solid curve coloured by its ``accuracy_split`` accuracy.
    The English control is a grey dashed curve and the non-parallel control, averaged over
    target languages, a grey dotted one. With ``zones`` (the output of ``choose_zone``) the
    alignment zone is shaded.
    """
    panels = divergence.select("model", "task").unique().sort("model", "task").rows()
    if not panels:
        raise ValueError("divergence table is empty, so there is nothing to plot.")
    accuracy_by_lang = _target_accuracy(accuracy, accuracy_split)
    targets = divergence.filter(pl.col("comparison") == PARALLEL)
    known = [accuracy_by_lang[key] for key in targets.select("model", "task", "lang").unique().iter_rows()
             if key in accuracy_by_lang]
    low, high = (min(known), max(known)) if known else (0.0, 1.0)
    if low == high:
        low, high = low - 0.05, high + 0.05
    norm = Normalize(vmin=low, vmax=high)
    cmap = plt.get_cmap("viridis")

    fig, axes = plt.subplots(len(panels), len(columns), figsize=(4.2 * len(columns) + 1.0, 3.0 * len(panels)),
                             squeeze=False, layout="constrained")
    for row, (model, task) in enumerate(panels):
        rows = divergence.filter((pl.col("model") == model) & (pl.col("task") == task))
        zone = _zone_bounds(zones, model, task)
        for col, metric in enumerate(columns):
            ax = axes[row][col]
            if zone is not None:
                first, last, method = zone
                ax.axvspan(first - 0.5, last + 0.5, color=ZONE_COLOR, alpha=0.5, lw=0,
                           label=f"alignment zone ({method})")

            parallel = rows.filter(pl.col("comparison") == PARALLEL)
            for index, lang in enumerate(sorted(parallel["lang"].unique().to_list())):
                # Colour shows accuracy; marker and line style tell apart languages of equal accuracy.
                marker = LANGUAGE_MARKERS[index % len(LANGUAGE_MARKERS)]
                style = LANGUAGE_STYLES[(index // len(LANGUAGE_MARKERS)) % len(LANGUAGE_STYLES)]
                curve = parallel.filter(pl.col("lang") == lang).sort("layer")
                target_accuracy = accuracy_by_lang.get((model, task, lang))
                if target_accuracy is None:
                    log.warning("%s/%s/%s has no %s accuracy, so its curve is drawn black", model, task, lang,
                                accuracy_split)
                    color, label = "black", f"{lang} (no accuracy)"
                else:
                    color, label = cmap(norm(target_accuracy)), f"{lang} ({accuracy_split} acc {target_accuracy:.2f})"
                ax.plot(curve["layer"], curve[metric], color=color, marker=marker, ms=4, ls=style, lw=1.5,
                        label=label)

            english = rows.filter(pl.col("comparison") == CONTROL_ENGLISH).sort("layer")
            if not english.is_empty():
                ax.plot(english["layer"], english[metric], color=CONTROL_COLOR, ls="--", lw=1.2,
                        label="control: English vs English of another item")
            nonparallel = (
                rows.filter(pl.col("comparison") == CONTROL_NONPARALLEL)
                .group_by("layer").agg(pl.col(metric).mean()).sort("layer")
            )
            if not nonparallel.is_empty():
                ax.plot(nonparallel["layer"], nonparallel[metric], color=CONTROL_COLOR, ls=":", lw=1.5,
                        label="control: English vs target of another item (mean)")

            ax.set_title(f"{task} ({model})", fontsize=9)
            ax.set_xlabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.set_ylim(bottom=0)
        axes[row][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)

    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    colorbar = fig.colorbar(mappable, ax=axes.ravel().tolist(), location="left", shrink=0.8)
    colorbar.set_label(f"target accuracy ({accuracy_split} items)")
    fig.suptitle("Routing divergence from English by layer", fontsize=10)
    save_figure(fig, pdf, png)


def plot_task_experts(
    task_expert_table: pl.DataFrame, zones: pl.DataFrame | None, pdf: str | Path, png: str | Path
) -> None:
    """Plot delta as a layers x experts heatmap per (model, task), selected experts outlined, zone rows marked."""
    panels = task_expert_table.select("model", "task").unique().sort("model", "task").rows()
    if not panels:
        raise ValueError("task expert table is empty, so there is nothing to plot.")
    limit = float(np.abs(task_expert_table["delta"].to_numpy()).max()) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)

    num_experts = task_expert_table["expert"].n_unique()
    num_layers = task_expert_table["layer"].n_unique()
    width = 1.5 + max(3.0, 0.22 * num_experts) * len(panels)
    height = 1.2 + max(2.0, 0.3 * num_layers)
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained", figsize=(width, height))
    image = None
    for ax, (model, task) in zip(axes[0], panels, strict=True):
        rows = task_expert_table.filter((pl.col("model") == model) & (pl.col("task") == task))
        layers = sorted(rows["layer"].unique().to_list())
        experts = sorted(rows["expert"].unique().to_list())
        lookup = {(layer, expert): (delta, selected)
                  for layer, expert, delta, selected in rows.select("layer", "expert", "delta", "selected").iter_rows()}
        grid = np.array([[lookup[(layer, expert)][0] for expert in experts] for layer in layers])
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto", origin="lower")

        for y, layer in enumerate(layers):
            for x, expert in enumerate(experts):
                if lookup[(layer, expert)][1]:
                    ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5))

        zone = _zone_bounds(zones, model, task)
        if zone is not None:
            first, last, method = zone
            zone_rows = [y for y, layer in enumerate(layers) if first <= layer <= last]
            if zone_rows:
                outline = Rectangle((-0.5, zone_rows[0] - 0.5), len(experts), len(zone_rows), fill=False,
                                    edgecolor="#e07a5f", lw=2, ls="--", clip_on=False,
                                    label=f"alignment zone ({method})")
                ax.add_patch(outline)
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)

        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        step = max(1, len(experts) // 16)
        ax.set_xticks(range(0, len(experts), step), [str(expert) for expert in experts[::step]], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{task} ({model})", fontsize=9)

    colorbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    colorbar.set_label("delta: task minus general activation rate")
    fig.suptitle("Task experts (outlined: selected)", fontsize=10)
    save_figure(fig, pdf, png)
