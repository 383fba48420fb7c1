"""Loaders that turn the real MGSM, XCOPA, XNLI and XQuAD data sets into rows of the parallel schema.

Every loader reads either a local copy of the data set (``source="local"``, the default) or the
Hugging Face hub (``source="hub"``). English is the reference language, so every call loads it.
None of the data sets has a train split, so items are split into train and test here, by item id
and identically for every language (``split_item_ids``). XNLI and XQuAD split whole groups of
items that share a text (the three hypotheses of a premise, the questions on a paragraph), so
that no premise or paragraph is seen in training and tested again.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ramoe.data.schema import ParallelDataError, check_parallel, validate_rows

log = logging.getLogger(__name__)

SOURCES = ("local", "hub")
REFERENCE_LANG = "en"

# Zero-shot MGSM prompt labels: (question prefix, answer prefix), so the prompt for question q is
# f"{question_prefix}{q}\n{answer_prefix}". The words and their punctuation (French " :",
# full-width "：" in Japanese and Chinese) follow the "Question:" and "Step-by-Step Answer:"
# prefixes of the hand-translated exemplars in google-research/url-nlp mgsm/exemplars.py, with
# "Step-by-Step" dropped. Russian is the exception: its exemplars use "Пошаговое решение"
# ("step-by-step solution"), and the plain word for "answer" is "Ответ".
MGSM_PROMPT_LABELS: dict[str, tuple[str, str]] = {
    "bn": ("প্রশ্ন: ", "উত্তর:"),
    "de": ("Frage: ", "Antwort:"),
    "en": ("Question: ", "Answer:"),
    "es": ("Pregunta: ", "Respuesta:"),
    "fr": ("Question : ", "Réponse :"),
    "ja": ("問題：", "答え："),
    "ru": ("Задача: ", "Ответ:"),
    "sw": ("Swali: ", "Jibu:"),
    "te": ("ప్రశ్న: ", "సమాధానం:"),
    "th": ("โจทย์: ", "คำตอบ:"),
    "zh": ("问题：", "解答："),
}

# Connectives appended to the XCOPA premise, by the question's relation. The 11 non-English
# entries are the connectors of EleutherAI lm-evaluation-harness, lm_eval/tasks/xcopa/utils.py,
# whose doc_to_text also puts a space before the connective in every language, Chinese and Thai
# included. Each choice starts with a space too.
XCOPA_CONNECTIVES: dict[str, dict[str, str]] = {
    "en": {"cause": " because", "effect": " therefore"},
    "et": {"cause": " sest", "effect": " seetõttu"},
    "ht": {"cause": " poukisa", "effect": " donk sa"},
    "id": {"cause": " karena", "effect": " maka"},
    "it": {"cause": " perché", "effect": " quindi"},
    "qu": {"cause": " imataq", "effect": " chaymi"},
    "sw": {"cause": " kwa sababu", "effect": " kwa hiyo"},
    "ta": {"cause": " காரணமாக", "effect": " எனவே"},
    "th": {"cause": " เพราะ", "effect": " ดังนั้น"},
    "tr": {"cause": " çünkü", "effect": " bu yüzden"},
    "vi": {"cause": " bởi vì", "effect": " vì vậy"},
    "zh": {"cause": " 因为", "effect": " 所以"},
}

# XCOPA row idx i of a split is original COPA item XCOPA_FIRST_COPA_ID[split] + i.
XCOPA_FIRST_COPA_ID = {"val": 401, "test": 501}
XCOPA_HUB_SPLITS = {"val": "validation", "test": "test"}
XCOPA_KEY_FILE = "xcopa_key.tsv"
XCOPA_RECORD_KEYS = ("premise", "choice1", "choice2", "label", "idx")

_GOLD_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_SENTENCE_FINAL_PERIODS = (".", "。", "．")
_TRUE_ENV_VALUES = {"1", "true", "yes", "on"}


def split_item_ids(item_ids: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each item id to 'train' or 'test' with a seeded permutation of the sorted ids.

    The result depends only on the set of ids, the fraction and the seed, so calling it with the
    ids of any language gives the same split. ``round(n * test_fraction)`` ids go to test,
    clamped so that both splits keep at least one item.
    """
    _check_test_fraction(test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"split seed must be an integer, got {seed!r}.")
    unique_ids = sorted(set(item_ids))
    if len(unique_ids) < 2:
        raise ValueError(
            f"cannot split {len(unique_ids)} item id(s) into train and test, because each split needs at least one."
        )

    n_test = min(len(unique_ids) - 1, max(1, round(len(unique_ids) * test_fraction)))
    order = np.random.default_rng(seed).permutation(len(unique_ids))
    test_positions = set(order[:n_test].tolist())
    return {item_id: ("test" if i in test_positions else "train") for i, item_id in enumerate(unique_ids)}


