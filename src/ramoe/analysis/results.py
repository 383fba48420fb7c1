"""Result tables of the method comparison: accuracy per method and seed, per-method summaries, ci share vs gain.

Inputs are per-example evaluation frames with the columns in REQUIRED_COLUMNS. Only test rows
are used. ``model`` names the pretrained model for every method, so a fine-tuned method's rows
share it with the base rows. ``train_lang`` is the target language whose data fine-tuned the
model. It is null (or "") for base and steering, which are not fine-tuned, and the tables write
it as "".
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from ramoe.analysis.stats import bootstrap_mean_ci, correlation, paired_difference

log = logging.getLogger(__name__)

METHODS = ("base", "steering", "sft", "ramoe", "rise")
FINE_TUNED_METHODS = ("sft", "ramoe", "rise")
REQUIRED_COLUMNS = (
    "model", "method", "seed", "task", "lang", "train_lang", "split", "item_id", "correct", "parse_failure"
)
TEST_SPLIT = "test"
# Keys of one evaluated system on one evaluation language. Seeds and items vary within it.
SYSTEM_KEYS = ("model", "task", "lang", "train_lang", "method")
# Number of offending values that error messages show.
EXAMPLES_SHOWN = 5


def _check_train_lang(rows: pl.DataFrame) -> None:
    """Raise unless fine-tuned methods name their training language and the others leave it empty."""
    unnamed = rows.filter(pl.col("method").is_in(FINE_TUNED_METHODS) & (pl.col("train_lang") == ""))
    if not unnamed.is_empty():
        methods = sorted(unnamed["method"].unique().to_list())
        raise ValueError(
            f"{unnamed.height} rows of fine-tuned method(s) {methods} have an empty train_lang; "
            "set it to the target language whose data fine-tuned the model."
        )
    named = rows.filter(~pl.col("method").is_in(FINE_TUNED_METHODS) & (pl.col("train_lang") != ""))
    if not named.is_empty():
        sample = named.select("method", "train_lang").unique().sort("method", "train_lang").head(EXAMPLES_SHOWN).rows()
        raise ValueError(
            f"{named.height} rows of methods that are not fine-tuned have a train_lang, e.g. (method, train_lang) "
            f"{sample}; leave train_lang null for base and steering."
        )


def _test_rows(examples: pl.DataFrame) -> pl.DataFrame:
    """Validate a per-example frame and return its test rows with train_lang "" where null.

    ``correct`` and ``parse_failure`` become Float64 (1.0 = true) so that their means are rates.
    ``score`` (the token F1 of span answers, null for other tasks) is kept as Float64, and is
    null throughout when the frame has no such column.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in examples.columns]
    if missing:
        raise ValueError(f"examples lack the columns {missing}; "
                         f"a per-example evaluation frame has {list(REQUIRED_COLUMNS)}.")
    unknown = sorted(str(method) for method in set(examples["method"].unique().to_list()) - set(METHODS))
    if unknown:
        raise ValueError(f"examples contain the unknown method(s) {unknown}; each method must be one of {METHODS}.")

    rows = examples.filter(pl.col("split") == TEST_SPLIT)
    if rows.is_empty():
        splits = sorted(str(split) for split in examples["split"].unique().to_list())
        raise ValueError(f"examples have no rows with split == {TEST_SPLIT!r} (splits present: {splits}); "
                         "evaluate the methods on the test items first.")
    for column in ("correct", "parse_failure"):
        if rows[column].null_count():
            raise ValueError(f"{rows[column].null_count()} test rows have a null {column!r}; "
                             "every evaluated example needs a true or false value.")

    rows = rows.select(
        pl.col("model", "task", "lang", "method", "item_id").cast(pl.String),
        pl.col("train_lang").cast(pl.String).fill_null(""),
        pl.col("seed").cast(pl.Int64),
        pl.col("correct", "parse_failure").cast(pl.Float64),
        (pl.col("score") if "score" in examples.columns else pl.lit(None)).cast(pl.Float64).alias("score"),
    )
    _check_train_lang(rows)

    duplicated = rows.filter(rows.select(*SYSTEM_KEYS, "seed", "item_id").is_duplicated())
    if not duplicated.is_empty():
        sample = (duplicated.select("method", "lang", "train_lang", "seed", "item_id")
                  .unique().sort("method", "lang", "train_lang", "seed", "item_id").head(EXAMPLES_SHOWN).rows())
        raise ValueError(
            f"{duplicated.height} test rows repeat an item of the same system and seed, e.g. (method, lang, "
            f"train_lang, seed, item_id) {sample}; keep one evaluation per item, or they would count twice."
        )
    return rows


