"""Extract numeric and multiple-choice answers from generated text in many languages.

A parse failure is ``None``, never a guessed value, so callers can count it apart from a
wrong answer. The rules below apply to every function in this module.

Digits
    Every Unicode decimal digit (category Nd: Bengali, Thai, Telugu, Devanagari,
    Arabic-Indic, full-width and the rest) reads as its value through
    ``unicodedata.decimal``. '-', U+2212 MINUS SIGN and U+FF0D FULLWIDTH HYPHEN-MINUS right
    before a number make it negative, unless they follow a digit, an ASCII letter or a
    closing bracket, so '35-2' is a subtraction and not the number -2.

Decimal mark and thousands separators
    Languages in DECIMAL_COMMA_LANGS (de, es, fr, ru, it, pt, id, tr, ...) write 3.5 as
    '3,5' and group thousands with '.' or a space. The other languages write '3.5' and
    group with ','. U+00A0, U+202F and U+2009 between groups of three digits group
    thousands in every language. A plain space does so only in decimal-comma languages
    (fr '5 600'), because in English text '5 600' is more often two numbers.

    Most numbers are unambiguous and read the same way in every language. With both
    marks, the last one is the decimal mark ('1.234,5', '1,234.5'). One kind of
    mark that occurs more than once separates thousands ('1,234,567', '1.234.567'). A
    single mark is a decimal mark when it cannot separate thousands ('3,5' in English,
    '2.5' in German). That is the case when other than three digits follow it, or when the
    part before it has a leading zero or more than three digits. A leading decimal mark is
    accepted ('.5' is 0.5, and ',5' is 0.5 in decimal-comma languages).

    The one ambiguous case is a single mark with exactly three digits after it and one to
    three digits before it. It follows the language's convention. So de, es, fr and ru
    read '8.000' and '5.600' as 8000 and 5600, because '.' is their thousands separator
    and a writer who meant 8 would not add three trailing zeros. English reads '8.000' as
    8 and '5,600' as 5600. German reads '5,600' as 5.6.

Canonical form
    ASCII digits, '.' as the decimal point, an optional leading '-', no thousands
    separators, no leading zeros, no trailing zeros after the point and no trailing point.
    '-0' becomes '0'. A trailing mark is never part of a number, so 'is 18.' reads as 18.

Answer cues
    ANSWER_CUES lists the localized "The answer is" sentences that end the MGSM
    chain-of-thought exemplars (Shi et al. 2022, "Language models are multilingual
    chain-of-thought reasoners"). The English cues are searched in every language
    because models often answer in English. Cues match case-insensitively, with any
    whitespace or none between their words.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal

__all__ = [
    "ANSWER_CUES",
    "DECIMAL_COMMA_LANGS",
    "extract_choice",
    "extract_number",
    "normalize_number",
    "numbers_equal",
]

# The first cue of each language is copied from the MGSM exemplars' answers. The others are
# added variants: "Ответ:" and the other dashes, "答案为", and the English "final answer" forms.
# "উত্তর হল" also matches the spelling "উত্তর হলো", because the match may end before a vowel sign.
ANSWER_CUES: dict[str, tuple[str, ...]] = {
    "en": ("The answer is", "The final answer is", "Final answer:"),
    "bn": ("উত্তর হল",),
    "de": ("Die Antwort lautet", "Die Antwort ist"),
    "es": ("La respuesta es",),
    "fr": ("La réponse est",),
    "ja": ("答えは",),
    "ru": ("Ответ —", "Ответ –", "Ответ -", "Ответ:"),
    "sw": ("Jibu ni",),
    "te": ("సమాధానం",),
    "th": ("คำตอบคือ",),
    "zh": ("答案是", "答案为"),
}

DECIMAL_COMMA_LANGS: frozenset[str] = frozenset(
    {
        "az", "be", "bg", "ca", "cs", "da", "de", "el", "es", "et", "eu", "fi", "fr", "gl",
        "hr", "hu", "id", "is", "it", "kk", "lt", "lv", "mk", "nb", "nl", "nn", "no", "pl",
        "pt", "ro", "ru", "sk", "sl", "sq", "sr", "sv", "tr", "uk", "vi",
    }
)  # fmt: skip
# NOTE: "es" follows Spain and Argentina. Mexican Spanish uses a decimal point, but a region
# subtag is dropped, so 'es-MX' is read with a decimal comma too.

# Languages written without spaces between words, where a cue has no word boundary to check.
_UNSPACED_LANGS = frozenset({"ja", "zh", "th"})

# Words that, right before a cue, make it part of another phrase. In Telugu the exemplars'
# "Step-by-Step Answer:" prefix is "దశలవారీగా సమాధానం:", which contains the cue "సమాధానం".
_CUE_FALSE_PRECEDERS: dict[str, tuple[str, ...]] = {"te": ("దశలవారీగా",)}

# The localized word for "answer" that introduces a choice ("Antwort: B"), and the verbs that may
# link it to the choice ("Die Antwort ist B"). NOTE: qu (Quechua, in XCOPA) has no entry yet,
# so only the English cue and a bare leading letter or digit work there.
_CHOICE_CUE_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("answer",),
    "bn": ("উত্তর",),
    "de": ("Antwort",),
    "es": ("respuesta",),
    "et": ("vastus",),
    "fr": ("réponse",),
    "ht": ("repons",),
    "id": ("jawaban", "jawabannya"),
    "it": ("risposta",),
    "ja": ("答え",),
    "pt": ("resposta",),
    "ru": ("ответ",),
    "sw": ("jibu",),
    "ta": ("பதில்", "விடை"),
    "te": ("సమాధానం",),
    "th": ("คำตอบ",),
    "tr": ("cevap", "yanıt"),
    "vi": ("đáp án", "câu trả lời"),
    "zh": ("答案",),
}
_CHOICE_LINK_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("is", "would be", "should be"),
    "de": ("ist", "lautet", "wäre"),
    "es": ("es", "sería"),
    "et": ("on",),
    "fr": ("est", "serait"),
    "ht": ("se",),
    "id": ("adalah", "ialah"),
    "it": ("è", "é", "sarebbe"),
    "ja": ("は",),
    "pt": ("é", "seria"),
    "sw": ("ni",),
    "th": ("คือ",),
    "vi": ("là",),
    "zh": ("是", "为"),
}

_SIGNS = "-\u2212\uff0d"
_WIDE_SPACES = "\u00a0\u202f\u2009"
# Decimal and grouping marks of other scripts, mapped to ASCII before parsing: ARABIC DECIMAL
# SEPARATOR, ARABIC THOUSANDS SEPARATOR and FULLWIDTH FULL STOP.
_MARK_TRANSLATION = str.maketrans({"\u066b": ".", "\u066c": ",", "\uff0e": "."})


def _build_number_regex(decimal_comma: bool) -> re.Pattern[str]:
    group_spaces = _WIDE_SPACES + (" " if decimal_comma else "")
    leading_marks = ".," if decimal_comma else "."
    return re.compile(
        rf"""
        (?: (?<![0-9A-Za-z)\]]) (?P<sign>[{_SIGNS}]) )?
        (?P<body>
            [0-9]+ (?: [.,][0-9]+ | [{group_spaces}][0-9]{{3}}(?![0-9]) )*
          | (?<![\w.,]) [{leading_marks}][0-9]+
        )
        """,
        re.VERBOSE,
    )


_NUMBER_REGEX = {False: _build_number_regex(False), True: _build_number_regex(True)}
_SPACE_GROUPED = re.compile(rf"([0-9]{{1,3}}(?:[ {_WIDE_SPACES}][0-9]{{3}})+)(?:[.,]([0-9]+))?")
_CANONICAL_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]*[1-9])?")


def _base_language(lang: str) -> str:
    """Return the language subtag of a tag such as 'de-DE' or 'pt_BR', in lower case."""
    return lang.replace("_", "-").split("-")[0].lower()


def _prepare_text(text: str, form: str = "NFC") -> str:
    """Normalize ``text`` to ``form`` and rewrite every Unicode decimal digit as ASCII."""
    text = unicodedata.normalize(form, text).translate(_MARK_TRANSLATION)
    if text.isascii():
        return text

    characters = []
    for character in text:
        digit = unicodedata.decimal(character, None)
        characters.append(character if digit is None else str(digit))
    return "".join(characters)


def _is_grouped(digits: str, mark: str) -> bool:
    """Check that ``mark`` separates groups of three digits after a first group of one to three."""
    return re.fullmatch(rf"[1-9][0-9]{{0,2}}(?:{re.escape(mark)}[0-9]{{3}})+", digits) is not None


def _split_decimal(body: str, decimal_comma: bool) -> tuple[str, str] | None:
    """Split a number body into integer and fraction digits, or return None when its marks fit no rule."""
    if any(character in body for character in " " + _WIDE_SPACES):
        match = _SPACE_GROUPED.fullmatch(body)
        if match is None:
            return None
        return re.sub(rf"[ {_WIDE_SPACES}]", "", match[1]), match[2] or ""

    has_comma = "," in body
    has_point = "." in body
    if not has_comma and not has_point:
        return body, ""

    if has_comma and has_point:
        decimal_mark = "," if body.rfind(",") > body.rfind(".") else "."
        group_mark = "." if decimal_mark == "," else ","
        integer, _, fraction = body.rpartition(decimal_mark)
        if decimal_mark in integer or not _is_grouped(integer, group_mark):
            return None
        return integer.replace(group_mark, ""), fraction

    mark = "," if has_comma else "."
    if body.count(mark) > 1:
        if not _is_grouped(body, mark):
            return None
        return body.replace(mark, ""), ""

    integer, _, fraction = body.partition(mark)
    language_group_mark = "." if decimal_comma else ","
    if mark == language_group_mark and _is_grouped(body, mark):
        # The ambiguous case: one mark before three digits takes the language's convention.
        return integer + fraction, ""
    return integer, fraction


def _canonical(negative: bool, integer: str, fraction: str) -> str:
    integer = integer.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    number = f"{integer}.{fraction}" if fraction else integer
    if negative and number != "0":
        return "-" + number
    return number


def _canonical_from_match(match: re.Match[str], decimal_comma: bool) -> str | None:
    parts = _split_decimal(match["body"], decimal_comma)
    if parts is None:
        return None
    return _canonical(match["sign"] is not None, *parts)


def _numbers_in(text: str, lang: str) -> list[tuple[int, str]]:
    """Find every number in prepared ``text`` as (start offset, canonical form), in order."""
    decimal_comma = _base_language(lang) in DECIMAL_COMMA_LANGS
    numbers = []
    for match in _NUMBER_REGEX[decimal_comma].finditer(text):
        value = _canonical_from_match(match, decimal_comma)
        if value is not None:
            numbers.append((match.start(), value))
            continue

        # Marks that fit no rule ('1,2,3', '3.5.2024') separate numbers, so each digit run
        # is a number of its own. The sign stays with the first one.
        negative = match["sign"] is not None
        for run in re.finditer(r"[0-9]+", match["body"]):
            numbers.append((match.start("body") + run.start(), _canonical(negative, run[0], "")))
            negative = False
    return numbers


def _phrase_pattern(phrase: str, spaced: bool) -> str:
    """Build a regex source for ``phrase`` that allows any whitespace between its words.

    In a ``spaced`` script the phrase must also start and end at word boundaries where it
    starts or ends with a letter, so that "La respuesta es" does not match "La respuesta está".
    """
    pattern = r"\s*".join(re.escape(word) for word in phrase.split())
    if not spaced:
        return pattern
    if phrase[0].isalnum():
        pattern = r"(?<!\w)" + pattern
    if phrase[-1].isalnum():
        pattern += r"(?!\w)"
    return pattern


def _phrases_regex_source(table: dict[str, tuple[str, ...]], lang: str) -> str:
    """Join the phrases of ``lang`` and of English from ``table`` into one alternation, longest first."""
    base = _base_language(lang)
    spaced = base not in _UNSPACED_LANGS
    patterns = [_phrase_pattern(phrase, spaced) for phrase in table.get(base, ())]
    if base != "en":
        patterns += [_phrase_pattern(phrase, True) for phrase in table["en"]]
    patterns.sort(key=len, reverse=True)
    return "|".join(patterns)


def _cue_ends(text: str, lang: str) -> list[int]:
    """Find the end offset of every answer cue in prepared ``text``, in order."""
    base = _base_language(lang)
    false_preceders = _CUE_FALSE_PRECEDERS.get(base, ())
    cue_regex = re.compile(_phrases_regex_source(ANSWER_CUES, lang), re.IGNORECASE)

    ends = []
    for match in cue_regex.finditer(text):
        preceding = text[: match.start()].rstrip()
        if preceding.endswith(false_preceders):
            continue
        ends.append(match.end())
    return ends


def normalize_number(text: str, lang: str = "en") -> str | None:
    """Return the canonical form of one number string, or None when ``text`` is not a number.

    The canonical form has ASCII digits, '.' as the decimal point and an optional leading
    '-'. It has no thousands separators, no trailing zeros after the point and no trailing
    point: '18.0' -> '18', '5,600' -> '5600', de '8.000' -> '8000', de '3,5' -> '3.5'.

    ``text`` must be a bare number with optional surrounding whitespace. Currency symbols,
    units and a trailing sentence period make it None, and extract_number is the function
    that reads numbers out of running text. ``lang`` decides the decimal mark as described
    in the module docstring. A tag with a region ('de-DE', 'pt_BR') uses its language.
    """
    prepared = _prepare_text(text).strip()
    decimal_comma = _base_language(lang) in DECIMAL_COMMA_LANGS
    match = _NUMBER_REGEX[decimal_comma].fullmatch(prepared)
    if match is None:
        return None
    return _canonical_from_match(match, decimal_comma)


def extract_number(output: str, lang: str = "en") -> str | None:
    """Extract the model's numeric answer from a generated output, in canonical form.

    The answer is the number after the last localized answer cue when the output contains
    a cue, and the last number in the output otherwise. The canonical form is that of
    normalize_number. Returns None when the output contains no number, which is a parse
    failure.

    The number after a cue is the first number anywhere after it, so 'The answer is $18'
    and 'La respuesta es de 18 dólares' both give 18. When no number follows the last cue
    ('The answer is 18. I hope the answer is clear.'), the cues before it are tried in turn,
    and then the last number of the whole output.

    NOTE: the last cue wins, so a base model that goes on to write the next few-shot
    question and its answer is scored on that answer. Cut the output at the next
    "Question:" marker, for example with a stop sequence, before calling this function.
    """
    text = _prepare_text(output)
    numbers = _numbers_in(text, lang)
    if not numbers:
        return None

    for cue_end in reversed(_cue_ends(text, lang)):
        for start, value in numbers:
            if start >= cue_end:
                return value
    return numbers[-1][1]


def numbers_equal(predicted: str | None, gold: str, lang: str = "en") -> bool:
    """Check whether ``predicted`` and ``gold`` parse and are numerically equal, as Decimal.

    ``predicted`` is read as is when it is already in canonical form (the output of
    extract_number), and in the notation of ``lang`` otherwise. So in German '1.125' is
    1.125, but '5.600' is 5600. Returns False when ``predicted`` is None or does not parse.

    ``gold`` is always read in English notation (',' separates thousands, '.' is the decimal
    point), because MGSM writes its answer_number column that way in all 11 languages: the
    German file also has '5,600'. Raises ValueError when ``gold`` is not a number, because
    an unreadable gold answer is a data error and would otherwise score every prediction
    as wrong.
    """
    gold_value = normalize_number(gold, "en")
    if gold_value is None:
        raise ValueError(
            f"invalid gold answer {gold!r}: expected a number in English notation, such as '5,600' or '3.5'"
        )
    if predicted is None:
        return False

    if _CANONICAL_NUMBER.fullmatch(predicted) and predicted != "-0":
        predicted_value: str | None = predicted
    else:
        predicted_value = normalize_number(predicted, lang)
    if predicted_value is None:
        return False
    return Decimal(predicted_value) == Decimal(gold_value)


# A choice token: an upper-case letter, a lower-case letter closed by a bracket or at the end of
# the output (so the English article in "the answer is a bit unclear" is not choice A), or a
# whole number.
_CHOICE_TOKEN_AFTER_CUE = r"""
    (?P<letter> [A-Z](?![0-9A-Za-z\u00C0-\u024F]) | [a-z](?=[)\]]|[\W_]*\Z) )
  | (?P<number> [0-9]+(?![0-9]|[.,][0-9]) )