def load_task(task: str, lang_codes: Sequence[str], **options) -> list[dict]:
    """Load a real task by name. ``options`` are the keyword arguments of its loader."""
    loaders: dict[str, Callable[..., list[dict]]] = {
        "mgsm": load_mgsm,
        "xcopa": load_xcopa,
        "xnli": load_xnli,
        "xquad": load_xquad,
    }
    if task not in loaders:
        raise ValueError(f"unknown real task {task!r}. Known tasks: {', '.join(sorted(loaders))}.")
    return loaders[task](lang_codes, **options)


def local_files(
    task: str, lang_codes: Sequence[str], *, source: str = "local", data_dir: str | Path | None = None
) -> list[Path]:
    """List the local files that loading a real task reads, without reading them.

    Raises the loader's errors for an unsupported language, a missing ``data_dir`` or a missing
    language file, so that a workflow can stop before its first job. MGSM, XNLI and XQuAD from
    the hub read no local file, while XCOPA from the hub still reads English and the answer key.
    An unknown task returns an empty list.
    """
    if task == "mgsm":
        langs = _check_langs(lang_codes, sorted(MGSM_PROMPT_LABELS), task=task)
        if source == "hub":
            return []
        folder = _check_data_dir(data_dir, task=task)
        paths = []
        for lang in langs:
            path = folder / f"mgsm_{lang}.tsv"
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _mgsm_local_langs(folder))
            paths.append(path)
        return paths
    if task == "xcopa":
        langs = _check_langs(lang_codes, sorted(XCOPA_CONNECTIVES), task=task)
        folder = _check_data_dir(data_dir, task=task)
        paths = [folder / XCOPA_KEY_FILE]
        if not paths[0].is_file():
            raise FileNotFoundError(f"xcopa: the answer key {paths[0]} was not found. Point data_dir at the XCOPA folder.")
        for lang in langs if source == "local" else [REFERENCE_LANG]:
            for split in XCOPA_FIRST_COPA_ID:
                path = _xcopa_local_path(folder, lang, split)
                if not path.is_file():
                    _raise_missing_language(path, lang, folder, _xcopa_local_langs(folder))
                paths.append(path)
        return paths
    if task == "xnli":
        langs = _check_langs(lang_codes, list(XNLI_LANGS), task=task)
        if source == "hub":
            return []
        folder = _check_data_dir(data_dir, task=task)
        paths = [folder / f"xnli.{split}.{lang}.tsv" for lang in langs for split in XNLI_SPLITS]
        for path, lang in zip(paths, [lang for lang in langs for _ in XNLI_SPLITS], strict=True):
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _xnli_local_langs(folder))
        return paths
    if task == "xquad":
        langs = _check_langs(lang_codes, list(XQUAD_LANGS), task=task)
        if source == "hub":
            return []
        folder = _check_data_dir(data_dir, task=task)
        paths = [folder / f"xquad.{lang}.json" for lang in langs]
        for path, lang in zip(paths, langs, strict=True):
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _xquad_local_langs(folder))
        return paths
    return []


# --------------------------------------------------------------------------- MGSM


def load_mgsm(
    lang_codes: Sequence[str],
    *,
    source: str = "local",
    data_dir: str | Path | None = None,
    hub_id: str = "juletxara/mgsm",
    test_fraction: float = 0.4,
    split_seed: int = 0,
) -> list[dict]:
    """Load MGSM's 250 problems in each language as generative rows with zero-shot prompts.

    Locally, ``data_dir`` contains ``mgsm_<lang>.tsv`` files (no header, question TAB answer).
    Item ``mgsm-<i>`` is row i, and its answer is the gold number with thousands commas removed.
    """
    langs = _check_request(lang_codes, source, test_fraction, sorted(MGSM_PROMPT_LABELS), task="mgsm")
    rows_by_lang: dict[str, list[dict]] = {}
    if source == "hub":
        require_hub_online(hub_id)
        for lang in langs:
            rows_by_lang[lang] = _load_mgsm_hub(lang, hub_id)
    else:
        folder = _check_data_dir(data_dir, task="mgsm")
        for lang in langs:
            path = folder / f"mgsm_{lang}.tsv"
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _mgsm_local_langs(folder))
            problems = _read_mgsm_tsv(path)
            rows_by_lang[lang] = [
                _mgsm_row(lang, index, question, answer, str(path))
                for index, (question, answer) in enumerate(problems)
            ]

    rows = _assign_split_and_check(rows_by_lang, test_fraction, split_seed, name="mgsm")
    _check_answers_match_reference(rows, name="mgsm")
    return rows


