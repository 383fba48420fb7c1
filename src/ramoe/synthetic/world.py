"""Build the synthetic parallel world: evaluation items, the pretraining mixture, general text.

Everything is a pure function of the config and its seed. Evaluation items are drawn without
repetition and split into train and test by item id. Pretraining task lines are drawn from the
remaining problems, so no evaluation item, train or test, appears verbatim in pretraining.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

from ramoe.synthetic import tasks
from ramoe.synthetic.language import LanguageSpec, SyntheticLanguage, build_languages

log = logging.getLogger(__name__)

BITEXT_SEPARATOR = "="


@dataclass(frozen=True)
class WorldConfig:
    """The ``data.synthetic`` section of the config, typed."""

    seed: int
    tasks: tuple[str, ...]
    items_per_task: int
    test_fraction: float
    english_task_lines: int
    english_generic_lines: int
    general_corpus_lines: int
    languages: tuple[LanguageSpec, ...]

    @classmethod
    def from_config(cls, section: Mapping) -> WorldConfig:
        return cls(
            seed=section["seed"],
            tasks=tuple(section["tasks"]),
            items_per_task=section["items_per_task"],
            test_fraction=section["test_fraction"],
            english_task_lines=section["english_task_lines"],
            english_generic_lines=section["english_generic_lines"],
            general_corpus_lines=section["general_corpus_lines"],
            languages=tuple(LanguageSpec(**spec) for spec in section["languages"]),
        )


class World:
    """English and the target languages, with the evaluation items of every task."""

    def __init__(self, config: WorldConfig):
        self.config = config
        self.languages: list[SyntheticLanguage] = build_languages(
            list(config.languages), tasks.english_vocabulary(), config.seed
        )
        self.items = {task: self._draw_items(task) for task in config.tasks}
        self.split = {task: self._split(task) for task in config.tasks}

    @property
    def lang_codes(self) -> list[str]:
        return [lang.code for lang in self.languages]

    def _draw_items(self, task: str) -> list:
        rng = random.Random(f"{self.config.seed}-items-{task}")
        seen: set[tuple] = set()
        items = []
        attempts = 0
        while len(items) < self.config.items_per_task:
            attempts += 1
            if attempts > 100 * self.config.items_per_task:
                raise ValueError(
                    f"task {task!r}: could not draw {self.config.items_per_task} distinct items; "
                    "lower data.synthetic.items_per_task."
                )
            problem = tasks.SAMPLERS[task](rng)
            if problem.key not in seen:
                seen.add(problem.key)
                items.append(problem)
        return items

    def _split(self, task: str) -> list[str]:
        n = len(self.items[task])
        order = list(range(n))
        random.Random(f"{self.config.seed}-split-{task}").shuffle(order)
        n_test = round(self.config.test_fraction * n)
        test = set(order[:n_test])
        return ["test" if i in test else "train" for i in range(n)]

    def task_rows(self, task: str) -> list[dict]:
        """Rows of the parallel schema for one task, every language, both splits."""
        rows = []
        for index, (problem, split) in enumerate(zip(self.items[task], self.split[task], strict=True)):
            for lang in self.languages:
                choices = [" " + lang.translate(c) for c in problem.choices()] if task == "cause" else []
                rows.append(
                    {
                        "item_id": f"{task}-{index:05d}",
                        "lang": lang.code,
                        "task": task,
                        "task_type": tasks.TASK_TYPES[task],
                        "split": split,
                        "prompt": lang.translate(problem.prompt()),
                        "choices": choices,
                        "answer": str(problem.answer),
                        "source": "synthetic",
                    }
                )
        return rows

    def _solved_line(self, problem) -> str:
        if isinstance(problem, tasks.ArithProblem):
            return f"{problem.prompt()} {problem.answer} ."
        return f"{problem.prompt()} {problem.choices()[problem.answer]}"

    def pretraining_lines(self) -> list[str]:
        """Draw the pretraining mixture, shuffled: task lines, generic text and bitext per language.

        English gets ``english_task_lines`` solved problems per task and ``english_generic_lines``
        generic sentences; a target language gets those counts times its ``task_share``,
        ``generic_share`` and ``bitext_share``.
        """
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-pretrain")
        held_out = {problem.key for task in cfg.tasks for problem in self.items[task]}
        lines: list[str] = []
        counts: dict[str, dict[str, int]] = {}
        for lang in self.languages:
            spec = lang.spec
            n_task = round(cfg.english_task_lines * spec.task_share)
            n_generic = round(cfg.english_generic_lines * spec.generic_share)
            n_bitext = 0 if lang.code == "en" else round(cfg.english_generic_lines * spec.bitext_share)
            for task in cfg.tasks:
                drawn = 0
                while drawn < n_task:
                    problem = tasks.SAMPLERS[task](rng)
                    if problem.key in held_out:
                        continue
                    lines.append(lang.translate(self._solved_line(problem)))
                    drawn += 1
            lines.extend(lang.translate(tasks.sample_generic(rng)) for _ in range(n_generic))
            for _ in range(n_bitext):
                sentence = tasks.sample_generic(rng)
                lines.append(f"{sentence} {BITEXT_SEPARATOR} {lang.translate(sentence)}")
            counts[lang.code] = {"task_lines_per_task": n_task, "generic_lines": n_generic, "bitext_lines": n_bitext}
        rng.shuffle(lines)
        log.info("pretraining mixture: %d lines; per language %s", len(lines), counts)
        return lines

    def general_corpus(self) -> list[str]:
        """Task-unrelated English text, the reference against which task experts are found."""
        rng = random.Random(f"{self.config.seed}-general")
        return [tasks.sample_generic(rng) for _ in range(self.config.general_corpus_lines)]

    def vocabulary(self) -> list[str]:
        """List every word and numeral token of every language, for the word-level tokenizer."""
        words = set(tasks.english_vocabulary()) | {".", "?", ":", BITEXT_SEPARATOR}
        for lang in self.languages:
            words |= set(lang.word_map.values())
            words |= {lang.numeral(n) for n in range(100)}
        return sorted(words)


def write_world(
    section: Mapping,
    *,
    tasks: list[str],
    target_languages: list[str],
    task_paths: Mapping[str, str],
    corpus_path: str,
    general_path: str,
) -> World:
    """Build the world for the selected tasks and languages and write its three artifacts.

    ``section`` is the ``data.synthetic`` config section; only the languages named in
    ``target_languages`` enter the world, in that order.
    """
    from ramoe.data.schema import write_parallel
    from ramoe.io import write_text_atomic

    specs = {spec["code"]: spec for spec in section["languages"]}
    selected = dict(section, tasks=tasks, languages=[specs[code] for code in target_languages])
    world = World(WorldConfig.from_config(selected))
    for task in tasks:
        write_parallel(world.task_rows(task), task_paths[task], name=f"synthetic task {task!r}",
                       provenance={"seed": section["seed"], "source": "synthetic"})
    write_text_atomic(corpus_path, "\n".join(world.pretraining_lines()) + "\n")
    write_text_atomic(general_path, "\n".join(world.general_corpus()) + "\n")
    return world