"""

# A choice at the start of the output counts only when a delimiter or the end follows it,
# so 'B) The man fell.' and '**B**' are choice B, but 'A cat sat' is no choice.
_LEADING_CHOICE = re.compile(
    r"""
    \A [\W_]*
    (?: (?P<letter>[A-Za-z]) | (?P<number>[0-9]+) )
    (?= [*_"'”’\s]* (?:\Z|\n)
      | [*_"'”’]* (?: [)\].:,;] | \s+[-–—] )
    )
    """,
    re.VERBOSE,
)


def _choice_index(match: re.Match[str]) -> int:
    """Return the 0-based choice of a token match: A and 1 are 0, B and 2 are 1, and so on."""
    if match["letter"] is not None:
        return ord(match["letter"].upper()) - ord("A")
    return int(match["number"]) - 1


def _last_cued_choice(text: str, lang: str) -> re.Match[str] | None:
    """Find the last answer word ('Answer:', 'Antwort ist', '答案是') followed by a choice token."""
    cue_words = _phrases_regex_source(_CHOICE_CUE_WORDS, lang)
    link_words = _phrases_regex_source(_CHOICE_LINK_WORDS, lang)
    # The answer words match case-insensitively, but the token keeps its case, which decides
    # whether a lower-case letter needs a closing bracket.
    regex = re.compile(
        rf"(?i:{cue_words})(?:\s*(?i:{link_words}))?[\W_]*(?:{_CHOICE_TOKEN_AFTER_CUE})",
        re.VERBOSE,
    )
    last = None
    for last in regex.finditer(text):
        pass
    return last


def extract_choice(output: str, n_choices: int, lang: str = "en") -> int | None:
    """Extract the 0-based choice index from a generated output, or None when none is found.

    A choice is a letter A, B, C, ... or a number 1, 2, 3, ... given as the answer: 'B',
    '(b)', 'Answer: 2' and 'Antwort: A'. An answer word that starts with a letter is never
    read as that letter, so German 'Antwort' is not A and French 'Bonne réponse' is not B.

    The choice after the last localized answer word wins ('Option A looks right, but the
    answer is B' gives 1). Without an answer word, only a letter or number at the start of
    the output that a delimiter or the end follows counts ('B', 'b)', '(A)', '**B**',
    'B) The man fell.'). Letters and digits beyond ``n_choices`` give None, and so does
    'Answer: I think B', because the pronoun 'I' is read as the ninth choice. Raises ValueError when ``n_choices`` is less than 1.
    """
    if n_choices < 1:
        raise ValueError(f"n_choices must be at least 1, got {n_choices}")

    # NFKC maps full-width letters and colons ('Ｂ', '：') to ASCII.
    text = _prepare_text(output, form="NFKC")
    match = _last_cued_choice(text, lang) or _LEADING_CHOICE.match(text)
    if match is None:
        return None

    index = _choice_index(match)
    if 0 <= index < n_choices:
        return index
    return None
