"""docs/data.md: every example file on the page is read by the reader that megarank uses for it."""
import dataclasses
import re
import runpy
from pathlib import Path

import pytest

from megarank.config import load_config, validate
from megarank.data import (DEFAULT_TEMPLATE, GroupsFileSource, iter_run_rows, read_beir, read_groups,
                           read_jsonl_groups, read_qrels, read_run, read_scored_run)
from megarank.data.formats import check_prompts

PAGE = Path(__file__).resolve().parents[1] / "docs" / "data.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```[a-z]*\n(.*?)```", re.S)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("docs-data")
    found = EXAMPLE.findall(PAGE.read_text())
    assert len(found) == 22, [name for name, _ in found]
    for name, text in found:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_jsonl_groups_with_and_without_teacher_scores(examples):
    groups, skipped = read_jsonl_groups(examples / "groups.jsonl")
    assert skipped == 0 and [len(g["pos"]) for g in groups] == [1, 2]
    assert groups[0]["pos"] == ["How volcanoes form Magma rises through the crust and erupts."]
    assert groups[1]["pos_labels"] == [2.0, 1.0]
    GroupsFileSource(groups, n_negatives=4).get(1, 0)  # data.n_passages=5, the default
    teacher, _ = read_jsonl_groups(examples / "groups-with-teacher.jsonl")
    assert GroupsFileSource(teacher, n_negatives=4, with_teacher=True).get(0, 0).teacher[0] == 7.5
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


def test_flagembedding_jsonl_and_its_prompt_in_the_template(examples):
    groups, _ = read_groups("jsonl", examples / "flag.jsonl")
    assert groups[0]["pos"] == ["Magma rises through the crust and erupts."] and groups[0]["neg_scores"][3] == 0.2
    cfg = load_config(str(examples / "flag.yaml"))
    assert cfg.data.template.startswith(DEFAULT_TEMPLATE)  # the YAML's "\n" are newlines, as in the default
    check_prompts(groups, cfg.data.template)
    with pytest.raises(Exception, match=r"flag\.jsonl line 1: 'prompt' .* is not in data\.template"):
        check_prompts(groups, DEFAULT_TEMPLATE)


def test_nemo_corpus_ids_resolve_through_the_corpus_folder(examples):
    groups, _ = read_groups("nemo_corpus", examples / "nemo" / "train.json")
    assert [groups[i]["query"] for i in range(2)] == ["how do volcanoes form", "why do honeybees dance"]
    assert groups[0]["pos"] == ["Magma rises through the crust and erupts at the surface."]
    assert groups[0]["neg"][1:] == ["Jazz grew out of blues and ragtime.", "Aqueducts carried water to Roman cities."]
    assert groups[1]["neg"][2] == "Aqueducts carried water to Roman cities."  # "4" and 4 are one id


def test_parquet_with_a_column_mapping(examples, monkeypatch):
    monkeypatch.chdir(examples)
    runpy.run_path(str(examples / "make_parquet.py"))
    cfg = load_config(str(examples / "parquet.yaml"))
    validate(cfg)
    groups, _ = read_groups("parquet", examples / cfg.data.train_path, columns=dataclasses.asdict(cfg.data.columns))
    assert [(groups[i]["query"], groups[i]["pos"], len(groups[i]["neg"])) for i in range(2)] == [
        ("how do volcanoes form", ["Magma rises through the crust."], 2),
        ("why do honeybees dance", ["Honeybees dance to tell the hive where food is."], 1)]


def test_a_datasets_folder_with_teacher_scores(examples, monkeypatch):
    pytest.importorskip("datasets")  # the `test` extra
    monkeypatch.chdir(examples)
    runpy.run_path(str(examples / "make_hf_disk.py"))
    cfg = load_config(str(examples / "hf_disk.yaml"))
    validate(cfg)
    groups, _ = read_groups("hf_disk", examples / cfg.data.train_path, split=cfg.data.train_split)
    source = GroupsFileSource(groups, n_negatives=1, with_teacher=True)
    assert source.get(1, 0).teacher == [6.0, 0.2] and groups[0]["neg"] == ["Jazz grew out of blues.",
                                                                         "Aqueducts carried water."]


def test_triples_grouped_by_query(examples):
    groups, _ = read_groups("triples", examples / "triples.tsv")
    assert [(g["query"], len(g["pos"]), len(g["neg"])) for g in groups] == [("how do volcanoes form", 2, 3),
                                                                           ("why do honeybees dance", 1, 1)]


def test_a_blend_of_the_jsonl_groups_and_the_triples(examples, monkeypatch):
    from megarank.training.data import make_group_source

    monkeypatch.chdir(examples)
    cfg = load_config(str(examples / "blend.yaml"), ["train.global_batch_size=2", "train.micro_batch_size=1"])
    validate(cfg)
    blend = make_group_source(cfg)
    assert blend.names == ["groups.jsonl", "triples.tsv"] and blend.lengths == [2, 2] and list(blend.counts) == [3, 1]
    queries = {blend.get(i, e).query for i in range(4) for e in range(4)}
    assert queries == {"how do volcanoes form", "why do honeybees dance", "web search: how do volcanoes form",
                       "web search: why do honeybees dance"}