def _read_mgsm_tsv(path: Path) -> list[tuple[str, str]]:
    """Read (question, gold number) pairs, raising a ValueError that names the line of a malformed row."""
    problems = []
    # QUOTE_NONE keeps apostrophes and the '"' in one Spanish question as plain text.
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        try:
            for fields in reader:
                where = f"{path}, line {reader.line_num}"
                if len(fields) != 2:
                    raise ValueError(
                        f"{where}: expected 2 tab-separated fields (question, answer), got {len(fields)}. "
                        "The file may be truncated or not an MGSM TSV file."
                    )
                question, answer = fields[0].strip(), fields[1].strip()
                if not question:
                    raise ValueError(f"{where}: the question is empty.")
                if not _GOLD_NUMBER.fullmatch(answer.replace(",", "")):
                    raise ValueError(
                        f"{where}: the answer {answer!r} is not a number. The file may be truncated."
                    )
                problems.append((question, answer))
        except csv.Error as error:
            raise ValueError(f"{path}, line {reader.line_num}: invalid TSV: {error}.") from error
    if not problems:
        raise ValueError(f"{path}, line 1: the file is empty, but one MGSM problem per line was expected.")
    return problems


def _mgsm_row(lang: str, index: int, question: str, answer: str, source: str) -> dict:
    question_prefix, answer_prefix = MGSM_PROMPT_LABELS[lang]
    return {
        "item_id": f"mgsm-{index}",
        "lang": lang,
        "task": "mgsm",
        "task_type": "generative",
        "prompt": f"{question_prefix}{question}\n{answer_prefix}",
        "choices": [],
        "answer": answer.replace(",", ""),
        "source": source,
    }


def _load_mgsm_hub(lang: str, hub_id: str) -> list[dict]:
    import datasets

    # NOTE: never run against the hub. It assumes the juletxara/mgsm layout of one
    # config per language code, whose "test" split has question, answer, answer_number and
    # equation_solution, with the 250 problems in the order of the TSV files.
    dataset = datasets.load_dataset(hub_id, lang, split="test")
    source = f"hf://datasets/{hub_id} ({lang}, test)"
    rows = []
    for index, record in enumerate(dataset):
        answer = _format_gold_number(record["answer_number"])
        rows.append(_mgsm_row(lang, index, str(record["question"]).strip(), answer, source))
    log.info("loaded %d MGSM problems for %s from %s", len(rows), lang, source)
    return rows


