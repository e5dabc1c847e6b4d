"""docs/data.md: every example file on the page is read by the reader that megarank uses for it."""
import re
from pathlib import Path

import pytest

from megarank.data import (JsonlGroupSource, iter_run_rows, read_beir, read_jsonl_groups, read_qrels, read_run,
                           read_scored_run)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "data.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs-data")
    found = EXAMPLE.findall(PAGE.read_text())
    assert len(found) == 11, [name for name, _ in found]
    for name, text in found:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_jsonl_groups_with_and_without_teacher_scores(examples):
    groups, skipped = read_jsonl_groups(examples / "groups.jsonl")
    assert skipped == 0 and [len(g["pos"]) for g in groups] == [1, 2]
    assert groups[0]["pos"] == ["How volcanoes form Magma rises through the crust and erupts."]
    assert groups[1]["pos_labels"] == [2.0, 1.0]
    JsonlGroupSource(groups, n_negatives=4).get(1, 0)  # data.n_passages=5, the default
    teacher, _ = read_jsonl_groups(examples / "groups-with-teacher.jsonl")
    assert JsonlGroupSource(teacher, n_negatives=4, with_teacher=True).get(0, 0).teacher[0] == 7.5
    mined, _ = read_jsonl_groups(examples / "mined.jsonl")
    assert mined[0]["pos_scores"] == [7.5] and mined[0]["pos_labels"] == [2.0]


def test_the_beir_folder_with_either_qrels_layout(examples):
    beir = read_beir(examples, "test")
    assert beir.qrels == {"q1": {"d01": 2, "d03": 0}, "q2": {"d02": 1}}
    assert beir.corpus["d01"].startswith("How volcanoes form Magma") and beir.corpus["d02"].startswith("Honeybees")
    assert read_qrels(examples / "qrels" / "trec.tsv") == beir.qrels


def test_the_three_run_layouts_and_a_scored_run(examples):
    runs = [read_run(examples / name) for name in ("run.trec", "candidates/test.run.tsv", "run.msmarco.tsv")]
    assert runs[0] == runs[1] == runs[2] == {"q1": ["d01", "d03"], "q2": ["d02"]}
    assert [row[4] for row in iter_run_rows(examples / "run.msmarco.tsv")] == [None, None, None]
    assert read_scored_run(examples / "teacher.trec")["q1"] == {"d01": 7.5, "d03": -2.25}
