"""cc/ci/ic/ii categories: English correctness (first letter) joined with target-language correctness.

``ci`` marks an item the model solves in English but fails in the target language, the examples
on which RA-MoE applies its routing alignment loss. Only train items are categorised, because the
categories select fine-tuning data.
"""

from __future__ import annotations

import polars as pl

CATEGORIES = ("cc", "ci", "ic", "ii")


def categorize(examples: pl.DataFrame, *, split: str = "train") -> pl.DataFrame:
    """Per (task, target language, item) category from a per-example correctness table.

    ``examples`` must contain English and at least one other language with the columns model,
    task, lang, split, item_id, correct. Raises ValueError when English is absent or a target
    language lacks an English counterpart for some item.
    """
    rows = examples.filter(pl.col("split") == split).select("model", "task", "lang", "item_id", "correct")
    english = rows.filter(pl.col("lang") == "en").select("model", "task", "item_id", en_correct="correct")
    targets = rows.filter(pl.col("lang") != "en").rename({"correct": "target_correct"})
    if english.is_empty():
        raise ValueError(f"no English rows in split {split!r}: categories need English correctness.")
    if targets.is_empty():
        raise ValueError(f"no target-language rows in split {split!r}.")
    joined = targets.join(english, on=["model", "task", "item_id"], how="left")
    unmatched = joined.filter(pl.col("en_correct").is_null())
    if not unmatched.is_empty():
        sample = unmatched.select("lang", "item_id").head(5).rows()
        raise ValueError(f"{unmatched.height} target rows have no English counterpart, e.g. {sample}.")
    letter = lambda col: pl.when(pl.col(col)).then(pl.lit("c")).otherwise(pl.lit("i"))  # noqa: E731
    return joined.with_columns(category=letter("en_correct") + letter("target_correct")).sort(
        "model", "task", "lang", "item_id"
    )


def category_shares(categorized: pl.DataFrame) -> pl.DataFrame:
    """Proportions of cc, ci, ic and ii per (model, task, lang); each row sums to 1."""
    counts = categorized.group_by("model", "task", "lang").agg(
        n=pl.len(), **{c: (pl.col("category") == c).sum() for c in CATEGORIES}
    )
    return counts.with_columns([(pl.col(c) / pl.col("n")).alias(c) for c in CATEGORIES]).sort("model", "task", "lang")
