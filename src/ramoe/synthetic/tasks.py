"""English templates of the synthetic tasks and of the task-unrelated general text.

``arith`` is generative with a numeric answer (like MGSM): one-step word problems with operands
0-20, whose answer is a single number token. ``cause`` is two-way multiple choice (like XCOPA):
pick the plausible effect of a state, or the plausible cause of a reaction. Every function
returns English; ``language.SyntheticLanguage.translate`` derives the parallel versions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = "tom anna ben mia sam lily max eva leo zoe".split()
OBJECTS = "apples books coins cards eggs pens cups shells stamps toys".split()
PLACES = "park school market river house garden".split()
ADJECTIVES = "big small red blue old new".split()
MAX_OPERAND = 20

# Operation name -> (English sentence template of the change, sign of the change).
ARITH_OPERATIONS = {
    "buy": ("{name} buys {b} more {obj}", +1),
    "receive": ("{other} gives {name} {b} {obj}", +1),
    "sell": ("{name} sells {b} {obj}", -1),
    "lose": ("{name} loses {b} {obj}", -1),
}

# State -> reaction pairs; every phrase has two words so that the choices of an item have equal length.
CAUSE_PAIRS = [
    ("is hungry", "eats bread"),
    ("is thirsty", "drinks water"),
    ("is tired", "goes sleep"),
    ("is cold", "wears coat"),
    ("is sick", "sees doctor"),
    ("is dirty", "takes bath"),
    ("is late", "runs fast"),
    ("is happy", "sings song"),
    ("is sad", "sheds tears"),
    ("is bored", "reads book"),
    ("is hot", "opens window"),
    ("is lost", "asks way"),
    ("is lonely", "calls friend"),
    ("is scared", "hides away"),
    ("is sleepy", "drinks coffee"),
    ("is wet", "finds towel"),
]
CONNECTIVES = {"effect": "so", "cause": "because"}

GENERIC_TEMPLATES = [
    "{name} likes the {adj} {place} .",
    "{name} and {other} walk to the {place} .",
    "the {obj} are in the {adj} {place} .",
    "{name} sees a {adj} dog near the {place} .",
    "{other} paints the {place} {adj} .",
    "{name} is {n} years old .",
    "the {place} opens at {n} .",
    "{name} reads about the {place} with {other} .",
]

ANSWER_CUE = "answer"
QUESTION_TEMPLATE = "how many {obj} does {name} have ?"


@dataclass(frozen=True)
class ArithProblem:
    name: str
    other: str
    obj: str
    operation: str
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + ARITH_OPERATIONS[self.operation][1] * self.b

    @property
    def key(self) -> tuple:
        return ("arith", self.name, self.other, self.obj, self.operation, self.a, self.b)

    def prompt(self) -> str:
        change = ARITH_OPERATIONS[self.operation][0].format(name=self.name, other=self.other, b=self.b, obj=self.obj)
        question = QUESTION_TEMPLATE.format(obj=self.obj, name=self.name)
        return f"{self.name} has {self.a} {self.obj} . {change} . {question} {ANSWER_CUE} :"


@dataclass(frozen=True)
class CauseProblem:
    name: str
    pair: int
    distractor: int
    question: str  # "effect": choose the reaction to a state; "cause": choose the state behind a reaction
    correct_first: bool

    @property
    def key(self) -> tuple:
        return ("cause", self.name, self.pair, self.distractor, self.question, self.correct_first)

    def prompt(self) -> str:
        state, reaction = CAUSE_PAIRS[self.pair]
        given = state if self.question == "effect" else reaction
        return f"{self.name} {given} . {CONNECTIVES[self.question]}"

    def choices(self) -> list[str]:
        side = 1 if self.question == "effect" else 0
        correct = f"{self.name} {CAUSE_PAIRS[self.pair][side]} ."
        wrong = f"{self.name} {CAUSE_PAIRS[self.distractor][side]} ."
        return [correct, wrong] if self.correct_first else [wrong, correct]

    @property
    def answer(self) -> int:
        return 0 if self.correct_first else 1


def sample_arith(rng: random.Random) -> ArithProblem:
    name, other = rng.sample(NAMES, 2)
    operation = rng.choice(sorted(ARITH_OPERATIONS))
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, MAX_OPERAND)
    if ARITH_OPERATIONS[operation][1] < 0 and b > a:
        a, b = b, a  # keep answers non-negative
    return ArithProblem(name, other, rng.choice(OBJECTS), operation, a, b)


def sample_cause(rng: random.Random) -> CauseProblem:
    pair, distractor = rng.sample(range(len(CAUSE_PAIRS)), 2)
    return CauseProblem(rng.choice(NAMES), pair, distractor, rng.choice(("effect", "cause")), rng.random() < 0.5)


def sample_generic(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    return rng.choice(GENERIC_TEMPLATES).format(
        name=name,
        other=other,
        obj=rng.choice(OBJECTS),
        place=rng.choice(PLACES),
        adj=rng.choice(ADJECTIVES),
        n=rng.randint(0, 99),
    )


SAMPLERS = {"arith": sample_arith, "cause": sample_cause}
TASK_TYPES = {"arith": "generative", "cause": "multiple_choice"}


def english_vocabulary() -> list[str]:
    """List every English word the templates can produce, numbers excluded."""
    words = set(NAMES + OBJECTS + PLACES + ADJECTIVES)
    words |= {ANSWER_CUE, *CONNECTIVES.values()}
    for template, _ in ARITH_OPERATIONS.values():
        words |= {w for w in template.split() if not w.startswith("{")}
    words |= {w for w in QUESTION_TEMPLATE.split() if not w.startswith("{")}
    words |= {"has"}
    for state, reaction in CAUSE_PAIRS:
        words |= set(state.split()) | set(reaction.split())
    for template in GENERIC_TEMPLATES:
        words |= {w for w in template.split() if not w.startswith("{")}
    return sorted(words - {".", "?", ":"})