def _format_gold_number(value: object) -> str:
    """Write a hub answer_number (int, float or string) the way the TSV files do."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _mgsm_local_langs(folder: Path) -> list[str]:
    return sorted(path.stem.removeprefix("mgsm_") for path in folder.glob("mgsm_*.tsv"))


def _check_answers_match_reference(rows: list[dict], *, name: str) -> None:
    """Raise unless every language has the English gold answer for each item.

    MGSM files carry no item ids, so a deleted or duplicated line shifts every later row. The
    answers are identical across languages in the released data, which makes them a check.
    """
    reference = {row["item_id"]: row["answer"] for row in rows if row["lang"] == REFERENCE_LANG}
    for row in rows:
        expected = reference[row["item_id"]]
        if row["answer"] != expected:
            raise ParallelDataError(
                f"{name}: item {row['item_id']!r} has answer {row['answer']!r} in {row['lang']!r} but "
                f"{expected!r} in {REFERENCE_LANG!r}, so the rows of {row['source']} are not aligned "
                "with English. Check that file for a missing, extra or reordered line."
            )


# --------------------------------------------------------------------------- XCOPA


def load_xcopa(
    lang_codes: Sequence[str],
    *,
    source: str = "local",
    data_dir: str | Path | None = None,
    hub_id: str = "cambridgeltl/xcopa",
    test_fraction: float = 0.4,
    split_seed: int = 0,
) -> list[dict]:
    """Load the 600 XCOPA items (val and test pooled) in each language as two-choice rows.

    ``data_dir`` is the XCOPA folder: ``data/<lang>/{val,test}.<lang>.jsonl``, English COPA in
    ``en/{val,test}.en.jsonl`` and ``xcopa_key.tsv``. The cause/effect ``question`` of every row
    comes from the key, because the upstream files have it wrong for th, tr, sw, id and it.
    With ``source="hub"`` only the non-English files come from the hub, so ``data_dir`` is
    still required for English and the key.
    """
    langs = _check_request(lang_codes, source, test_fraction, sorted(XCOPA_CONNECTIVES), task="xcopa")
    if source == "hub":
        require_hub_online(hub_id)
    folder = _check_data_dir(data_dir, task="xcopa")
    key_path = folder / XCOPA_KEY_FILE
    if not key_path.is_file():
        raise FileNotFoundError(
            f"xcopa: the answer key {key_path} was not found. It contains the corrected cause/effect "
            "question of every item, so point data_dir at the XCOPA folder that contains it."
        )
    key = _read_xcopa_key(key_path)

    rows_by_lang: dict[str, list[dict]] = {}
    for lang in langs:
        if source == "hub" and lang != REFERENCE_LANG:
            rows_by_lang[lang] = _load_xcopa_hub(lang, hub_id, key)
            continue
        rows = []
        n_corrected = 0
        for split in XCOPA_FIRST_COPA_ID:
            path = _xcopa_local_path(folder, lang, split)
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _xcopa_local_langs(folder))
            for line_number, record in _read_xcopa_jsonl(path):
                where = f"{path}, line {line_number}"
                rows.append(_xcopa_row(lang, split, record, key, source=str(path), where=where))
                n_corrected += _question_corrected(record, key[(split, record["idx"])])
        _log_question_corrections(lang, n_corrected, len(rows))
        rows_by_lang[lang] = rows

    return _assign_split_and_check(rows_by_lang, test_fraction, split_seed, name="xcopa")


def _xcopa_local_path(folder: Path, lang: str, split: str) -> Path:
    if lang == REFERENCE_LANG:
        return folder / "en" / f"{split}.en.jsonl"
    return folder / "data" / lang / f"{split}.{lang}.jsonl"


def _xcopa_local_langs(folder: Path) -> list[str]:
    langs = []
    for lang in sorted({REFERENCE_LANG} | {path.name for path in (folder / "data").glob("*") if path.is_dir()}):
        if all(_xcopa_local_path(folder, lang, split).is_file() for split in XCOPA_FIRST_COPA_ID):
            langs.append(lang)
    return langs


def _read_xcopa_key(path: Path) -> dict[tuple[str, int], dict]:
    """Read xcopa_key.tsv (split, idx, copa_id, question, label) into a dict keyed by (split, idx)."""
    key: dict[tuple[str, int], dict] = {}
    expected_header = ["split", "idx", "copa_id", "question", "label"]
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header != expected_header:
            raise ValueError(f"{path}, line 1: expected the header {expected_header}, got {header}.")
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if len(fields) != len(expected_header):
                raise ValueError(f"{where}: expected {len(expected_header)} tab-separated fields, got {len(fields)}.")
            split, idx, copa_id, question, label = fields
            if split not in XCOPA_FIRST_COPA_ID or not idx.isdigit() or not copa_id.isdigit():
                raise ValueError(f"{where}: invalid split, idx or copa_id in {fields}.")
            if question not in ("cause", "effect") or label not in ("0", "1"):
                raise ValueError(f"{where}: question must be cause or effect and label 0 or 1, got {fields}.")
            if int(copa_id) != XCOPA_FIRST_COPA_ID[split] + int(idx):
                raise ValueError(
                    f"{where}: copa_id {copa_id} does not match {split} idx {idx}, expected "
                    f"{XCOPA_FIRST_COPA_ID[split] + int(idx)}."
                )
            if (split, int(idx)) in key:
                raise ValueError(f"{where}: duplicate entry for {split} idx {idx}.")
            key[(split, int(idx))] = {"copa_id": int(copa_id), "question": question, "label": int(label)}
    if not key:
        raise ValueError(f"{path}, line 2: the key has no entries.")
    return key


def _read_xcopa_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Read (line number, record) pairs, raising a ValueError that names the line of a malformed record."""
    records = []
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error}). The file may be truncated.") from error
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            missing = [name for name in XCOPA_RECORD_KEYS if name not in record]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}. Every record needs {list(XCOPA_RECORD_KEYS)}.")
            records.append((line_number, record))
    if not records:
        raise ValueError(f"{path}, line 1: the file is empty, but one XCOPA record per line was expected.")
    return records


def _xcopa_row(lang: str, split: str, record: Mapping, key: Mapping, *, source: str, where: str) -> dict:
    """Build one schema row, taking the question from the key and checking the label against it."""
    idx = record["idx"]
    if isinstance(idx, bool) or not isinstance(idx, int) or (split, idx) not in key:
        raise ValueError(f"{where}: idx {idx!r} has no entry for split {split!r} in the XCOPA key.")
    entry = key[(split, idx)]
    if record["label"] != entry["label"]:
        raise ValueError(
            f"{where}: label {record['label']!r} differs from the key's label {entry['label']} for "
            f"{split} idx {idx} (COPA id {entry['copa_id']}). The file is not aligned with the key."
        )
    if "copa_id" in record and record["copa_id"] != entry["copa_id"]:
        raise ValueError(f"{where}: copa_id {record['copa_id']!r} differs from the key's {entry['copa_id']}.")
    for field in ("premise", "choice1", "choice2"):
        if not isinstance(record[field], str) or not record[field].strip():
            raise ValueError(f"{where}: {field} must be a non-empty string, got {record[field]!r}.")

    premise = record["premise"].strip()
    if premise.endswith(_SENTENCE_FINAL_PERIODS):
        premise = premise[:-1]
    return {
        "item_id": f"copa-{entry['copa_id']}",
        "lang": lang,
        "task": "xcopa",
        "task_type": "multiple_choice",
        "prompt": premise + XCOPA_CONNECTIVES[lang][entry["question"]],
        "choices": [" " + _lowercase_first_letter(record[field].strip(), lang) for field in ("choice1", "choice2")],
        "answer": str(entry["label"]),
        "source": source,
    }


