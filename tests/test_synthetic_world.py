"""Synthetic world: deterministic from its seed, parallel across languages, split by item id."""

from collections import Counter, defaultdict

import pytest

from ramoe.config import validate_config
from ramoe.data.schema import check_parallel, read_parallel
from ramoe.synthetic.language import LanguageSpec, build_languages
from ramoe.synthetic.tasks import ArithProblem, CauseProblem
from ramoe.synthetic.world import World, WorldConfig, write_world


def make_world(tiny_config, **overrides) -> World:
    section = dict(validate_config(tiny_config)["data"]["synthetic"], tasks=["arith", "cause"], **overrides)
    return World(WorldConfig.from_config(section))


def test_same_seed_same_world(tiny_config):
    first, second = make_world(tiny_config), make_world(tiny_config)
    for task in ("arith", "cause"):
        assert first.task_rows(task) == second.task_rows(task)
    assert first.pretraining_lines() == second.pretraining_lines()
    assert first.general_corpus() == second.general_corpus()


def test_other_seed_other_world(tiny_config):
    first, second = make_world(tiny_config), make_world(tiny_config, seed=7)
    assert first.task_rows("arith") != second.task_rows("arith")


def test_rows_parallel_and_split_by_id(tiny_config):
    world = make_world(tiny_config)
    for task in ("arith", "cause"):
        rows = world.task_rows(task)
        check_parallel(rows, name=task)
        splits = defaultdict(set)
        answers = defaultdict(set)
        for row in rows:
            splits[row["item_id"]].add(row["split"])
            answers[row["item_id"]].add(row["answer"])
        assert all(len(s) == 1 for s in splits.values())
        assert all(len(a) == 1 for a in answers.values())
        counts = Counter(next(iter(s)) for s in splits.values())
        assert counts["test"] == round(0.33 * 24)
        assert counts["train"] == 24 - round(0.33 * 24)


def test_eval_items_absent_from_pretraining(tiny_config):
    world = make_world(tiny_config)
    english = world.languages[0]
    lines = set(world.pretraining_lines())
    for problem in world.items["arith"]:
        assert english.translate(f"{problem.prompt()} {problem.answer} .") not in lines


def test_arith_prompt_and_answer():
    problem = ArithProblem("tom", "mia", "apples", "sell", 9, 4)
    assert problem.prompt() == (
        "tom has 9 apples . tom sells 4 apples . how many apples does tom have ? answer :"
    )
    assert problem.answer == 5


def test_cause_prompt_and_choices():
    problem = CauseProblem("mia", pair=0, distractor=1, question="effect", correct_first=False)
    assert problem.prompt() == "mia is hungry . so"
    assert problem.choices() == ["mia drinks water .", "mia eats bread ."]
    assert problem.answer == 1


def test_word_order_and_numerals():
    words = ["tom", "has", "apples", "so"]
    sov, rev, bengali = build_languages(
        [
            LanguageSpec("xs", vocab_overlap=1.0, word_order="sov"),
            LanguageSpec("xr", vocab_overlap=1.0, word_order="reversed"),
            LanguageSpec("xn", vocab_overlap=1.0, numerals="bengali"),
        ],
        words,
        seed=0,
    )[1:]
    assert sov.translate("tom has 12 apples .") == "tom 12 apples has ."
    assert rev.translate("tom has 12 apples .") == "apples 12 has tom ."
    assert bengali.translate("tom has 12 apples .") == "tom has \u09e7\u09e8 apples ."


def test_disjoint_vocabulary():
    words = ["tom", "has", "apples"]
    english, target = build_languages([LanguageSpec("xz", vocab_overlap=0.0)], words, seed=3)
    mapped = [target.word_map[w] for w in words]
    assert set(mapped).isdisjoint(words)
    assert len(set(mapped)) == len(words)


def test_prompt_plus_choice_equals_line():
    """A choice translated alone continues its prompt exactly as the whole translated line does."""
    (_, target) = build_languages([LanguageSpec("xr", word_order="reversed")], ["mia", "is", "hungry", "so", "eats", "bread"], 0)
    whole = target.translate("mia is hungry . so mia eats bread .")
    assert whole == target.translate("mia is hungry . so") + " " + target.translate("mia eats bread .")


def test_unknown_word_order_rejected():
    with pytest.raises(ValueError, match="word_order 'vso'"):
        build_languages([LanguageSpec("xq", word_order="vso")], ["tom"], 0)


def test_write_world_files(tiny_config, tmp_path):
    config = validate_config(tiny_config)
    paths = {t: tmp_path / f"{t}.parquet" for t in ("arith", "cause")}
    write_world(
        config["data"]["synthetic"],
        tasks=["arith", "cause"],
        target_languages=["xa", "xd"],
        task_paths=paths,
        corpus_path=tmp_path / "corpus.txt",
        general_path=tmp_path / "general.txt",
    )
    table = read_parallel(paths["cause"])
    assert sorted(set(table["lang"].to_pylist())) == ["en", "xa", "xd"]
    assert table.num_rows == 3 * 24
    assert all(len(c) == 2 for c in table["choices"].to_pylist())
    assert len((tmp_path / "general.txt").read_text().splitlines()) == 50
