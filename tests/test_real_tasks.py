"""XNLI and XQuAD: loaders on the real files, prompts, the train/test split, SQuAD scoring and the solved text.

The loader tests read the data sets beside the checkout (fixture ``shared_data``) and are skipped
without them. The scoring tests use hand-made answers and a tiny random MoE.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from ramoe.data.real import XNLI_CHOICES, XNLI_LABELS, load_task, load_xnli, load_xquad, local_files
from ramoe.data.schema import ParallelDataError
from ramoe.evaluation.base import EXAMPLE_COLUMNS, evaluate_examples, score_generated
from ramoe.evaluation.qa import exact_match, extract_span_answer, normalize_answer, token_f1
from ramoe.models.build import tiny_moe_config
from ramoe.models.tokenizer import build_word_tokenizer
from ramoe.routing.traces import trace_texts
from ramoe.training.finetune import build_examples

XNLI_LANGS = ["en", "sw", "ur", "my"]
XQUAD_LANGS = ["en", "de", "zh", "th"]
FIRST_XQUAD_ID = "56beb4343aeaaa14008c925b"


@pytest.fixture(scope="module")
def xnli_rows(shared_data) -> list[dict]:
    return load_xnli(XNLI_LANGS, data_dir=shared_data / "xnli")


@pytest.fixture(scope="module")
def xquad_rows(shared_data) -> list[dict]:
    return load_xquad(XQUAD_LANGS, data_dir=shared_data / "xquad")


def by_key(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(row["lang"], row["item_id"]): row for row in rows}


def ids_of(rows: list[dict], lang: str) -> list[str]:
    return [row["item_id"] for row in rows if row["lang"] == lang]


# --------------------------------------------------------------------------- XNLI


def test_xnli_counts_parallel_ids(xnli_rows):
    english = ids_of(xnli_rows, "en")
    assert len(english) == 2490 + 5010
    assert len(set(english)) == len(english)
    for lang in XNLI_LANGS:
        assert ids_of(xnli_rows, lang) == english
    assert english[0] == "xnli-dev-0"
    assert english[-1] == "xnli-test-5009"


def test_xnli_label_mapping(xnli_rows, shared_data):
    rows = by_key(xnli_rows)
    assert XNLI_LABELS == ("entailment", "neutral", "contradiction")
    assert XNLI_CHOICES == (" True", " Neither", " False")
    # test rows 0, 1 and 2 of the file are contradiction, entailment and neutral.
    assert rows[("en", "xnli-test-0")]["answer"] == "2"
    assert rows[("en", "xnli-test-1")]["answer"] == "0"
    assert rows[("en", "xnli-test-2")]["answer"] == "1"
    with (shared_data / "xnli" / "xnli.test.ur.tsv").open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for record in reader:
            assert rows[("ur", f"xnli-test-{record['idx']}")]["answer"] == str(XNLI_LABELS.index(record["label"]))
    for lang in XNLI_LANGS:
        counts = Counter(row["answer"] for row in xnli_rows if row["lang"] == lang)
        assert counts == {"0": 2500, "1": 2500, "2": 2500}


def test_xnli_prompts_hand_checked(xnli_rows):
    rows = by_key(xnli_rows)
    english = rows[("en", "xnli-test-0")]
    assert english["prompt"] == (
        "Well, I wasn't even thinking about that, but I was so frustrated, and, I ended up talking to him "
        "again.\nQuestion: I havent spoken to him again. True, False, or Neither?\nAnswer:"
    )
    assert english["choices"] == [" True", " Neither", " False"]
    assert english["task"] == "xnli"
    assert english["task_type"] == "multiple_choice"
    assert english["source"].endswith("xnli.test.en.tsv")
    swahili = rows[("sw", "xnli-test-0")]
    assert swahili["prompt"] == (
        "Naam, sikukuwa nafikiri juu ya hilo, lakini nilichanganyikiwa sana, na, hatimaye nikaendelea "
        "kuzungumza naye tena.\nQuestion: Sijaongea na yeye tena. True, False, or Neither?\nAnswer:"
    )


def test_xnli_split_by_premise(xnli_rows):
    english = [row for row in xnli_rows if row["lang"] == "en"]
    split_by_id = {row["item_id"]: row["split"] for row in english}
    # 2500 premises with 3 hypotheses each; round(2500 * 0.4) = 1000 premises are test items.
    assert Counter(split_by_id.values()) == {"train": 4500, "test": 3000}
    for split in ("dev", "test"):
        n_rows = 2490 if split == "dev" else 5010
        for first in range(0, n_rows, 3):
            group = {split_by_id[f"xnli-{split}-{first + offset}"] for offset in range(3)}
            assert len(group) == 1
    for row in xnli_rows:
        assert row["split"] == split_by_id[row["item_id"]]


def test_xnli_split_seeded(shared_data, xnli_rows):
    same = load_xnli(["en", "sw"], data_dir=shared_data / "xnli")
    other = load_xnli(["en", "sw"], data_dir=shared_data / "xnli", split_seed=1)
    first = {row["item_id"]: row["split"] for row in xnli_rows if row["lang"] == "en"}
    assert {row["item_id"]: row["split"] for row in same if row["lang"] == "en"} == first
    assert {row["item_id"]: row["split"] for row in other if row["lang"] == "en"} != first


def test_xnli_solved_label_word(xnli_rows):
    rows = [by_key(xnli_rows)[("en", f"xnli-test-{i}")] for i in range(3)]
    solved = [text for _, _, text in trace_texts(rows, "solved")]
    assert solved[0] == rows[0]["prompt"] + " False"
    assert solved[1] == rows[1]["prompt"] + " True"
    assert solved[2] == rows[2]["prompt"] + " Neither"


def test_xnli_local_errors(shared_data, tmp_path):
    with pytest.raises(ValueError, match="no prompt template for language"):
        load_xnli(["en", "xx"], data_dir=shared_data / "xnli")
    with pytest.raises(FileNotFoundError, match=r"Languages available in .*\['en', 'my', 'sw', 'ur'\]"):
        load_xnli(["en", "de"], data_dir=shared_data / "xnli")

    # A dropped row shifts every later idx, which the row-number check reports.
    folder = tmp_path / "xnli"
    folder.mkdir()
    for split in ("dev", "test"):
        for lang in ("en", "sw"):
            source = (shared_data / "xnli" / f"xnli.{split}.{lang}.tsv").read_text(encoding="utf-8")
            if (split, lang) == ("test", "sw"):
                lines = source.splitlines(keepends=True)
                source = "".join(lines[:5] + lines[6:])
            (folder / f"xnli.{split}.{lang}.tsv").write_text(source, encoding="utf-8")
    with pytest.raises(ValueError, match=r"xnli.test.sw.tsv, line 6: idx '5' should be 4"):
        load_xnli(["en", "sw"], data_dir=folder)


def test_xnli_misaligned_premises_rejected(shared_data, tmp_path):
    folder = tmp_path / "xnli"
    folder.mkdir()
    for split in ("dev", "test"):
        for lang in ("en", "sw"):
            source = (shared_data / "xnli" / f"xnli.{split}.{lang}.tsv").read_text(encoding="utf-8")
            if (split, lang) == ("test", "sw"):
                # Row 1 gets another premise than rows 0 and 2, which share one in English.
                lines = source.splitlines(keepends=True)
                fields = lines[2].split("\t")
                fields[3] = "Sentensi nyingine kabisa."
                lines[2] = "\t".join(fields)
                source = "".join(lines)
            (folder / f"xnli.{split}.{lang}.tsv").write_text(source, encoding="utf-8")
    with pytest.raises(ParallelDataError, match="share their English premise but not their 'sw' premise"):
        load_xnli(["en", "sw"], data_dir=folder)


def test_hub_source_fails_offline():
    with pytest.raises(RuntimeError, match="offline"):
        load_xnli(["en"], source="hub")
    with pytest.raises(RuntimeError, match="offline"):
        load_xquad(["en"], source="hub")


def test_load_task_knows_new_tasks(shared_data):
    rows = load_task("xnli", ["en", "my"], source="local", data_dir=shared_data / "xnli", test_fraction=0.5)
    assert {row["lang"] for row in rows} == {"en", "my"}
    # 1250 of 2500 premises are test items, 3 hypotheses each.
    assert sum(row["split"] == "test" for row in rows if row["lang"] == "my") == 3750


def test_local_files_of_new_tasks(shared_data):
    xnli, xquad = shared_data / "xnli", shared_data / "xquad"
    assert local_files("xnli", ["en", "sw"], data_dir=xnli) == [
        xnli / "xnli.dev.en.tsv", xnli / "xnli.test.en.tsv", xnli / "xnli.dev.sw.tsv", xnli / "xnli.test.sw.tsv",
    ]
    assert local_files("xquad", ["en", "zh"], data_dir=xquad) == [xquad / "xquad.en.json", xquad / "xquad.zh.json"]
    assert local_files("xnli", ["en", "de"], source="hub") == []
    assert local_files("xquad", ["en", "ro"], source="hub") == []
    with pytest.raises(FileNotFoundError, match=r"xnli.dev.de.tsv not found.*\['en', 'my', 'sw', 'ur'\]"):
        local_files("xnli", ["en", "de"], data_dir=xnli)
    with pytest.raises(ValueError, match="no prompt template for language"):
        local_files("xquad", ["en", "sw"], data_dir=xquad)


# --------------------------------------------------------------------------- XQuAD


def test_xquad_counts_parallel_ids(xquad_rows):
    english = ids_of(xquad_rows, "en")
    assert len(english) == 1190
    assert len(set(english)) == 1190
    for lang in XQUAD_LANGS:
        assert ids_of(xquad_rows, lang) == english
    assert english[0] == f"xquad-{FIRST_XQUAD_ID}"


def test_xquad_prompt_and_answers(xquad_rows, shared_data):
    squad = json.loads((shared_data / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))
    context = squad["data"][0]["paragraphs"][0]["context"]
    rows = by_key(xquad_rows)
    english = rows[("en", f"xquad-{FIRST_XQUAD_ID}")]
    assert english["prompt"] == (
        f"Context: {context}\nQuestion: How many points did the Panthers defense surrender?\nAnswer:"
    )
    assert english["prompt"].startswith("Context: The Panthers defense gave up just 308 points, ranking sixth")
    assert english["task_type"] == "generative"
    assert english["choices"] == []
    for lang in ("en", "de", "zh"):
        assert rows[(lang, f"xquad-{FIRST_XQUAD_ID}")]["answer"] == "308"
    assert rows[("zh", f"xquad-{FIRST_XQUAD_ID}")]["prompt"].endswith("\nQuestion: 黑豹队的防守丢了多少分？\nAnswer:")
    assert rows[("en", "xquad-57268a8fdd62a815002e88d1")]["answer"] == "A bridge"
    assert rows[("de", "xquad-57268a8fdd62a815002e88d1")]["answer"] == "Eine Brücke"
    assert rows[("zh", "xquad-57268a8fdd62a815002e88d1")]["answer"] == "桥梁"


def test_xquad_split_by_paragraph(xquad_rows, shared_data):
    squad = json.loads((shared_data / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))
    split_by_id = {row["item_id"]: row["split"] for row in xquad_rows if row["lang"] == "en"}
    paragraph_splits = []
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            splits = {split_by_id[f"xquad-{qa['id']}"] for qa in paragraph["qas"]}
            assert len(splits) == 1
            paragraph_splits.append(splits.pop())
    # round(240 * 0.4) = 96 of the 240 paragraphs are test paragraphs.
    assert Counter(paragraph_splits) == {"train": 144, "test": 96}
    for row in xquad_rows:
        assert row["split"] == split_by_id[row["item_id"]]


def test_xquad_solved_answer_span(xquad_rows):
    row = by_key(xquad_rows)[("de", "xquad-57268a8fdd62a815002e88d1")]
    assert trace_texts([row], "solved")[0][2] == row["prompt"] + " Eine Brücke"


def test_xquad_misaligned_paragraphs_rejected(shared_data, tmp_path):
    folder = tmp_path / "xquad"
    folder.mkdir()
    (folder / "xquad.en.json").write_text((shared_data / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))
    german = json.loads((shared_data / "xquad" / "xquad.de.json").read_text(encoding="utf-8"))
    # Move the first question of paragraph 1 into paragraph 0.
    paragraphs = german["data"][0]["paragraphs"]
    moved = paragraphs[1]["qas"].pop(0)
    paragraphs[0]["qas"].append(moved)
    (folder / "xquad.de.json").write_text(json.dumps(german, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ParallelDataError, match=rf"item 'xquad-{moved['id']}' is in 'xquad-a0-p0' in 'de'"):
        load_xquad(["en", "de"], data_dir=folder)


# --------------------------------------------------------------------------- SQuAD scoring


@pytest.mark.parametrize(
    ("prediction", "gold", "normalized", "em", "f1"),
    [
        ("The Denver Broncos", "Denver Broncos", "denver broncos", True, 1.0),
        ("Broncos", "Denver Broncos", "broncos", False, 2 * 1.0 * 0.5 / 1.5),  # P 1, R 1/2
        ("denver broncos team", "Denver Broncos", "denver broncos team", False, 2 * (2 / 3) * 1.0 / (5 / 3)),  # 0.8
        ("308.", "308", "308", True, 1.0),
        ("  Saint   Bernadette Soubirous! ", "Saint Bernadette Soubirous", "saint bernadette soubirous", True, 1.0),
        ("桥梁。", "桥梁", "桥梁", True, 1.0),
        ("«Eine Brücke»", "Eine Brücke", "eine brücke", True, 1.0),
        ("x x", "x y", "x x", False, 0.5),  # one shared token: P 1/2, R 1/2
        ("y x x", "x x y", "y x x", False, 1.0),  # same multiset of tokens
        ("an apple", "the apple", "apple", True, 1.0),
        ("the", "a", "", True, 1.0),  # both empty after normalisation
        ("the", "apple", "", False, 0.0),
        ("Paris", "London", "paris", False, 0.0),
    ],
)
def test_squad_normalisation_em_f1(prediction, gold, normalized, em, f1):
    assert normalize_answer(prediction) == normalized
    assert exact_match(prediction, gold) is em
    assert token_f1(prediction, gold) == pytest.approx(f1)


def test_missing_prediction_scores_zero():
    assert exact_match(None, "308") is False
    assert token_f1(None, "308") == 0.0


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (" Denver Broncos\nQuestion: Who won?", "Denver Broncos"),
        ("\n\n  308 points \n", "308 points"),
        ("", None),
        ("  \n \t\n", None),
    ],
)
def test_extract_span_answer(output, expected):
    assert extract_span_answer(output) == expected


def test_score_generated_dispatches_on_task():
    qa = {"task": "xquad", "lang": "en", "answer": "Denver Broncos"}
    right = score_generated(qa, " the Denver Broncos.\nQuestion: next")
    assert right["parsed_answer"] == "the Denver Broncos."
    assert right["correct"] is True
    assert right["score"] == 1.0
    assert right["parse_failure"] is False

    partial = score_generated(qa, "Broncos")
    assert partial["correct"] is False
    assert partial["score"] == pytest.approx(2 / 3)

    empty = score_generated(qa, "   \n")
    assert empty["parse_failure"] is True
    assert empty["correct"] is False
    assert empty["score"] == 0.0

    # A numeric answer in a span task is compared as text, never through number extraction.
    numeric_span = score_generated({"task": "xquad", "lang": "en", "answer": "308"}, "308 points")
    assert numeric_span["correct"] is False
    assert numeric_span["score"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)

    math = score_generated({"task": "mgsm", "lang": "de", "answer": "5600"}, "Die Antwort lautet 5.600 Euro.")
    assert math["parsed_answer"] == "5600"
    assert math["correct"] is True
    assert math["score"] is None


# --------------------------------------------------------------------------- per-example table

WORDS = "context : the bridge is old . question what is old ? answer a bridge premise true false neither".split()


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = build_word_tokenizer(WORDS)
    arch = dict(family="olmoe", num_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                num_experts=4, top_k=2, expert_size=8, max_position_embeddings=64, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    config = tiny_moe_config(arch, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id,
                             bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def _qa_row(item_id: str) -> dict:
    return {"item_id": item_id, "lang": "en", "task": "xquad", "task_type": "generative", "split": "test",
            "prompt": "context : the bridge is old . question : what is old ? answer :", "choices": [],
            "answer": "a bridge", "source": "test"}


def _nli_row(item_id: str) -> dict:
    return {"item_id": item_id, "lang": "en", "task": "xnli", "task_type": "multiple_choice", "split": "test",
            "prompt": "premise . question : true false neither ? answer :", "choices": [" true", " neither", " false"],
            "answer": "0", "source": "test"}


def test_score_column_for_every_task(tiny_model):
    model, tokenizer = tiny_model
    settings = {"batch_size": 2, "max_new_tokens": 3, "choice_normalization": "sum"}
    qa = evaluate_examples(model, tokenizer, [_qa_row("q-0"), _qa_row("q-1")], settings, model_name="m",
                           method="base", seed=0)
    nli = evaluate_examples(model, tokenizer, [_nli_row("n-0")], settings, model_name="m", method="base", seed=0)
    assert EXAMPLE_COLUMNS["score"] == pl.Float64
    assert qa.schema == nli.schema
    assert list(qa.columns) == list(EXAMPLE_COLUMNS)
    for row in qa.iter_rows(named=True):
        assert row["score"] == pytest.approx(token_f1(row["parsed_answer"], "a bridge"))
        assert row["correct"] == exact_match(row["parsed_answer"], "a bridge")
        assert row["parse_failure"] == (row["parsed_answer"] is None)
    assert nli["score"].to_list() == [None]
    assert nli["choice_scores"].list.len().to_list() == [3]
    combined = pl.concat([qa, nli], how="vertical")
    assert combined.height == 3


def test_sft_completion_gold_answer(tiny_model):
    _, tokenizer = tiny_model
    rows = [_qa_row("q-0"), _nli_row("n-0")]
    examples = build_examples(rows, tokenizer, ci_items=set())
    answer = [tokenizer.convert_tokens_to_ids(word) for word in ("a", "bridge")]
    assert examples[0].labels[-3:] == [*answer, tokenizer.eos_token_id]
    assert examples[1].labels[-2:] == [tokenizer.convert_tokens_to_ids("true"), tokenizer.eos_token_id]
    assert sum(label != -100 for label in examples[0].labels) == 3
    assert sum(label != -100 for label in examples[1].labels) == 2
