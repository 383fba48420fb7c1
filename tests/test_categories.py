"""cc/ci/ic/ii on a hand-made correctness table."""

import polars as pl
import pytest

from ramoe.categories import categorize, category_shares


def examples(rows):
    return pl.DataFrame(
        [
            {"model": "m", "task": "t", "lang": lang, "split": split, "item_id": item, "correct": correct}
            for lang, split, item, correct in rows
        ]
    )


# English: items 1,2 correct, 3,4 incorrect. xa: 1 correct, 2 incorrect, 3 correct, 4 incorrect.
# xb: every item incorrect. Item 5 is a test item and must not be counted.
HAND_MADE = examples(
    [
        ("en", "train", "1", True), ("en", "train", "2", True), ("en", "train", "3", False), ("en", "train", "4", False),
        ("xa", "train", "1", True), ("xa", "train", "2", False), ("xa", "train", "3", True), ("xa", "train", "4", False),
        ("xb", "train", "1", False), ("xb", "train", "2", False), ("xb", "train", "3", False), ("xb", "train", "4", False),
        ("en", "test", "5", True), ("xa", "test", "5", False), ("xb", "test", "5", False),
    ]
)


def test_per_item_categories():
    categorized = categorize(HAND_MADE)
    got = {(r["lang"], r["item_id"]): r["category"] for r in categorized.iter_rows(named=True)}
    assert got == {
        ("xa", "1"): "cc", ("xa", "2"): "ci", ("xa", "3"): "ic", ("xa", "4"): "ii",
        ("xb", "1"): "ci", ("xb", "2"): "ci", ("xb", "3"): "ii", ("xb", "4"): "ii",
    }


def test_shares_sum_to_one():
    shares = category_shares(categorize(HAND_MADE))
    xa = shares.filter(pl.col("lang") == "xa").row(0, named=True)
    xb = shares.filter(pl.col("lang") == "xb").row(0, named=True)
    assert (xa["n"], xa["cc"], xa["ci"], xa["ic"], xa["ii"]) == (4, 0.25, 0.25, 0.25, 0.25)
    assert (xb["n"], xb["cc"], xb["ci"], xb["ic"], xb["ii"]) == (4, 0.0, 0.5, 0.0, 0.5)
    for row in shares.iter_rows(named=True):
        assert row["cc"] + row["ci"] + row["ic"] + row["ii"] == pytest.approx(1.0)


def test_missing_english_item_rejected():
    broken = HAND_MADE.filter(~((pl.col("lang") == "en") & (pl.col("item_id") == "2")))
    with pytest.raises(ValueError, match="no English counterpart"):
        categorize(broken)


def test_no_english_rejected():
    with pytest.raises(ValueError, match="no English rows"):
        categorize(HAND_MADE.filter(pl.col("lang") != "en"))