def _method_rank() -> pl.Expr:
    return pl.col("method").replace_strict({method: rank for rank, method in enumerate(METHODS)},
                                           return_dtype=pl.Int64)


def _sort_rows(frame: pl.DataFrame, *extra: str) -> pl.DataFrame:
    """Sort by model, task, lang, the order of METHODS, then train_lang and ``extra``."""
    return (
        frame.with_columns(_method_rank=_method_rank())
        .sort("model", "task", "lang", "_method_rank", "train_lang", *extra)
        .drop("_method_rank")
    )


def _describe(keys: tuple, names: tuple[str, ...] = SYSTEM_KEYS) -> str:
    return ", ".join(f"{name} {value!r}" for name, value in zip(names, keys, strict=True))


def _item_seed_matrix(rows: pl.DataFrame, label: str) -> tuple[list[str], list[int], np.ndarray]:
    """Arrange one system's correctness as an (items, seeds) matrix, items and seeds sorted.

    Raises ValueError when some seed lacks an item that another seed has, because then seeds
    would be averaged over different items.
    """
    items = rows["item_id"].unique().sort()
    seeds = rows["seed"].unique().sort()
    if rows.height != items.len() * seeds.len():
        grid = pl.DataFrame({"item_id": items}).join(pl.DataFrame({"seed": seeds}), how="cross")
        absent = grid.join(rows, on=["item_id", "seed"], how="anti").head(EXAMPLES_SHOWN).rows()
        raise ValueError(
            f"{label}: the seeds were not evaluated on the same test items, e.g. (item_id, seed) {absent} are "
            "missing; evaluate every seed on all test items."
        )
    matrix = rows.sort("item_id", "seed")["correct"].to_numpy().reshape(items.len(), seeds.len())
    return items.to_list(), seeds.to_list(), matrix


def main_results(examples: pl.DataFrame, *, n_boot: int, seed: int) -> pl.DataFrame:
    """Compute test accuracy per (model, task, lang, train_lang, method, seed).

    Columns: model, task, lang, train_lang ("" for base and steering), method, seed, n (test
    items), accuracy, ci_low and ci_high (percentile bootstrap over items, 95%),
    parse_failure_rate, and f1: the mean token F1 of span-answer tasks (XQuAD), where accuracy
    is exact match, and null for other tasks. Rows are sorted by model, task, lang, the order of
    METHODS, train_lang and seed. Raises ValueError for a method outside METHODS, a frame
    without test rows or an item evaluated twice.
    """
    rows = _test_rows(examples)
    table = rows.group_by(*SYSTEM_KEYS, "seed").agg(
        n=pl.len(),
        accuracy=pl.col("correct").mean(),
        parse_failure_rate=pl.col("parse_failure").mean(),
        f1=_f1_mean(),
        _scores=pl.col("correct"),
    )
    # Every group resamples from the same seed, so a group's interval does not depend on
    # which other groups the frame contains.
    intervals = [bootstrap_mean_ci(np.asarray(scores), n_boot=n_boot, seed=seed)[1:]
                 for scores in table["_scores"].to_list()]
    table = table.drop("_scores").with_columns(
        ci_low=pl.Series([low for low, _ in intervals], dtype=pl.Float64),
        ci_high=pl.Series([high for _, high in intervals], dtype=pl.Float64),
    )
    columns = [*SYSTEM_KEYS, "seed", "n", "accuracy", "ci_low", "ci_high", "parse_failure_rate", "f1"]
    return _sort_rows(table.select(columns), "seed")


def _f1_mean() -> pl.Expr:
    """Mean token F1 over the rows, or null unless every row has one (a span-answer task)."""
    score = pl.col("score")
    return pl.when(score.null_count() == 0).then(score.mean()).otherwise(None).cast(pl.Float64)