def _lowercase_first_letter(text: str, lang: str) -> str:
    """Lowercase the first letter so the choice continues the premise sentence.

    Scripts without case are unchanged. The English pronoun "I" stays capital, and Turkish
    maps I to ı and İ to i. Proper nouns at the start of a choice are lowercased too, as in
    lm-evaluation-harness.
    """
    if lang == "en" and re.match(r"I\b", text):
        return text
    first = text[0]
    if lang == "tr" and first in ("I", "İ"):
        return ("ı" if first == "I" else "i") + text[1:]
    return first.lower() + text[1:]


def _question_corrected(record: Mapping, key_entry: Mapping) -> bool:
    """Return whether the record states a question that the key replaces."""
    return record.get("question", key_entry["question"]) != key_entry["question"]


def _log_question_corrections(lang: str, n_corrected: int, n_rows: int) -> None:
    if n_corrected:
        log.info("xcopa %s: the key corrected the cause/effect question of %d of %d rows", lang, n_corrected, n_rows)


def _load_xcopa_hub(lang: str, hub_id: str, key: Mapping) -> list[dict]:
    import datasets

    # NOTE: never run against the hub. It assumes the cambridgeltl/xcopa layout of
    # one config per language with "validation" and "test" splits and the columns premise,
    # choice1, choice2, question, label and idx.
    rows = []
    n_corrected = 0
    for split, hub_split in XCOPA_HUB_SPLITS.items():
        dataset = datasets.load_dataset(hub_id, lang, split=hub_split)
        source = f"hf://datasets/{hub_id} ({lang}, {hub_split})"
        for position, record in enumerate(dataset):
            rows.append(_xcopa_row(lang, split, record, key, source=source, where=f"{source}, row {position}"))
            n_corrected += _question_corrected(record, key[(split, record["idx"])])
    _log_question_corrections(lang, n_corrected, len(rows))
    log.info("loaded %d XCOPA items for %s from %s", len(rows), lang, hub_id)
    return rows


# --------------------------------------------------------------------------- XNLI

# The three XNLI labels in the order of the hub data set's label ids. A row's answer is the index
# of its label, and its choices are the label words in the same order.
XNLI_LABELS = ("entailment", "neutral", "contradiction")
# The prompt and label words are those of the ANLI task of EleutherAI lm-evaluation-harness:
# "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:", scored by the
# log-likelihood of " True" (entailment), " Neither" (neutral) and " False" (contradiction).
# NOTE: every language uses these English words, because no checked translation of them into
# sw, ur and my is available. The label tokens are then identical in every language, so the
# English and target-language versions of an item differ only in the premise and hypothesis.
XNLI_CHOICES = (" True", " Neither", " False")
# The 15 XNLI languages and Burmese from myXNLI.
XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "my", "ru", "sw", "th", "tr", "ur", "vi", "zh")
# Local file infix (xnli.<split>.<lang>.tsv) and the hub split of the same rows.
XNLI_SPLITS = {"dev": "validation", "test": "test"}
XNLI_HEADER = ["idx", "genre", "label", "sentence1", "sentence2"]


def load_xnli(
    lang_codes: Sequence[str],
    *,
    source: str = "local",
    data_dir: str | Path | None = None,
    hub_id: str = "facebook/xnli",
    test_fraction: float = 0.4,
    split_seed: int = 0,
) -> list[dict]:
    """Load the 7500 XNLI pairs (dev and test pooled) in each language as three-way choice rows.

    Locally, ``data_dir`` contains ``xnli.{dev,test}.<lang>.tsv`` with the header
    ``idx genre label sentence1 sentence2`` (premise, hypothesis). Item ``xnli-<split>-<idx>``
    is row idx of that split. The three hypotheses of a premise are split together (groups are
    the English premises), and every language must have the English label of each item.
    """
    langs = _check_request(lang_codes, source, test_fraction, list(XNLI_LANGS), task="xnli")
    rows_by_lang: dict[str, list[dict]] = {}
    premises_by_lang: dict[str, dict[str, str]] = {}
    if source == "hub":
        require_hub_online(hub_id)
        for lang in langs:
            rows_by_lang[lang], premises_by_lang[lang] = _load_xnli_hub(lang, hub_id)
    else:
        folder = _check_data_dir(data_dir, task="xnli")
        for lang in langs:
            rows, premises = [], {}
            for split in XNLI_SPLITS:
                path = folder / f"xnli.{split}.{lang}.tsv"
                if not path.is_file():
                    _raise_missing_language(path, lang, folder, _xnli_local_langs(folder))
                for idx, label, premise, hypothesis in _read_xnli_tsv(path):
                    row = _xnli_row(lang, f"xnli-{split}-{idx}", premise, hypothesis, label, str(path))
                    rows.append(row)
                    premises[row["item_id"]] = premise
            rows_by_lang[lang] = rows
            premises_by_lang[lang] = premises

    groups = _premise_groups(premises_by_lang)
    rows = _assign_split_and_check(rows_by_lang, test_fraction, split_seed, name="xnli", groups=groups)
    _check_answers_match_reference(rows, name="xnli")
    return rows


