"""Tests for multilingual answer extraction in ramoe.evaluation.extract."""

from __future__ import annotations

import pytest

from ramoe.evaluation.extract import (
    ANSWER_CUES,
    DECIMAL_COMMA_LANGS,
    extract_choice,
    extract_number,
    normalize_number,
    numbers_equal,
)

MGSM_LANGS = ("en", "bn", "de", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")

# (output, lang, expected canonical number or None)
EXTRACT_NUMBER_CASES = [
    # Thousands separators.
    ("She has 5,600 cookies.", "en", "5600"),
    ("The answer is 1,234,567.", "en", "1234567"),
    ("Die Antwort lautet 8.000.", "de", "8000"),
    ("La respuesta es 5.600.", "es", "5600"),
    ("La réponse est 5 600.", "fr", "5600"),
    ("La réponse est 5\u00a0600 €.", "fr", "5600"),
    ("Ответ — 5\u202f600.", "ru", "5600"),
    ("The answer is 5\u00a0600.", "en", "5600"),
    # A plain space groups digits only in decimal-comma languages.
    ("The answer is 5 600.", "en", "5"),
    # Decimals, including English-style decimals in a decimal-comma language.
    ("The answer is 3.5.", "en", "3.5"),
    ("Die Antwort lautet 3,5.", "de", "3.5"),
    ("The answer is 0.25", "en", "0.25"),
    ("The answer is .5", "en", "0.5"),
    ("The answer is 18.0", "en", "18"),
    ("The answer is 5.600", "en", "5.6"),
    ("Die Antwort lautet 2.5.", "de", "2.5"),
    ("Die Antwort lautet 1.234,5 Euro.", "de", "1234.5"),
    ("The answer is 1,234.5", "en", "1234.5"),
    # Currency and units.
    ("The answer is $18.", "en", "18"),
    ("The answer is 18 dollars.", "en", "18"),
    ("It costs €5 in total.", "en", "5"),
    ("Sie zahlt 5€.", "de", "5"),
    ("答案是 ¥300。", "zh", "300"),
    ("The answer is ₹ 40", "en", "40"),
    ("A resposta é R$ 12.", "pt", "12"),
    ("The answer is 18 USD", "en", "18"),
    # Trailing punctuation and markdown.
    ("The answer is 18.", "en", "18"),
    ("18。", "zh", "18"),
    ("The answer is **18**", "en", "18"),
    # Negatives, and a hyphen after a digit that is a subtraction.
    ("The answer is -5.", "en", "-5"),
    ("The answer is \u22125.", "en", "-5"),
    ("35-2=33", "en", "33"),
    # Unicode decimal digits.
    ("উত্তর হল ১৮।", "bn", "18"),
    ("คำตอบคือ ๑๘", "th", "18"),
    ("答えは１８です。", "ja", "18"),
    ("उत्तर १८ है", "hi", "18"),
    ("الجواب هو ١٨", "ar", "18"),
    ("సమాధానం ౧౮.", "te", "18"),
    # The number after the last cue wins over later numbers, in every MGSM language.
    ("The answer is 12. Wait, that is wrong. The answer is 18. 18 - 6 = 12", "en", "18"),
    ("উত্তর হল 29। 9 + 20 = 29, 29 - 20 = 9", "bn", "29"),
    ("উত্তর হলো ১৮। ১৮ - ৬ = ১২", "bn", "18"),
    ("Die Antwort lautet 29. Probe: 9 + 20 = 29, 29 - 20 = 9.", "de", "29"),
    ("Die Antwort ist 11. 11 - 5 = 6.", "de", "11"),
    ("La respuesta es 39. Sobran 2.", "es", "39"),
    ("5 + 6 = 11. La réponse est 11. Donc 3 boîtes.", "fr", "11"),
    ("答えは33個です。残りは2個。", "ja", "33"),
    ("Ответ — 8. Проверка: 8 + 15 = 23.", "ru", "8"),
    ("Jibu ni 33. Alikuwa na 58.", "sw", "33"),
    ("ఉన్నాయి. సమాధానం 39.చాక్లెట్\u200cలుచాక్లెట్\u200cలు 2", "te", "39"),
    ("คำตอบคือ 11 (5 + 6)", "th", "11"),
    ("答案是 39。还剩 2 块。", "zh", "39"),
    ("答案为 7，因为 3 + 4。", "zh", "7"),
    # The English cue counts in every language, and a region subtag is ignored.
    ("Rechnung: 5 + 6 = 11. The answer is 11. Probe 3.", "de", "11"),
    ("Die Antwort lautet 8.000.", "de-DE", "8000"),
    ("The final answer is 42, from 6 * 7.", "en", "42"),
    # The Telugu "Step-by-Step Answer:" prefix contains the cue word but is no cue.
    ("దశలవారీగా సమాధానం: రోజర్ వద్ద 5 బంతులు. 5 + 6 = 11.", "te", "11"),
    # A cue with no number after it falls back to the cue before it.
    ("The answer is 18. I hope the answer is clear.", "en", "18"),
    # No cue: the last number.
    ("5 + 6 = 11 and then 11 * 2 = 22", "en", "22"),
    ("Counting: 1,2,3", "en", "3"),
    # No number at all is a parse failure.
    ("I do not know", "en", None),
    ("", "en", None),
    ("答えは分かりません", "ja", None),
]

# Real answers from the MGSM chain-of-thought exemplars (CC-BY 4.0, Shi et al. 2022).
MGSM_EXEMPLAR_CASES = [
    ("Step-by-Step Answer: Roger started with 5 balls. 2 cans of 3 tennis balls each is 6 tennis balls. "
     "5 + 6 = 11. The answer is 11.", "en", "11"),
    ("Schritt-für-Schritt-Antwort: Roger hat 5 Tennisbälle. 5 + 6 = 11. Die Antwort ist 11.", "de", "11"),
    ("ধাপে ধাপে উত্তর: রজারের প্রথমে 5টি বল ছিল। 5 + 6 = 11। উত্তর হল 11।", "bn", "11"),
    ("ステップごとの答え：最初に3台の車があり、さらに2台到着したので、今は3+2で5台の車があるはずです。答えは5です。", "ja", "5"),
    ("逐步解答：一开始有 3 辆车，又来了 2 辆，所以现在应该有 3 + 2 = 5 辆车。答案是 5。", "zh", "5"),
    ("ตอนนี้โอลิเวียจะเหลือเงินอยู่ 23 - 15 = 8 ดอลลาร์ คำตอบคือ 8", "th", "8"),
    ("значит, теперь у нее осталось 23 - 15 = 8 $. Ответ — 8.", "ru", "8"),
]  # fmt: skip

# (text, lang, expected canonical number or None)
NORMALIZE_NUMBER_CASES = [
    ("18", "en", "18"),
    ("18.0", "en", "18"),
    ("0.250", "en", "0.25"),
    ("007", "en", "7"),
    ("5,600", "en", "5600"),
    ("1,234,567", "en", "1234567"),
    ("1.234.567", "en", "1234567"),
    ("1,234,567", "de", "1234567"),
    ("8.000", "de", "8000"),
    ("8.000", "en", "8"),
    ("5.600", "de", "5600"),
    ("5,600", "de", "5.6"),
    ("3,5", "de", "3.5"),
    ("3,5", "en", "3.5"),
    ("3.5", "en", "3.5"),
    ("0,500", "de", "0.5"),
    ("5 600", "fr", "5600"),
    ("5 600", "en", None),
    ("5\u00a0600", "en", "5600"),
    ("5\u202f600", "ru", "5600"),
    ("1 234 567", "ru", "1234567"),
    ("12 345,6", "fr", "12345.6"),
    (".5", "en", "0.5"),
    (",5", "de", "0.5"),
    (",5", "en", None),
    ("-5", "en", "-5"),
    ("\u22125", "en", "-5"),
    ("-0", "en", "0"),
    ("  42  ", "en", "42"),
    ("１８", "ja", "18"),
    ("١٨", "ar", "18"),
    ("٣٫٥", "ar", "3.5"),
    ("১৮", "bn", "18"),
    ("18.", "en", None),
    ("1,2,3", "en", None),
    ("$18", "en", None),
    ("abc", "en", None),
    ("", "en", None),
]

# (predicted, gold, lang, expected)
NUMBERS_EQUAL_CASES = [
    ("5600", "5,600", "en", True),
    ("5,600", "5,600", "en", True),
    ("18", "18", "de", True),
    ("18", "18.0", "en", True),
    ("-5", "-5", "en", True),
    ("17", "18", "en", False),
    (None, "18", "en", False),
    ("abc", "18", "en", False),
    # Raw predictions use the language's notation, canonical ones are read as they are.
    ("8.000", "8,000", "de", True),
    ("1.125", "1.125", "de", True),
    ("5,600", "5,600", "de", False),
]

# (output, n_choices, lang, expected 0-based index or None)
EXTRACT_CHOICE_CASES = [
    ("B", 2, "en", 1),
    (" A\n", 2, "en", 0),
    ("b)", 2, "en", 1),
    ("(b)", 2, "en", 1),
    ("(A)", 2, "en", 0),
    ("**B**", 2, "en", 1),
    ("B) The man fell.", 2, "en", 1),
    ("2", 2, "en", 1),
    ("1.", 2, "en", 0),
    ("Ｂ", 2, "ja", 1),
    ("Answer: B", 2, "en", 1),
    ("Answer: b", 2, "en", 1),
    ("Answer: 2", 2, "en", 1),
    ("The correct answer is (b).", 2, "en", 1),
    ("The answer is A because the ground is wet.", 2, "en", 0),
    ("Option A looks plausible, but the answer is B.", 2, "en", 1),
    ("Antwort: A", 2, "de", 0),
    ("Antwort: B", 2, "de", 1),
    ("Die Antwort ist B.", 2, "de", 1),
    ("Réponse : 2", 2, "fr", 1),
    ("Bonne réponse : B", 2, "fr", 1),
    ("答案是B", 2, "zh", 1),
    ("答案：A", 2, "zh", 0),
    ("Jawaban: A", 2, "id", 0),
    ("Jibu ni B", 2, "sw", 1),
    ("Cevap: B", 2, "tr", 1),
    ("Đáp án là B", 2, "vi", 1),
    ("C", 3, "en", 2),
    # Out of range.
    ("C", 2, "en", None),
    ("3", 2, "en", None),
    ("Answer: 10", 2, "en", None),
    ("Answer: C", 2, "en", None),
    ("Answer: I think B", 2, "en", None),
    # No choice.
    ("", 2, "en", None),
    ("A cat sat on the mat.", 2, "en", None),
    ("I think so", 2, "en", None),
    ("The answer is a bit unclear", 2, "en", None),
    ("Antwort: A", 2, "en", None),
]


@pytest.mark.parametrize(("output", "lang", "expected"), EXTRACT_NUMBER_CASES)
def test_extract_number_table(output, lang, expected):
    assert extract_number(output, lang) == expected


@pytest.mark.parametrize(("output", "lang", "expected"), MGSM_EXEMPLAR_CASES)
def test_extract_number_mgsm_exemplar(output, lang, expected):
    assert extract_number(output, lang) == expected


@pytest.mark.parametrize(("text", "lang", "expected"), NORMALIZE_NUMBER_CASES)
def test_normalize_number_table(text, lang, expected):
    assert normalize_number(text, lang) == expected


@pytest.mark.parametrize(("predicted", "gold", "lang", "expected"), NUMBERS_EQUAL_CASES)
def test_numbers_equal_table(predicted, gold, lang, expected):
    assert numbers_equal(predicted, gold, lang) is expected


def test_numbers_equal_invalid_gold_raises():
    with pytest.raises(ValueError, match="invalid gold answer 'eighteen'"):
        numbers_equal("18", "eighteen")


@pytest.mark.parametrize(("output", "n_choices", "lang", "expected"), EXTRACT_CHOICE_CASES)
def test_extract_choice_table(output, n_choices, lang, expected):
    assert extract_choice(output, n_choices, lang) == expected


def test_extract_choice_zero_choices_raises():
    with pytest.raises(ValueError, match="n_choices must be at least 1, got 0"):
        extract_choice("A", 0)


@pytest.mark.parametrize("lang", MGSM_LANGS)
def test_answer_cues_cover_mgsm_language(lang):
    assert ANSWER_CUES[lang]


@pytest.mark.parametrize("lang", MGSM_LANGS)
def test_first_cue_extracts_answer(lang):
    output = f"5 + 6 = 11. {ANSWER_CUES[lang][0]} 11. 2 + 2 = 4."
    assert extract_number(output, lang) == "11"


@pytest.mark.parametrize("lang", ("de", "es", "fr", "ru", "it", "pt", "id", "tr"))
def test_decimal_comma_langs_contains(lang):
    assert lang in DECIMAL_COMMA_LANGS


@pytest.mark.parametrize("lang", ("en", "bn", "ja", "sw", "te", "th", "zh"))
def test_decimal_comma_langs_excludes(lang):
    assert lang not in DECIMAL_COMMA_LANGS
