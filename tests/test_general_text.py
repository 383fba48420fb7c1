"""General English text for the task-expert contrast: plain text, JSON lines and SQuAD files."""

import json

import pytest

from ramoe.routing.run import read_general_text


def test_plain_text_deduplicated(tmp_path):
    path = tmp_path / "general.txt"
    path.write_text("the park is big .\n\nthe park is big .\nanna reads .\n")
    assert read_general_text(path) == ["the park is big .", "anna reads ."]


def test_json_lines(tmp_path):
    path = tmp_path / "general.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c  d"]) + "\n")
    assert read_general_text(path) == ["a b", "c d"]


def test_squad_contexts(shared_data):
    passages = read_general_text(shared_data / "xquad" / "xquad.en.json", max_passages=5)
    assert len(passages) == 5
    assert all(len(p) > 100 for p in passages)


def test_squad_all_paragraphs(shared_data):
    assert len(read_general_text(shared_data / "xquad" / "xquad.en.json")) == 240


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="routing.general_text.path"):
        read_general_text(tmp_path / "absent.txt")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="contains no passages"):
        read_general_text(path)