def _read_xnli_tsv(path: Path) -> list[tuple[int, int, str, str]]:
    """Read (idx, label index, premise, hypothesis) rows, raising a ValueError that names the line of a bad row."""
    records = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        header = next(reader, None)
        if header != XNLI_HEADER:
            raise ValueError(f"{path}, line 1: expected the header {XNLI_HEADER}, got {header}.")
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if len(fields) != len(XNLI_HEADER):
                raise ValueError(
                    f"{where}: expected {len(XNLI_HEADER)} tab-separated fields, got {len(fields)}. "
                    "The file may be truncated."
                )
            idx, _genre, label, premise, hypothesis = fields
            # idx is the 0-based row number, the same item in every language, so a gap means a lost row.
            if idx != str(len(records)):
                raise ValueError(f"{where}: idx {idx!r} should be {len(records)}, the row number. A row is missing or out of order.")
            if label not in XNLI_LABELS:
                raise ValueError(f"{where}: label {label!r} is not one of {XNLI_LABELS}.")
            if not premise.strip() or not hypothesis.strip():
                raise ValueError(f"{where}: the premise or the hypothesis is empty.")
            records.append((int(idx), XNLI_LABELS.index(label), premise.strip(), hypothesis.strip()))
    if not records:
        raise ValueError(f"{path}, line 2: the file has no rows, but one XNLI pair per line was expected.")
    return records


def _xnli_row(lang: str, item_id: str, premise: str, hypothesis: str, label: int, source: str) -> dict:
    return {
        "item_id": item_id,
        "lang": lang,
        "task": "xnli",
        "task_type": "multiple_choice",
        "prompt": f"{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
        "choices": list(XNLI_CHOICES),
        "answer": str(label),
        "source": source,
    }


def _xnli_local_langs(folder: Path) -> list[str]:
    return sorted(
        lang for lang in {path.name.split(".")[2] for path in folder.glob("xnli.*.*.tsv")}
        if all((folder / f"xnli.{split}.{lang}.tsv").is_file() for split in XNLI_SPLITS)
    )


def _load_xnli_hub(lang: str, hub_id: str) -> tuple[list[dict], dict[str, str]]:
    import datasets

    # NOTE: never run against the hub. It assumes the facebook/xnli layout of one config per
    # language with "validation" and "test" splits, the columns premise, hypothesis and label
    # (0 entailment, 1 neutral, 2 contradiction), and rows in the order of the XNLI 1.0 files.
    rows, premises = [], {}
    for split, hub_split in XNLI_SPLITS.items():
        dataset = datasets.load_dataset(hub_id, lang, split=hub_split)
        source = f"hf://datasets/{hub_id} ({lang}, {hub_split})"
        for position, record in enumerate(dataset):
            premise, hypothesis = str(record["premise"]).strip(), str(record["hypothesis"]).strip()
            label = int(record["label"])
            if label not in range(len(XNLI_LABELS)):
                raise ValueError(f"{source}, row {position}: label {label} is not 0, 1 or 2.")
            row = _xnli_row(lang, f"xnli-{split}-{position}", premise, hypothesis, label, source)
            rows.append(row)
            premises[row["item_id"]] = premise
    log.info("loaded %d XNLI pairs for %s from %s", len(rows), lang, hub_id)
    return rows, premises


