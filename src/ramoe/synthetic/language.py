"""Synthetic target languages derived from a templated English.

A language is English pushed away along four configurable axes:

- vocabulary: a share of English words (``vocab_overlap``) is kept, every other word maps one to
  one onto a pseudo-word made of syllables, unique across all languages of the world;
- word order: ``svo`` (English), ``sov`` (verb-final: the clause's second word moves to its end)
  or ``reversed`` (every clause reversed);
- numerals: ``latin`` (the English tokens ``0``..``99``) or a Unicode decimal digit system
  (``bengali``, ``thai``, ``devanagari``, ``fullwidth``), so the language writes its own numeral
  tokens, as Bengali and Thai do in MGSM;
- amount of training text, which the pretraining mixture reads (see ``mixture.py``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ramoe.synthetic.tasks import CONNECTIVES

# First code point of the digit zero in each supported numeral system.
NUMERAL_ZERO = {
    "latin": ord("0"),
    "bengali": 0x09E6,
    "thai": 0x0E50,
    "devanagari": 0x0966,
    "fullwidth": 0xFF10,
}
WORD_ORDERS = ("svo", "sov", "reversed")
PUNCTUATION = frozenset({".", "?", ":"})
# Connectives of the multiple-choice task end a clause too, so that a prompt ("tom is hungry . so")
# and its choice (" tom eats bread .") translate exactly as the whole line does.
CLAUSE_WORDS = frozenset(CONNECTIVES.values())

_ONSETS = "b d f g k l m n p r s t v z".split()
_NUCLEI = "a e i o u".split()
_CODAS = ["", "", "", "n", "r", "s"]
_NUMBER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class LanguageSpec:
    """Distance of one synthetic language from English; every field is a config key."""

    code: str
    vocab_overlap: float = 0.0
    word_order: str = "svo"
    numerals: str = "latin"
    task_share: float = 0.1
    generic_share: float = 1.0
    bitext_share: float = 0.05


@dataclass
class SyntheticLanguage:
    """A concrete language: its word map, numeral system and word order."""

    spec: LanguageSpec
    word_map: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return self.spec.code

    def numeral(self, value: int) -> str:
        """Write a non-negative integer in this language's digits."""
        zero = NUMERAL_ZERO[self.spec.numerals]
        return "".join(chr(zero + int(d)) for d in str(value))

    def translate_clause(self, words: list[str]) -> list[str]:
        """Map the words of one clause and apply the word order; numbers change digit system."""
        mapped = [self.numeral(int(w)) if _NUMBER.match(w) else self.word_map.get(w, w) for w in words]
        if self.spec.word_order == "sov" and len(mapped) > 2:
            mapped = [mapped[0], *mapped[2:], mapped[1]]
        elif self.spec.word_order == "reversed":
            mapped = mapped[::-1]
        return mapped

    def translate(self, text: str) -> str:
        """Translate English text clause by clause; punctuation tokens end clauses and stay as they are."""
        out: list[str] = []
        clause: list[str] = []
        for token in text.split():
            if token in PUNCTUATION or token in CLAUSE_WORDS:
                out.extend(self.translate_clause(clause))
                out.append(self.word_map.get(token, token))
                clause = []
            else:
                clause.append(token)
        out.extend(self.translate_clause(clause))
        return " ".join(out)


def english() -> SyntheticLanguage:
    return SyntheticLanguage(LanguageSpec(code="en", vocab_overlap=1.0, task_share=1.0))


def _pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def build_languages(specs: list[LanguageSpec], english_words: list[str], seed: int) -> list[SyntheticLanguage]:
    """Build English plus one language per spec; the same seed gives the same word maps."""
    for spec in specs:
        if spec.word_order not in WORD_ORDERS:
            raise ValueError(f"language {spec.code!r}: word_order {spec.word_order!r} is not one of {WORD_ORDERS}.")
        if spec.numerals not in NUMERAL_ZERO:
            raise ValueError(f"language {spec.code!r}: numerals {spec.numerals!r} is not one of {sorted(NUMERAL_ZERO)}.")
    taken = set(english_words)
    languages = [english()]
    for spec in specs:
        rng = random.Random(f"{seed}-{spec.code}")
        vocabulary = sorted(english_words)
        kept = {w for w in vocabulary if rng.random() < spec.vocab_overlap}
        replaced = [w for w in vocabulary if w not in kept]
        pseudo = _pseudo_words(rng, len(replaced), taken)
        word_map = {w: w for w in kept} | dict(zip(replaced, pseudo, strict=True))
        languages.append(SyntheticLanguage(spec, word_map))
    return languages
