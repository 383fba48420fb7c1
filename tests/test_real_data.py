"""Tests of the MGSM and XCOPA loaders on the real data files.

The data sets are not part of the repository. CI keeps them in shared/data beside the repository
checkout, and RAMOE_SHARED_DATA overrides that location. Without them this module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ramoe.data.real import load_mgsm, load_task, load_xcopa, split_item_ids
from ramoe.data.schema import ParallelDataError

SHARED_DATA = Path(os.environ.get("RAMOE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MGSM_DIR = SHARED_DATA / "mgsm"
XCOPA_DIR = SHARED_DATA / "xcopa"

if not (MGSM_DIR.is_dir() and XCOPA_DIR.is_dir()):
    pytest.skip(
        f"real data not found in {SHARED_DATA}; set RAMOE_SHARED_DATA to the folder with mgsm/ and xcopa/",
        allow_module_level=True,
    )

MGSM_LANGS = ["en", "de", "zh", "bn"]
XCOPA_LANGS = ["en", "th", "tr", "et"]


@pytest.fixture(scope="module")
def mgsm_rows() -> list[dict]:
    return load_mgsm(MGSM_LANGS, data_dir=MGSM_DIR)


@pytest.fixture(scope="module")
def xcopa_rows() -> list[dict]:
    return load_xcopa(XCOPA_LANGS, data_dir=XCOPA_DIR)


def rows_by_lang_and_id(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["lang"], row["item_id"]): row for row in rows}


def ids_of(rows: list[dict], lang: str) -> list[str]:
    return [row["item_id"] for row in rows if row["lang"] == lang]


def copy_mgsm(tmp_path: Path, langs: list[str]) -> Path:
    folder = tmp_path / "mgsm"
    folder.mkdir()
    for lang in langs:
        shutil.copy(MGSM_DIR / f"mgsm_{lang}.tsv", folder)
    return folder


def copy_xcopa(tmp_path: Path) -> Path:
    folder = tmp_path / "xcopa"
    shutil.copytree(XCOPA_DIR, folder, ignore=shutil.ignore_patterns("data-gmt"))
    return folder


def read_key(split: str, idx: int) -> dict[str, str]:
    lines = (XCOPA_DIR / "xcopa_key.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    for line in lines[1:]:
        entry = dict(zip(header, line.split("\t")))
        if entry["split"] == split and entry["idx"] == str(idx):
            return entry
    raise AssertionError(f"no key entry for {split} idx {idx}")


# --------------------------------------------------------------------------- MGSM


def test_mgsm_loads_250_items_per_language(mgsm_rows):
    english_ids = ids_of(mgsm_rows, "en")

    assert len(mgsm_rows) == 250 * len(MGSM_LANGS)
    assert english_ids == [f"mgsm-{i}" for i in range(250)]
    for lang in MGSM_LANGS:
        assert ids_of(mgsm_rows, lang) == english_ids, lang
    assert {row["task"] for row in mgsm_rows} == {"mgsm"}
    assert {row["task_type"] for row in mgsm_rows} == {"generative"}
    assert all(row["choices"] == [] for row in mgsm_rows)


def test_mgsm_split_same_in_every_language(mgsm_rows):
    english_split = {row["item_id"]: row["split"] for row in mgsm_rows if row["lang"] == "en"}

    for row in mgsm_rows:
        assert row["split"] == english_split[row["item_id"]], (row["lang"], row["item_id"])
    assert sum(split == "test" for split in english_split.values()) == 100
    assert sum(split == "train" for split in english_split.values()) == 150


def test_mgsm_split_deterministic(mgsm_rows):
    again = load_mgsm(["en", "sw"], data_dir=MGSM_DIR)
    other_seed = load_mgsm(["en"], data_dir=MGSM_DIR, split_seed=1)

    first_split = {row["item_id"]: row["split"] for row in mgsm_rows if row["lang"] == "en"}
    second_split = {row["item_id"]: row["split"] for row in again if row["lang"] == "sw"}
    other_split = {row["item_id"]: row["split"] for row in other_seed}
    assert second_split == first_split
    assert other_split != first_split


def test_mgsm_answers_without_commas(mgsm_rows):
    rows = rows_by_lang_and_id(mgsm_rows)

    assert rows[("en", "mgsm-0")]["answer"] == "18"
    assert rows[("en", "mgsm-100")]["answer"] == "175"
    for lang in MGSM_LANGS:
        assert rows[(lang, "mgsm-249")]["answer"] == "5600", lang
    normalised = {"2125", "114200", "276000", "5600"}
    english_answers = {row["answer"] for row in mgsm_rows if row["lang"] == "en"}
    assert normalised <= english_answers
    assert not [row for row in mgsm_rows if "," in row["answer"]]


def test_mgsm_localized_prompts(mgsm_rows):
    rows = rows_by_lang_and_id(mgsm_rows)
    english = rows[("en", "mgsm-0")]["prompt"]
    german = rows[("de", "mgsm-0")]["prompt"]
    chinese = rows[("zh", "mgsm-0")]["prompt"]

    assert english.startswith("Question: Janet’s ducks lay 16 eggs per day.")
    assert english.endswith("at the farmers' market?\nAnswer:")
    assert german.startswith("Frage: ")
    assert german.endswith("\nAntwort:")
    assert chinese.startswith("问题：")
    assert chinese.endswith("\n解答：")
    assert rows[("en", "mgsm-0")]["source"] == str(MGSM_DIR / "mgsm_en.tsv")


# --------------------------------------------------------------------------- XCOPA


def test_xcopa_loads_600_items_per_language(xcopa_rows):
    english_ids = ids_of(xcopa_rows, "en")

    assert len(english_ids) == 600
    assert english_ids[0] == "copa-401"
    assert english_ids[99] == "copa-500"
    assert english_ids[100] == "copa-501"
    assert english_ids[-1] == "copa-1000"
    for lang in XCOPA_LANGS:
        assert ids_of(xcopa_rows, lang) == english_ids, lang
    assert {row["task_type"] for row in xcopa_rows} == {"multiple_choice"}


def test_xcopa_labels_and_split_match(xcopa_rows):
    rows = rows_by_lang_and_id(xcopa_rows)

    for row in xcopa_rows:
        english = rows[("en", row["item_id"])]
        assert row["answer"] == english["answer"], (row["lang"], row["item_id"])
        assert row["split"] == english["split"], (row["lang"], row["item_id"])
    n_test = sum(1 for row in xcopa_rows if row["lang"] == "en" and row["split"] == "test")
    assert n_test == 240


def test_xcopa_english_item(xcopa_rows):
    rows = rows_by_lang_and_id(xcopa_rows)
    first_test = rows[("en", "copa-501")]
    second_test = rows[("en", "copa-502")]

    assert first_test["prompt"] == "The item was packaged in bubble wrap because"
    assert first_test["choices"] == [" it was fragile.", " it was small."]
    assert first_test["answer"] == "0"
    assert second_test["prompt"] == "I emptied my pockets therefore"
    # The pronoun "I" keeps its capital letter.
    assert second_test["choices"] == [" I retrieved a ticket stub.", " I found a weapon."]


def test_xcopa_thai_question_from_key(xcopa_rows):
    rows = rows_by_lang_and_id(xcopa_rows)
    thai_line = (XCOPA_DIR / "data" / "th" / "test.th.jsonl").read_text(encoding="utf-8").splitlines()[0]
    thai_record = json.loads(thai_line)
    key_entry = read_key("test", 0)
    thai_row = rows[("th", "copa-501")]

    assert thai_record["question"] == "effect"
    assert key_entry["question"] == "cause"
    assert thai_row["prompt"].endswith(" เพราะ")
    assert not thai_row["prompt"].endswith(" ดังนั้น")
    assert thai_row["prompt"] == thai_record["premise"] + " เพราะ"


def test_xcopa_estonian_and_turkish_choices(xcopa_rows):
    rows = rows_by_lang_and_id(xcopa_rows)

    assert rows[("et", "copa-501")]["prompt"] == "Ese oli mullikilesse mässitud sest"
    assert rows[("et", "copa-501")]["choices"] == [" see oli õrn.", " see oli väike."]
    turkish_choices = [choice for row in xcopa_rows if row["lang"] == "tr" for choice in row["choices"]]
    # Turkish lowercases dotted İ to i and dotless I to ı, never to "i̇" (i plus a combining dot).
    assert " ışığı açtım." in turkish_choices
    assert not [choice for choice in turkish_choices if "\u0307" in choice[:3]]


# --------------------------------------------------------------------------- errors


def test_missing_language_file_named(tmp_path):
    folder = copy_mgsm(tmp_path, ["en", "de", "zh"])
    (folder / "mgsm_de.tsv").unlink()

    with pytest.raises(FileNotFoundError) as error:
        load_mgsm(["en", "de"], data_dir=folder)
    assert "mgsm_de.tsv" in str(error.value)
    assert "'de'" in str(error.value)
    assert "['en', 'zh']" in str(error.value)


def test_xcopa_missing_language_file_named(tmp_path):
    folder = copy_xcopa(tmp_path)
    (folder / "data" / "th" / "val.th.jsonl").unlink()

    with pytest.raises(FileNotFoundError) as error:
        load_xcopa(["en", "th"], data_dir=folder)
    assert "val.th.jsonl" in str(error.value)
    assert "'th'" in str(error.value)
    assert "'tr'" in str(error.value)
    assert "'th'," not in str(error.value)


def test_truncated_tsv_names_line(tmp_path):
    folder = copy_mgsm(tmp_path, ["en", "de"])
    path = folder / "mgsm_de.tsv"
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: text.rindex("\t")], encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_mgsm(["en", "de"], data_dir=folder)
    assert "mgsm_de.tsv, line 250" in str(error.value)
    assert "got 1" in str(error.value)


def test_malformed_tsv_line_named(tmp_path):
    folder = copy_mgsm(tmp_path, ["en"])
    path = folder / "mgsm_en.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[4] = lines[4].replace("\t", "\textra\t", 1)
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_mgsm(["en"], data_dir=folder)
    assert "mgsm_en.tsv, line 5" in str(error.value)
    assert "got 3" in str(error.value)


def test_empty_tsv_rejected(tmp_path):
    folder = copy_mgsm(tmp_path, ["en"])
    (folder / "mgsm_en.tsv").write_text("", encoding="utf-8")

    with pytest.raises(ValueError, match=r"mgsm_en\.tsv, line 1: the file is empty"):
        load_mgsm(["en"], data_dir=folder)


def test_bad_jsonl_line_named(tmp_path):
    folder = copy_xcopa(tmp_path)
    path = folder / "data" / "tr" / "test.tr.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[9] = lines[9][:40] + "\n"
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_xcopa(["en", "tr"], data_dir=folder)
    assert "test.tr.jsonl, line 10" in str(error.value)
    assert "invalid JSON" in str(error.value)


def test_jsonl_missing_key_named(tmp_path):
    folder = copy_xcopa(tmp_path)
    path = folder / "data" / "et" / "val.et.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    del record["choice2"]
    lines[2] = json.dumps(record, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(ValueError) as error:
        load_xcopa(["en", "et"], data_dir=folder)
    assert "val.et.jsonl, line 3" in str(error.value)
    assert "choice2" in str(error.value)


def test_xcopa_removed_line_names_id(tmp_path):
    folder = copy_xcopa(tmp_path)
    path = folder / "data" / "th" / "test.th.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    del lines[6]
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(ParallelDataError) as error:
        load_xcopa(["en", "th"], data_dir=folder)
    assert "'th'" in str(error.value)
    assert "['copa-507']" in str(error.value)


def test_mgsm_removed_line_names_id(tmp_path):
    folder = copy_mgsm(tmp_path, ["en", "zh"])
    path = folder / "mgsm_zh.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")

    with pytest.raises(ParallelDataError) as error:
        load_mgsm(["en", "zh"], data_dir=folder)
    assert "'zh'" in str(error.value)
    assert "['mgsm-249']" in str(error.value)


def test_mgsm_shifted_lines_detected(tmp_path):
    folder = copy_mgsm(tmp_path, ["en", "de"])
    path = folder / "mgsm_de.tsv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(ParallelDataError) as error:
        load_mgsm(["en", "de"], data_dir=folder)
    assert "'mgsm-0'" in str(error.value)
    assert "'de'" in str(error.value)


@pytest.mark.parametrize(
    ("loader", "hub_id", "variable"),
    [
        (load_mgsm, "juletxara/mgsm", "HF_HUB_OFFLINE"),
        (load_xcopa, "cambridgeltl/xcopa", "HF_DATASETS_OFFLINE"),
    ],
)
def test_hub_source_offline_fails_fast(monkeypatch, loader, hub_id, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")

    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        loader(["en", "sw"], source="hub", data_dir=SHARED_DATA / hub_id.split("/")[1])
    elapsed = time.monotonic() - started

    assert "offline" in str(error.value)
    assert hub_id in str(error.value)
    assert "source: local" in str(error.value)
    assert elapsed < 1.0


def test_unknown_task_rejected():
    with pytest.raises(ValueError) as error:
        load_task("paws_x", ["en"], data_dir=SHARED_DATA)
    assert "'paws_x'" in str(error.value)
    assert "mgsm, xcopa, xnli, xquad" in str(error.value)


def test_load_task_dispatches():
    rows = load_task("mgsm", ["en"], data_dir=MGSM_DIR)

    assert len(rows) == 250
    assert rows[0]["task"] == "mgsm"


def test_invalid_options_rejected():
    with pytest.raises(ValueError, match="'s3'"):
        load_mgsm(["en"], source="s3", data_dir=MGSM_DIR)
    with pytest.raises(ValueError, match="1.5"):
        load_xcopa(["en"], data_dir=XCOPA_DIR, test_fraction=1.5)
    with pytest.raises(ValueError, match="'en'"):
        load_mgsm(["de"], data_dir=MGSM_DIR)
    with pytest.raises(ValueError, match="data_dir"):
        load_mgsm(["en"])


# --------------------------------------------------------------------------- split_item_ids


def test_split_item_ids_deterministic():
    ids = [f"item-{i}" for i in range(10)]

    split = split_item_ids(ids, 0.4, seed=3)

    assert split == split_item_ids(list(reversed(ids)), 0.4, seed=3)
    assert sorted(split) == sorted(ids)
    assert sum(value == "test" for value in split.values()) == 4
    assert set(split.values()) == {"train", "test"}


@pytest.mark.parametrize("fraction", [0, 1, -0.2, 1.5])
def test_split_item_ids_fraction_checked(fraction):
    with pytest.raises(ValueError, match=f"got {fraction!r}"):
        split_item_ids(["a", "b", "c"], fraction, seed=0)