def _premise_groups(premises_by_lang: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """Group item ids by their English premise: {item id: id of the first item with that premise}.

    Raises ParallelDataError when two items share an English premise but not their premise in
    another language, because then the files do not hold the same pairs.
    """
    first_with_premise: dict[str, str] = {}
    groups = {}
    for item_id, premise in premises_by_lang[REFERENCE_LANG].items():
        groups[item_id] = first_with_premise.setdefault(premise, item_id)
    for lang, premises in premises_by_lang.items():
        for item_id, premise in premises.items():
            group = groups.get(item_id)
            if group is not None and premises.get(group) != premise:
                raise ParallelDataError(
                    f"xnli: items {group!r} and {item_id!r} share their English premise but not their "
                    f"{lang!r} premise, so the {lang!r} rows are not aligned with English. Check that "
                    "language's files for a missing, extra or reordered line."
                )
    return groups


# --------------------------------------------------------------------------- XQuAD

XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")


def load_xquad(
    lang_codes: Sequence[str],
    *,
    source: str = "local",
    data_dir: str | Path | None = None,
    hub_id: str = "google/xquad",
    test_fraction: float = 0.4,
    split_seed: int = 0,
) -> list[dict]:
    """Load the 1190 XQuAD questions in each language as generative rows whose answer is a text span.

    Locally, ``data_dir`` contains the SQuAD v1.1 files ``xquad.<lang>.json``. Item
    ``xquad-<id>`` is the question with SQuAD id ``id``, and its answer is the first gold span.
    The questions on one paragraph are split together, so ``test_fraction`` is a share of the
    240 paragraphs. The prompt is "Context: {context}\\nQuestion: {question}\\nAnswer:" in
    English words for every language (see ``XNLI_CHOICES`` for why).
    """
    langs = _check_request(lang_codes, source, test_fraction, list(XQUAD_LANGS), task="xquad")
    rows_by_lang: dict[str, list[dict]] = {}
    groups_by_lang: dict[str, dict[str, str]] = {}
    if source == "hub":
        require_hub_online(hub_id)
        for lang in langs:
            rows_by_lang[lang], groups_by_lang[lang] = _load_xquad_hub(lang, hub_id)
    else:
        folder = _check_data_dir(data_dir, task="xquad")
        for lang in langs:
            path = folder / f"xquad.{lang}.json"
            if not path.is_file():
                _raise_missing_language(path, lang, folder, _xquad_local_langs(folder))
            rows, groups = [], {}
            for question_id, group, context, question, answer in _read_squad_json(path):
                row = _xquad_row(lang, question_id, context, question, answer, str(path))
                rows.append(row)
                groups[row["item_id"]] = group
            rows_by_lang[lang] = rows
            groups_by_lang[lang] = groups

    _check_groups_match_reference(groups_by_lang, name="xquad")
    return _assign_split_and_check(
        rows_by_lang, test_fraction, split_seed, name="xquad", groups=groups_by_lang[REFERENCE_LANG]
    )


def _read_squad_json(path: Path) -> list[tuple[str, str, str, str, str]]:
    """Read (question id, paragraph group, context, question, first answer) from a SQuAD v1.1 file."""
    try:
        squad = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error}). The file may be truncated.") from error
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise ValueError(f"{path}: expected a SQuAD object with a 'data' list of articles.")
    records = []
    for article_index, article in enumerate(squad["data"]):
        for paragraph_index, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}, article {article_index}, paragraph {paragraph_index}"
            context = str(paragraph.get("context", "")).strip()
            if not context:
                raise ValueError(f"{where}: the context is empty.")
            for qa in paragraph.get("qas", []):
                answers = [str(a.get("text", "")).strip() for a in qa.get("answers", [])]
                if not qa.get("id") or not str(qa.get("question", "")).strip() or not answers or not answers[0]:
                    raise ValueError(
                        f"{where}: question {qa.get('id')!r} needs an id, a question and a non-empty first answer."
                    )
                group = f"xquad-a{article_index}-p{paragraph_index}"
                records.append((str(qa["id"]), group, context, str(qa["question"]).strip(), answers[0]))
    if not records:
        raise ValueError(f"{path}: the file contains no questions.")
    return records


def _xquad_row(lang: str, question_id: str, context: str, question: str, answer: str, source: str) -> dict:
    return {
        "item_id": f"xquad-{question_id}",
        "lang": lang,
        "task": "xquad",
        "task_type": "generative",
        "prompt": f"Context: {context}\nQuestion: {question}\nAnswer:",
        "choices": [],
        "answer": answer,
        "source": source,
    }


def _xquad_local_langs(folder: Path) -> list[str]:
    return sorted(path.name.split(".")[1] for path in folder.glob("xquad.*.json"))


def _load_xquad_hub(lang: str, hub_id: str) -> tuple[list[dict], dict[str, str]]:
    import datasets

    # NOTE: never run against the hub. It assumes the google/xquad layout of one config
    # "xquad.<lang>" with a "validation" split and the SQuAD columns id, context, question and
    # answers (a dict of lists text and answer_start), in the order of the JSON files.
    dataset = datasets.load_dataset(hub_id, f"xquad.{lang}", split="validation")
    source = f"hf://datasets/{hub_id} (xquad.{lang}, validation)"
    rows, groups = [], {}
    context_numbers: dict[str, int] = {}
    for position, record in enumerate(dataset):
        answers = [str(text).strip() for text in record["answers"]["text"]]
        if not answers or not answers[0]:
            raise ValueError(f"{source}, row {position}: question {record['id']!r} has no answer.")
        context = str(record["context"]).strip()
        # The hub rows carry no paragraph index, so questions are grouped by their context text.
        number = context_numbers.setdefault(context, len(context_numbers))
        row = _xquad_row(lang, str(record["id"]), context, str(record["question"]).strip(), answers[0], source)
        rows.append(row)
        groups[row["item_id"]] = f"xquad-c{number}"
    log.info("loaded %d XQuAD questions for %s from %s", len(rows), lang, source)
    return rows, groups