def _warn_items_differ_from_base(summary_items: dict[tuple, list[str]]) -> None:
    """Log a warning for each system evaluated on other test items than the base model."""
    for keys, items in summary_items.items():
        model, task, lang, _, method = keys
        base_items = summary_items.get((model, task, lang, "", "base"))
        if base_items is not None and method != "base" and items != base_items:
            log.warning("%s and the base model were evaluated on different test items (%d and %d items), so its "
                        "gain_over_base compares different items", _describe(keys), len(items), len(base_items))


def method_summary(examples: pl.DataFrame, *, n_boot: int, seed: int) -> pl.DataFrame:
    """Summarise each (model, task, lang, train_lang, method) over its seeds.

    Columns: the keys, n_seeds, n (test items), accuracy (mean over seeds and items),
    ci_low and ci_high (percentile bootstrap, 95%, over items of the per-item mean over
    seeds), parse_failure_rate, f1 (as in ``main_results``, over seeds and items) and
    gain_over_base: the accuracy minus the base accuracy on the same model, task and lang, null
    where no base row exists.
    Rows are sorted like ``main_results``.
    Raises ValueError when the seeds of one system cover different test items.
    """
    rows = _test_rows(examples)
    records = []
    items_by_system: dict[tuple, list[str]] = {}
    for keys, system in rows.partition_by(*SYSTEM_KEYS, as_dict=True, maintain_order=True).items():
        items, seeds, matrix = _item_seed_matrix(system, _describe(keys))
        accuracy, low, high = bootstrap_mean_ci(matrix, n_boot=n_boot, seed=seed)
        items_by_system[keys] = items
        records.append({
            **dict(zip(SYSTEM_KEYS, keys, strict=True)),
            "n_seeds": len(seeds),
            "n": len(items),
            "accuracy": accuracy,
            "ci_low": low,
            "ci_high": high,
            "parse_failure_rate": float(system["parse_failure"].mean()),
            "f1": system.select(_f1_mean()).item(),
        })
    _warn_items_differ_from_base(items_by_system)

    summary = pl.DataFrame(records).with_columns(pl.col("f1").cast(pl.Float64))
    base = summary.filter(pl.col("method") == "base").select("model", "task", "lang", _base_accuracy="accuracy")
    summary = (
        summary.join(base, on=["model", "task", "lang"], how="left")
        .with_columns(gain_over_base=pl.col("accuracy") - pl.col("_base_accuracy"))
        .drop("_base_accuracy")
    )
    return _sort_rows(summary)


def _ci_share(categories: pl.DataFrame, model: str, task: str, lang: str) -> tuple[float, int]:
    """Return the ci share of train items and the ci count round(ci * n) for one target language."""
    row = categories.filter((pl.col("model") == model) & (pl.col("task") == task) & (pl.col("lang") == lang))
    if row.height != 1:
        raise ValueError(
            f"categories have {row.height} rows for model {model!r}, task {task!r}, lang {lang!r}, expected 1; "
            "compute the cc/ci/ic/ii shares for every target language that was fine-tuned."
        )
    share, n = row.select("ci", "n").row(0)
    # ci * n is a whole count up to float rounding.
    return float(share), int(np.rint(share * n))


