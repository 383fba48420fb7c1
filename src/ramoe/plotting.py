"""Figures, written as PDF and PNG from the result tables."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from ramoe.categories import CATEGORIES  # noqa: E402
from ramoe.io import atomic_path  # noqa: E402

log = logging.getLogger(__name__)

CATEGORY_COLORS = {"cc": "#4c956c", "ci": "#d1495b", "ic": "#edae49", "ii": "#8d99ae"}
CATEGORY_LABELS = {
    "cc": "cc: English and target correct",
    "ci": "ci: English correct, target incorrect",
    "ic": "ic: English incorrect, target correct",
    "ii": "ii: both incorrect",
}


def save_figure(fig: plt.Figure, pdf: str | Path, png: str | Path) -> None:
    """Write one figure as PDF and PNG (150 dpi), each atomically."""
    for path, kwargs in ((pdf, {}), (png, {"dpi": 150})):
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip("."), bbox_inches="tight", **kwargs)
    plt.close(fig)
    log.info("wrote %s and %s", pdf, png)


def _stacked_bars(ax: plt.Axes, rows: pl.DataFrame) -> None:
    """Draw one panel: a bar per language, stacked cc/ci/ic/ii, shares of at least 0.08 labelled."""
    langs = rows["lang"].to_list()
    bottom = [0.0] * len(langs)
    for category in CATEGORIES:
        values = rows[category].to_list()
        ax.bar(langs, values, bottom=bottom, color=CATEGORY_COLORS[category], label=CATEGORY_LABELS[category],
               width=0.7)
        for x, (b, v) in enumerate(zip(bottom, values, strict=True)):
            if v >= 0.08:
                ax.text(x, b + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylim(0, 1)


def plot_categories(table: pl.DataFrame, pdf: str | Path, png: str | Path) -> None:
    """Plot stacked bars of the cc/ci/ic/ii shares per target language, one panel per (model, task)."""
    panels = table.select("model", "task").unique(maintain_order=True).rows()
    n_langs = table.group_by("model", "task").len()["len"].max()

    # Side by side while the figure stays under about 12 inches wide, else one panel per row.
    side_by_side = (1.2 + 0.6 * n_langs) * len(panels) <= 12
    shape = (1, len(panels)) if side_by_side else (len(panels), 1)
    width = (1.2 + 0.6 * n_langs) * (len(panels) if side_by_side else 1)
    height = 3.6 if side_by_side else 3.0 * len(panels)
    fig, axes = plt.subplots(*shape, figsize=(max(width, 4.0), height), squeeze=False, sharey=True)
    if not side_by_side:
        fig.subplots_adjust(hspace=0.3)

    for ax, (model, task) in zip(axes.ravel(), panels, strict=True):
        _stacked_bars(ax, table.filter((pl.col("model") == model) & (pl.col("task") == task)).sort("lang"))
        ax.set_title(f"{task} ({model})", fontsize=9)
        if side_by_side or ax is axes[-1][0]:
            ax.set_xlabel("target language")
    for ax in axes[:, 0]:
        ax.set_ylabel("share of train items")

    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle("Parallel train items by correctness in English (1st letter) and the target (2nd)", fontsize=10)
    save_figure(fig, pdf, png)