def _check_groups_match_reference(groups_by_lang: Mapping[str, Mapping[str, str]], *, name: str) -> None:
    """Raise unless every item is in the same paragraph group in every language as in English."""
    reference = groups_by_lang[REFERENCE_LANG]
    for lang, groups in groups_by_lang.items():
        for item_id, group in groups.items():
            if item_id in reference and reference[item_id] != group:
                raise ParallelDataError(
                    f"{name}: item {item_id!r} is in {group!r} in {lang!r} but in {reference[item_id]!r} in "
                    f"{REFERENCE_LANG!r}, so the paragraphs of the two files are not aligned."
                )


# --------------------------------------------------------------------------- shared checks


def _check_request(
    lang_codes: Sequence[str], source: str, test_fraction: float, known_langs: list[str], *, task: str
) -> list[str]:
    """Validate the loader arguments that need no data and return the language codes as a list."""
    if source not in SOURCES:
        raise ValueError(f"{task}: unknown source {source!r}. Expected one of {SOURCES}.")
    _check_test_fraction(test_fraction)
    return _check_langs(lang_codes, known_langs, task=task)


def _check_langs(lang_codes: Sequence[str], known_langs: list[str], *, task: str) -> list[str]:
    if isinstance(lang_codes, str):
        raise TypeError(f"{task}: lang_codes must be a sequence of language codes, not the string {lang_codes!r}.")
    langs = list(lang_codes)
    if REFERENCE_LANG not in langs:
        raise ValueError(
            f"{task}: lang_codes {langs} must include {REFERENCE_LANG!r}, the reference language."
        )
    duplicates = sorted({lang for lang in langs if langs.count(lang) > 1})
    if duplicates:
        raise ValueError(f"{task}: lang_codes lists {duplicates} more than once.")
    unknown = [lang for lang in langs if lang not in known_langs]
    if unknown:
        raise ValueError(f"{task}: no prompt template for language(s) {unknown}. Supported languages: {known_langs}.")
    return langs


def _check_test_fraction(test_fraction: float) -> None:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}.")


def _check_data_dir(data_dir: str | Path | None, *, task: str) -> Path:
    if data_dir is None:
        raise ValueError(f"{task}: data_dir is not set. Set it to the local {task} data folder.")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{task}: data_dir {folder} is not a folder. Set it to the local {task} data folder.")
    return folder


def _raise_missing_language(path: Path, lang: str, folder: Path, available: list[str]) -> None:
    raise FileNotFoundError(
        f"{path} not found, so there is no data for language {lang!r}. Languages available in "
        f"{folder}: {available}. Fix the language list or data_dir in the config."
    )


def require_hub_online(hub_id: str) -> None:
    """Raise RuntimeError before any hub call when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set.

    The datasets client would otherwise look for a cached copy or retry the network.
    """
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_ENV_VALUES:
            raise RuntimeError(
                f"cannot load {hub_id!r} from the Hugging Face hub: this machine is offline "
                f"({variable}={os.environ[variable]}). Set 'source: local' and 'data_dir' to a local "
                "copy of the data set in the config."
            )


def _assign_split_and_check(
    rows_by_lang: Mapping[str, list[dict]],
    test_fraction: float,
    seed: int,
    *,
    name: str,
    groups: Mapping[str, str] | None = None,
) -> list[dict]:
    """Set each row's split from its item id, then validate the rows and their parallelism.

    The split is drawn over the ids of all languages together. When the data are parallel that
    set equals the English ids, and otherwise ``check_parallel`` raises and names the odd ids.
    With ``groups`` ({English item id: group id}), the seeded split is drawn over the group ids
    and every item takes the split of its group, so ``test_fraction`` is a share of groups.
    """
    rows = [row for lang_rows in rows_by_lang.values() for row in lang_rows]
    item_ids = [row["item_id"] for row in rows]
    if groups is None:
        split_by_id = split_item_ids(item_ids, test_fraction, seed)
    else:
        # An id without an English counterpart forms its own group here, and check_parallel
        # below rejects it with the list of odd ids.
        group_of = {item_id: groups.get(item_id, item_id) for item_id in item_ids}
        split_by_group = split_item_ids(list(group_of.values()), test_fraction, seed)
        split_by_id = {item_id: split_by_group[group] for item_id, group in group_of.items()}
    for row in rows:
        row["split"] = split_by_id[row["item_id"]]
    validate_rows(rows, name=name)
    check_parallel(rows, name=name)
    n_items = len(rows_by_lang[REFERENCE_LANG])
    n_test = sum(1 for split in split_by_id.values() if split == "test")
    log.info(
        "%s: %d items in %d languages (%s), %d train and %d test per language%s",
        name, n_items, len(rows_by_lang), ", ".join(rows_by_lang), n_items - n_test, n_test,
        "" if groups is None else f", split by {len(set(groups.values()))} groups",
    )
    return rows