def _paired_matrices(cell: pl.DataFrame, label: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Return RA-MoE and SFT (items, seeds) matrices on the seeds both have, rows paired by item_id."""
    sft = cell.filter(pl.col("method") == "sft")
    ramoe = cell.filter(pl.col("method") == "ramoe")
    sft_seeds = set(sft["seed"].to_list())
    ramoe_seeds = set(ramoe["seed"].to_list())
    seeds = sorted(sft_seeds & ramoe_seeds)
    if not seeds:
        raise ValueError(f"{label}: sft seeds {sorted(sft_seeds)} and ramoe seeds {sorted(ramoe_seeds)} have none in "
                         "common; evaluate both methods with at least one shared seed.")
    if sft_seeds != ramoe_seeds:
        log.info("%s: using the %d seeds %s that both sft and ramoe have (sft %s, ramoe %s)",
                 label, len(seeds), seeds, sorted(sft_seeds), sorted(ramoe_seeds))
    sft_items, _, sft_matrix = _item_seed_matrix(sft.filter(pl.col("seed").is_in(seeds)), f"{label}, method 'sft'")
    ramoe_items, _, ramoe_matrix = _item_seed_matrix(ramoe.filter(pl.col("seed").is_in(seeds)),
                                                     f"{label}, method 'ramoe'")

    for method, items, other_method, other_items in (("sft", sft_items, "ramoe", ramoe_items),
                                                     ("ramoe", ramoe_items, "sft", sft_items)):
        lacking = sorted(set(other_items) - set(items))
        if lacking:
            raise ValueError(
                f"{label}: method {method!r} lacks {len(lacking)} test items that {other_method!r} has, e.g. "
                f"{lacking[:EXAMPLES_SHOWN]}; evaluate both methods on the same test items."
            )
    # Both item lists are sorted and equal, so the matrix rows are paired by item_id.
    return ramoe_matrix, sft_matrix, seeds


def ci_vs_gain(
    examples: pl.DataFrame, categories: pl.DataFrame, *, n_boot: int, n_perm: int, seed: int
) -> pl.DataFrame:
    """Relate the ci share of each target language to RA-MoE's test accuracy gain over SFT.

    One row per (model, task, lang) where both sft and ramoe were fine-tuned and evaluated on
    that target language (lang == train_lang). Items are paired by item_id and only seeds that
    both methods have are used.

    Columns: model, task, lang, ci_share and n_ci (round(ci * n) from ``categories``),
    sft_accuracy and ramoe_accuracy (mean over those seeds and items), gain (ramoe - sft),
    gain_ci_low and gain_ci_high (95% bootstrap over items), p_value (paired sign-flip
    permutation test), n_items and n_seeds. The correlation of ci_share with gain across all
    rows is repeated on every row as pearson_r, spearman_r and n_pairs, and is NaN with fewer
    than 3 rows.

    Languages without ci examples are kept with a warning. Raises ValueError when the methods
    were evaluated on different items or share no seed, when no language has both methods, or
    when ``categories`` lacks a language.
    """
    rows = _test_rows(examples)
    missing = [column for column in ("model", "task", "lang", "n", "ci") if column not in categories.columns]
    if missing:
        raise ValueError(f"categories lack the columns {missing}; pass the table that category_shares writes.")
    tuned = rows.filter(pl.col("method").is_in(["sft", "ramoe"]) & (pl.col("lang") == pl.col("train_lang")))

    records = []
    for (model, task, lang), cell in tuned.partition_by("model", "task", "lang", as_dict=True).items():
        label = _describe((model, task, lang), ("model", "task", "lang"))
        methods = set(cell["method"].to_list())
        if methods != {"sft", "ramoe"}:
            log.warning("%s has test results only for %s, so it has no RA-MoE vs SFT gain and is left out",
                        label, sorted(methods))
            continue
        ramoe_matrix, sft_matrix, seeds = _paired_matrices(cell, label)
        share, n_ci = _ci_share(categories, model, task, lang)
        if n_ci == 0:
            log.warning("%s has no ci train items, so RA-MoE's alignment loss had no examples there; its gain over "
                        "SFT is kept but reflects training noise only", label)
        comparison = paired_difference(ramoe_matrix, sft_matrix, n_boot=n_boot, n_perm=n_perm, seed=seed)
        records.append({
            "model": model, "task": task, "lang": lang, "ci_share": share, "n_ci": n_ci,
            "sft_accuracy": float(sft_matrix.mean()), "ramoe_accuracy": float(ramoe_matrix.mean()),
            "gain": comparison["diff"], "gain_ci_low": comparison["ci_low"], "gain_ci_high": comparison["ci_high"],
            "p_value": comparison["p_value"], "n_items": comparison["n_items"], "n_seeds": len(seeds),
        })
    if not records:
        raise ValueError("no (model, task, lang) has test rows of both sft and ramoe with lang == train_lang; "
                         "evaluate both fine-tuned methods on their target language first.")

    table = pl.DataFrame(records).sort("model", "task", "lang")
    # Pooled over every model, task and language, as the claim is about task-language pairs in general.
    pooled = correlation(table["ci_share"].to_numpy(), table["gain"].to_numpy())
    return table.with_columns(
        pearson_r=pl.lit(pooled["pearson"], dtype=pl.Float64),
        spearman_r=pl.lit(pooled["spearman"], dtype=pl.Float64),
        n_pairs=pl.lit(pooled["n"], dtype=pl.Int64),
    )
