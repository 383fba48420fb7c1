"""Figures of the method comparison: accuracy per method and language, and RA-MoE's gain against the ci share."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on clusters and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ramoe.analysis.results import FINE_TUNED_METHODS, METHODS  # noqa: E402
from ramoe.plotting import save_figure  # noqa: E402

log = logging.getLogger(__name__)

METHOD_COLORS = {
    "base": "#8d99ae",
    "steering": "#edae49",
    "sft": "#00798c",
    "ramoe": "#d1495b",
    "rise": "#66a182",
}
METHOD_LABELS = {
    "base": "base model",
    "steering": "Routing Steering",
    "sft": "SFT",
    "ramoe": "RA-MoE",
    "rise": "RISE",
}
TASK_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MODEL_FILLSTYLES = ("full", "none", "left", "right", "bottom", "top")
SUMMARY_COLUMNS = ("model", "task", "lang", "train_lang", "method", "accuracy", "ci_low", "ci_high")
GAIN_COLUMNS = ("model", "task", "lang", "ci_share", "gain", "gain_ci_low", "gain_ci_high",
                "pearson_r", "spearman_r", "n_pairs")


def _require_columns(table: pl.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{name} lacks the columns {missing}; expected at least {list(columns)}.")
    if table.is_empty():
        raise ValueError(f"{name} is empty, so there is nothing to plot.")


def _grouped_bars(ax: plt.Axes, rows: pl.DataFrame, group_column: str, groups: list[str],
                  methods: list[str]) -> None:
    """Draw one bar per (group, method) with its CI as an error bar, methods side by side within a group."""
    width = 0.8 / len(methods)
    lookup = {(group, method): (accuracy, low, high)
              for group, method, accuracy, low, high
              in rows.select(group_column, "method", "accuracy", "ci_low", "ci_high").iter_rows()}
    for slot, method in enumerate(methods):
        positions, heights, below, above = [], [], [], []
        for index, group in enumerate(groups):
            if (group, method) not in lookup:
                continue
            accuracy, low, high = lookup[(group, method)]
            positions.append(index + (slot - (len(methods) - 1) / 2) * width)
            heights.append(accuracy)
            below.append(max(accuracy - low, 0.0))
            above.append(max(high - accuracy, 0.0))
        if positions:
            ax.bar(positions, heights, width=width, color=METHOD_COLORS[method])
            ax.errorbar(positions, heights, yerr=[below, above], fmt="none", ecolor="black", elinewidth=0.8,
                        capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)


def _base_english_accuracy(summary: pl.DataFrame, model: str, task: str) -> float | None:
    row = summary.filter((pl.col("model") == model) & (pl.col("task") == task) & (pl.col("lang") == "en")
                         & (pl.col("method") == "base"))
    return None if row.is_empty() else float(row["accuracy"][0])


def plot_main_results(summary: pl.DataFrame, pdf: str | Path, png: str | Path) -> None:
    """Plot test accuracy per method as grouped bars with CI error bars, one column of panels per (model, task).

    ``summary`` is the output of ``method_summary``. The top row shows each target language
    with every method (base, steering, sft, ramoe, rise in that order). The bottom row, drawn
    when fine-tuned methods were also evaluated in English, shows English accuracy after
    fine-tuning on each target language, with the base model's English accuracy as a dashed line.
    """
    _require_columns(summary, SUMMARY_COLUMNS, "summary")
    summary = summary.with_columns(pl.col("train_lang").fill_null(""))
    panels = summary.select("model", "task").unique().sort("model", "task").rows()
    methods = [method for method in METHODS if method in set(summary["method"].to_list())]
    tuned_methods = [method for method in methods if method in FINE_TUNED_METHODS]

    # Target rows: a method evaluated on a non-English language, fine-tuned on that language if at all.
    targets = summary.filter((pl.col("lang") != "en")
                             & ((pl.col("train_lang") == "") | (pl.col("train_lang") == pl.col("lang"))))
    english_after = summary.filter((pl.col("lang") == "en") & (pl.col("train_lang") != "")
                                   & pl.col("method").is_in(FINE_TUNED_METHODS))
    n_rows = 2 if not english_after.is_empty() else 1
    n_groups = max(targets["lang"].n_unique(), english_after["train_lang"].n_unique(), 1)
    panel_width = max(3.5, 1.0 + 0.8 * n_groups)
    fig, axes = plt.subplots(n_rows, len(panels), figsize=(panel_width * len(panels), 3.2 * n_rows + 0.6),
                             squeeze=False, layout="constrained")

    for column, (model, task) in enumerate(panels):
        in_panel = (pl.col("model") == model) & (pl.col("task") == task)
        rows = targets.filter(in_panel)
        ax = axes[0][column]
        _grouped_bars(ax, rows, "lang", sorted(rows["lang"].unique().to_list()), methods)
        ax.set_title(f"{task} ({model}): target-language test accuracy", fontsize=9)
        ax.set_xlabel("target language")
        ax.set_ylabel("test accuracy")

        if n_rows == 1:
            continue
        rows = english_after.filter(in_panel)
        ax = axes[1][column]
        _grouped_bars(ax, rows, "train_lang", sorted(rows["train_lang"].unique().to_list()), tuned_methods)
        base_english = _base_english_accuracy(summary, model, task)
        if base_english is None:
            log.warning("model %r, task %r has no base English accuracy, so the English panel has no base line",
                        model, task)
        else:
            ax.axhline(base_english, color=METHOD_COLORS["base"], ls="--", lw=1.2)
        ax.set_title(f"{task} ({model}): English test accuracy after fine-tuning", fontsize=9)
        ax.set_xlabel("language of the fine-tuning data")
        ax.set_ylabel("English test accuracy")

    handles = [Patch(color=METHOD_COLORS[method], label=METHOD_LABELS[method]) for method in methods]
    if n_rows == 2:
        handles.append(Line2D([], [], color=METHOD_COLORS["base"], ls="--", label="base model, English"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Test accuracy per method (fine-tuned methods averaged over seeds; "
                 "error bars: bootstrap CI over test items)", fontsize=10)
    save_figure(fig, pdf, png)


def _correlation_text(table: pl.DataFrame) -> str:
    pearson, spearman, n_pairs = table.select("pearson_r", "spearman_r", "n_pairs").row(0)
    if pearson is None or spearman is None or math.isnan(pearson) or math.isnan(spearman):
        return f"Pearson r and Spearman \u03c1 undefined (n = {n_pairs}; they need 3 pairs and non-constant values)"
    return f"Pearson r = {pearson:.2f}, Spearman \u03c1 = {spearman:.2f}, n = {n_pairs} task-language pairs"


def merged_labels(
    labels: list[str], x: np.ndarray, y: np.ndarray, spans: tuple[float, float], closeness: float = 0.03
) -> list[tuple[str, float, float]]:
    """Join the labels of points that would overlap into one, as (text, x, y) at the first point's place.

    Two points overlap when they are closer than ``closeness`` times the axis span on both axes.
    ``spans`` is (x span, y span), and a zero span counts every point as close on that axis.
    Labels keep their order, joined with ", ".
    """
    groups: list[tuple[list[str], float, float]] = []
    for label, x_value, y_value in zip(labels, x, y, strict=True):
        for names, group_x, group_y in groups:
            close_x = abs(x_value - group_x) <= closeness * spans[0]
            close_y = abs(y_value - group_y) <= closeness * spans[1]
            if close_x and close_y:
                names.append(label)
                break
        else:
            groups.append(([label], float(x_value), float(y_value)))
    return [(", ".join(names), group_x, group_y) for names, group_x, group_y in groups]


def plot_ci_vs_gain(table: pl.DataFrame, pdf: str | Path, png: str | Path) -> None:
    """Scatter RA-MoE's test accuracy gain over SFT (with CI) against the ci share of train items.

    ``table`` is the output of ``ci_vs_gain``. Each task has its own colour and marker, each
    model its own marker fill, and each point is labelled with its language. A least-squares
    line over all points is drawn when there are at least 3 points with different ci shares.
    The pooled correlation from the table is shown in the title.
    """
    _require_columns(table, GAIN_COLUMNS, "ci_vs_gain table")
    tasks = sorted(table["task"].unique().to_list())
    models = sorted(table["model"].unique().to_list())
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    # Axis spans, for deciding which points are close enough to share one label.
    spans = (float(np.ptp(table["ci_share"].to_numpy())),
             float(np.ptp(np.concatenate([table["gain_ci_low"].to_numpy(), table["gain_ci_high"].to_numpy()]))))

    for model_index, model in enumerate(models):
        for task_index, task in enumerate(tasks):
            rows = table.filter((pl.col("model") == model) & (pl.col("task") == task)).sort("lang")
            if rows.is_empty():
                continue
            x = rows["ci_share"].to_numpy()
            y = rows["gain"].to_numpy()
            below = np.clip(y - rows["gain_ci_low"].to_numpy(), 0.0, None)
            above = np.clip(rows["gain_ci_high"].to_numpy() - y, 0.0, None)
            label = task if len(models) == 1 else f"{task} ({model})"
            ax.errorbar(x, y, yerr=[below, above], fmt=TASK_MARKERS[task_index % len(TASK_MARKERS)], ms=6,
                        color=colors(task_index % 10), fillstyle=MODEL_FILLSTYLES[model_index % len(MODEL_FILLSTYLES)],
                        ecolor="0.5", elinewidth=0.8, capsize=3, label=label)
            for text, x_value, y_value in merged_labels(rows["lang"].to_list(), x, y, spans):
                ax.annotate(text, (x_value, y_value), xytext=(4, 4), textcoords="offset points", fontsize=7)

    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    x_all = table["ci_share"].to_numpy()
    y_all = table["gain"].to_numpy()
    if x_all.size >= 3 and np.ptp(x_all) > 0:
        slope, intercept = np.polyfit(x_all, y_all, 1)
        line_x = np.linspace(x_all.min(), x_all.max(), 50)
        ax.plot(line_x, intercept + slope * line_x, color="black", lw=1.0, ls=":",
                label=f"least-squares fit, all points\n(slope {slope:.2f})")

    ax.set_xlabel("ci share of train items (English correct, target incorrect)")
    ax.set_ylabel("RA-MoE minus SFT test accuracy")
    ax.set_title(f"RA-MoE gain over SFT against the ci share\n{_correlation_text(table)}\n"
                 "(error bars: bootstrap CI over test items)", fontsize=9)
    ax.legend(title="task" if len(models) == 1 else "task (model)", fontsize=8, title_fontsize=8,
              loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    save_figure(fig, pdf, png)
