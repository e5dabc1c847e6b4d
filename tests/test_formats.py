"""The training groups files users bring (megarank/data/formats): each reader's groups checked against the file
it read, each format's bad input named by file, line / row / record and field, the NeMo AutoModel group rules
(first positive, negatives in order, repeated when too few), and one tiny training run per format."""
import json
import logging
import sys
import typing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megarank.cli.preflight import train_path_problem
from megarank.config import GROUP_FILE_FORMATS, ConfigError, DataConfig, load_config, validate
from megarank.data import GROUP_FORMATS, DataError, GroupsFileSource, read_groups
from megarank.data.formats import check_prompts
from megarank.data.formats.nemo_corpus import train_split_files
from tests.training_harness import TINY, run

datasets = pytest.importorskip("datasets")  # the `test` extra (setup.py): real save_to_disk folders

# Four groups: a query, two positives, four negatives, the teacher's score of each.
GROUPS = [{"query": f"query {i}", "pos": [f"positive {i}.{k}" for k in range(2)],
           "neg": [f"negative {i}.{k}" for k in range(4)],
           "pos_scores": [5.0 + i, 4.0], "neg_scores": [-1.0, -2.0, -3.0, float(-i)]} for i in range(4)]


def _texts(group: dict) -> tuple:
    return group["query"], group["pos"], group["neg"]


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_flag_jsonl(path):
    return _lines(path, [{"query": g["query"], "pos": g["pos"], "neg": g["neg"], "pos_scores": g["pos_scores"],
                          "neg_scores": g["neg_scores"]} for g in GROUPS])


def write_triples(path):
    """Every (positive, negative) pair of a query on its own line, queries interleaved."""
    rows = [(g["query"], p, n) for k in range(2) for g in GROUPS for p in g["pos"][k:k + 1] for n in g["neg"]]
    return _lines(path, ["\t".join(r) for r in rows])


def write_parquet(folder):
    """Two Parquet files (2 groups each) whose columns have other names than megarank's, plus the mapping."""
    folder.mkdir()
    for part in range(2):
        rows = GROUPS[2 * part: 2 * part + 2]
        pq.write_table(pa.table({
            "question": [g["query"] for g in rows],
            "positives": [g["pos"] for g in rows],
            "negatives": [[{"title": "", "text": t} for t in g["neg"]] for g in rows],
            "teacher_pos": [g["pos_scores"] for g in rows], "teacher_neg": [g["neg_scores"] for g in rows],
        }), folder / f"part-{part}.parquet")
    return folder, {"query": "question", "pos_doc": "positives", "neg_doc": "negatives",
                    "pos_scores": "teacher_pos", "neg_scores": "teacher_neg"}


def write_hf_disk(folder):
    """A DatasetDict (train: the groups, test: one other) as ``save_to_disk`` writes it."""
    columns = {"query": [g["query"] for g in GROUPS], "pos_doc": [g["pos"] for g in GROUPS],
               "neg_doc": [g["neg"] for g in GROUPS], "pos_scores": [g["pos_scores"] for g in GROUPS],
               "neg_scores": [g["neg_scores"] for g in GROUPS]}
    test = {k: v[:1] for k, v in columns.items()}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns),
                          "test": datasets.Dataset.from_dict(test)}).save_to_disk(str(folder))
    return folder


def write_nemo_corpus(folder):
    """train.json + wiki/ (merlin_metadata.json, data/train-00000-of-00001.parquet, data/test-...parquet)."""
    corpus = folder / "wiki"
    (corpus / "data").mkdir(parents=True)
    (corpus / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "wiki"}))
    texts = [t for g in GROUPS for t in g["pos"] + g["neg"]]
    ids = {t: f"d{n}" for n, t in enumerate(texts)}
    pq.write_table(pa.table({"id": list(ids.values()), "text": texts}),
                   corpus / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"id": ["t0"], "text": ["a test-split document"]}),
                   corpus / "data" / "test-00000-of-00001.parquet")
    data = [{"question_id": f"q{i}", "question": g["query"], "corpus_id": "wiki",
             "pos_doc": [{"id": ids[t]} for t in g["pos"]], "neg_doc": [ids[t] for t in g["neg"]]}
            for i, g in enumerate(GROUPS)]
    (folder / "train.json").write_text(json.dumps({"corpus": [{"path": "wiki"}], "data": data}))
    return folder / "train.json", ids


def test_the_config_names_every_reader():
    assert GROUP_FILE_FORMATS == GROUP_FORMATS
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["format"])) == {"beir", *GROUP_FORMATS}


# ----------------------------------------------------------------------------------------------- JSONL


def test_flagembedding_jsonl_reads_pos_neg_and_teacher_scores(tmp_path):
    groups, skipped = read_groups("jsonl", write_flag_jsonl(tmp_path / "flag.jsonl"))
    assert skipped == 0 and [_texts(g) for g in groups] == [_texts(g) for g in GROUPS]
    assert [(g["pos_scores"], g["neg_scores"]) for g in groups] == [(g["pos_scores"], g["neg_scores"]) for g in GROUPS]
    group = GroupsFileSource(groups, 4, with_teacher=True).get(2, 1)
    assert group.passages[0] == "positive 2.1" and group.teacher[0] == 4.0  # epoch 1: the second positive


def test_nemo_inline_jsonl_takes_question_and_single_documents(tmp_path):
    path = _lines(tmp_path / "nemo.jsonl", [{"question": "q", "pos_doc": "p", "neg_doc": {"title": "T", "text": "n"}},
                                            {"query": "r", "pos_doc": ["p2"], "neg_doc": ["n2", "n3"]}])
    groups, _ = read_groups("jsonl", path)
    assert [_texts(g) for g in groups] == [("q", ["p"], ["T n"]), ("r", ["p2"], ["n2", "n3"])]


def test_nemo_automodel_inline_jsonl_gives_the_same_groups(tmp_path, monkeypatch):
    """NeMo AutoModel's own inline loader on the same JSONL (``question``, a lone positive, ``{"text"}`` documents,
    too few negatives, two positives cycled): the same queries and passages, epoch by epoch."""
    nemo = pytest.importorskip("nemo_automodel.components.datasets.llm.retrieval_dataset")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = _lines(tmp_path / "inline.jsonl", [
        {"question": "q0", "pos_doc": "p0", "neg_doc": ["a", "b", "c", "d"]},
        {"query": "q1", "pos_doc": [{"text": "p1"}, "p1b"], "neg_doc": [{"text": "e"}, "f"]},
        {"query": "q2", "pos_doc": ["p2"], "neg_doc": "g"}])
    theirs = nemo.make_retrieval_dataset(data_dir_list=[str(path)], model_type="bi_encoder", data_type="train",
                                         n_passages=4, cycle_positive_docs=True)
    groups, _ = read_groups("jsonl", path)
    ours = GroupsFileSource(groups, 3, sample_negatives=False, repeat_negatives=True)
    for epoch in range(2):
        theirs.set_epoch(epoch)
        assert [(theirs[i]["question"], theirs[i]["doc_text"]) for i in range(3)] == \
            [ours.get(i, epoch)[:2] for i in range(3)]


@pytest.mark.parametrize("rows, message", [
    ([{"query": "q", "pos": ["p"], "neg_doc": ["n"]}],
     r"flag\.jsonl line 1: mixes the field spellings \('neg_doc' and 'pos'\)"),
    ([{"query": "q", "pos": ["p"], "neg": ["n"]}, {"query": "r", "pos_doc": ["p"], "neg_doc": ["n"]}],
     r"flag\.jsonl line 2: uses NeMo AutoModel's 'pos_doc'/'neg_doc' but line 1 uses FlagEmbedding's 'pos'/'neg'"),
    ([{"query": "q", "pos": [], "neg": ["n"]}], r"flag\.jsonl line 1: 'pos' is empty"),
    ([{"query": "q", "pos": ["p"], "neg": "n"}], r"flag\.jsonl line 1: 'neg' must be a list, got str"),
    ([{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": 3}], r"flag\.jsonl line 1: 'prompt' must be a string"),
    ([{"query": "q", "question": "q", "pos_doc": ["p"], "neg_doc": []}], r"line 1: has both 'query' and 'question'"),
])
def test_jsonl_bad_lines_name_line_and_field(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        read_groups("jsonl", _lines(tmp_path / "flag.jsonl", rows))


def test_skip_bad_lines_skips_a_line_in_the_other_spelling(tmp_path, caplog):
    path = _lines(tmp_path / "flag.jsonl", [{"query": "q", "pos": ["p"], "neg": ["n"]},
                                            {"query": "r", "pos_doc": ["p"], "neg_doc": ["n"]},
                                            {"query": "s", "pos": ["p"], "neg": ["n"]}])
    with caplog.at_level(logging.WARNING):
        groups, skipped = read_groups("jsonl", path, skip_bad=True)
    assert skipped == 1 and [g["query"] for g in groups] == ["q", "s"] and "skipped 1 bad lines" in caplog.text


def test_a_flagembedding_prompt_must_be_in_the_template(tmp_path):
    prompt = "Does the passage answer the query?"
    path = _lines(tmp_path / "flag.jsonl", [{"query": "q", "pos": ["p"], "neg": ["n"], "prompt": prompt}])
    groups, _ = read_groups("jsonl", path)
    check_prompts(groups, "A: {query}\nB: {passage}\n" + prompt)
    with pytest.raises(DataError, match=r"flag\.jsonl line 1: 'prompt' 'Does the passage.*' is not in data\.template"):
        check_prompts(groups, "question:{query} \n \n passage:{passage}")


# ----------------------------------------------------------------------------------------------- TSV triples


def test_triples_group_by_query_in_order_of_first_appearance(tmp_path):
    groups, skipped = read_groups("triples", write_triples(tmp_path / "triples.tsv"))
    assert skipped == 0 and [_texts(g) for g in groups] == [_texts(g) for g in GROUPS]
    assert [g["line"] for g in groups] == [1, 5, 9, 13]  # each query's first line


@pytest.mark.parametrize("line, message", [
    ("q\tp", r"t\.tsv line 2: expected 3 tab-separated columns \(query, positive, negative\), got 2"),
    ("q\t \tn", r"t\.tsv line 2: the positive is empty"),
    ("q\tn\tx", r"t\.tsv line 2: the positive text is also a negative of this query \(line 1\)"),
])
def test_triples_bad_lines_name_line_and_field(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        read_groups("triples", _lines(tmp_path / "t.tsv", ["q\tp\tn", line]))
    groups, skipped = read_groups("triples", _lines(tmp_path / "t.tsv", ["q\tp\tn", line]), skip_bad=True)
    assert skipped == 1 and [_texts(g) for g in groups] == [("q", ["p"], ["n"])]


# ----------------------------------------------------------------------------------------------- Arrow


def test_parquet_folder_with_mapped_columns_is_read_by_index(tmp_path):
    folder, columns = write_parquet(tmp_path / "pq")
    groups, skipped = read_groups("parquet", folder, columns=columns)
    assert skipped == 0 and len(groups) == 4 and list(groups.rows) == [0, 1, 2, 3]
    assert [_texts(groups[i]) for i in range(4)] == [_texts(g) for g in GROUPS]
    assert groups[3]["neg_scores"] == GROUPS[3]["neg_scores"] and groups[3]["at"] == f"{folder}/part-1.parquet row 1"


def test_hf_disk_reads_the_split_memory_mapped(tmp_path):
    folder = write_hf_disk(tmp_path / "ds")
    groups, _ = read_groups("hf_disk", folder, split="train")
    assert [_texts(groups[i]) for i in range(4)] == [_texts(g) for g in GROUPS]
    assert len(read_groups("hf_disk", folder, split="test")[0]) == 1
    # a selection (an indices mapping in memory) saved in two shards: the rows as the dataset shows them
    picked = datasets.load_from_disk(str(folder / "train")).select([3, 0, 2])
    picked.save_to_disk(str(tmp_path / "picked"), num_shards=2)
    groups, _ = read_groups("hf_disk", tmp_path / "picked")
    assert [groups[i]["query"] for i in range(3)] == ["query 3", "query 0", "query 2"]
    with pytest.raises(DataError, match=r"ds: the DatasetDict has no split 'dev' \(data\.train_split\); its splits "
                                        r"are train, test"):
        read_groups("hf_disk", folder, split="dev")


def test_hf_disk_rows_stay_in_the_memory_mapped_file(tmp_path):
    n = 20000  # ~4 MB of text: a copy into Arrow memory would show in the pool's allocations
    big = datasets.Dataset.from_dict({"query": [f"query {i:06d} " * 4 for i in range(n)],
                                      "pos_doc": [[f"positive {i:06d} " * 6] for i in range(n)],
                                      "neg_doc": [[f"negative {i:06d} " * 6] for i in range(n)]})
    big.save_to_disk(tmp_path / "big")
    before = pa.total_allocated_bytes()
    groups, _ = read_groups("hf_disk", tmp_path / "big")
    assert pa.total_allocated_bytes() - before < 256 * 1024
    assert len(groups) == n and groups[n - 1]["neg"] == [f"negative {n - 1:06d} " * 6]


def _table(**columns):
    base = {"query": ["q0", "q1", "q2"], "pos_doc": [["p"], ["p"], ["p"]], "neg_doc": [["n"], ["n"], ["n"]]}
    return pa.table({**base, **columns})


@pytest.mark.parametrize("table, columns, message", [
    (pa.table({"query": ["q"], "pos_doc": [["p"]]}), {},
     r"t\.parquet: has no column 'neg_doc' \(data\.columns\.neg_doc\); its columns are query, pos_doc"),
    (_table(), {"pos_scores": "teacher"}, r"has no column 'teacher' \(data\.columns\.pos_scores\)"),
    (_table(query=[1, 2, 3]), {}, r"t\.parquet: column 'query' \(data\.columns\.query\) is int64, expected a string"),
    (_table(pos_doc=[[1], [2], [3]]), {},
     r"column 'pos_doc' \(data\.columns\.pos_doc\) is list<\w+: int64>, expected a list of strings"),
    (_table(pos_doc=[["p"], [], ["p"]]), {}, r"t\.parquet row 1: 'pos_doc' is empty"),
    (_table(query=["q0", None, "q2"]), {}, r"t\.parquet row 1: 'query' must be a string, got null"),
    (_table(neg_doc=[["n"], ["n", ""], ["n"]]), {}, r"t\.parquet row 1: neg_doc\[1\] is empty"),
])
def test_parquet_bad_input_names_file_row_and_column(tmp_path, table, columns, message):
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(DataError, match=message):
        read_groups("parquet", tmp_path / "t.parquet", columns=columns)


def test_skip_bad_rows_keeps_the_index_of_the_good_ones(tmp_path, caplog):
    pq.write_table(_table(pos_doc=[["p"], [], ["p2"]]), tmp_path / "t.parquet")
    with caplog.at_level(logging.WARNING):
        groups, skipped = read_groups("parquet", tmp_path / "t.parquet", skip_bad=True)
    assert skipped == 1 and list(groups.rows) == [0, 2] and groups[1]["pos"] == ["p2"]
    assert "skipped 1 bad rows" in caplog.text and "t.parquet row 1: 'pos_doc' is empty" in caplog.text


# ----------------------------------------------------------------------------------------------- NeMo corpus ids


def test_nemo_corpus_ids_resolve_through_the_corpus_train_split(tmp_path):
    path, _ = write_nemo_corpus(tmp_path)
    groups, skipped = read_groups("nemo_corpus", path)
    assert skipped == 0 and [_texts(groups[i]) for i in range(4)] == [_texts(g) for g in GROUPS]
    # the split the files are assigned to is the one datasets.load_dataset(folder) calls train
    train = datasets.load_dataset(str(tmp_path / "wiki"), cache_dir=str(tmp_path / "cache"))["train"]
    assert [p.name for p in train_split_files(tmp_path / "wiki")] == ["train-00000-of-00001.parquet"]
    assert sorted(train["id"]) == sorted(groups.corpora["wiki"].rows)


def _nemo_file(tmp_path, record: dict, corpus_class="TextQADataset"):
    path, ids = write_nemo_corpus(tmp_path)
    (tmp_path / "wiki" / "merlin_metadata.json").write_text(json.dumps({"class": corpus_class, "corpus_id": "wiki"}))
    top = json.loads(path.read_text())
    top["data"][1] = {**top["data"][1], **record}
    path.write_text(json.dumps(top))
    return path


@pytest.mark.parametrize("cycle", [False, True])
def test_nemo_automodel_builds_the_same_groups_from_the_same_files(tmp_path, monkeypatch, cycle):
    """NeMo AutoModel's own loader (nemo-automodel, installed by .ci/run) on the same train.json: every group of
    epochs 0-2 holds the same query and passages, in order, as megarank with NeMo's rules; one record has fewer
    negatives than the group needs (repeated), one has three positives (cycled over three epochs)."""
    nemo = pytest.importorskip("nemo_automodel.components.datasets.llm.retrieval_dataset")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path, ids = write_nemo_corpus(tmp_path)
    top = json.loads(path.read_text())
    top["data"][1]["neg_doc"] = top["data"][1]["neg_doc"][:2]
    top["data"][2]["pos_doc"].append({"id": ids[GROUPS[0]["neg"][3]]})
    path.write_text(json.dumps(top))
    theirs = nemo.make_retrieval_dataset(data_dir_list=[str(path)], model_type="bi_encoder", data_type="train",
                                         n_passages=6, cycle_positive_docs=cycle)
    groups, _ = read_groups("nemo_corpus", path)
    ours = GroupsFileSource(groups, 5, rotate_positives=cycle, sample_negatives=False, repeat_negatives=True)
    for epoch in range(3):
        if cycle:
            theirs.set_epoch(epoch)
        for i in range(4):
            row = theirs[i]
            assert (row["question"], row["doc_text"]) == ours.get(i, epoch)[:2], (epoch, i)


@pytest.mark.parametrize("record, message", [
    ({"neg_doc": ["d0", {"id": "d999"}]}, r"train\.json data\[1\]: neg_doc\[1\] id 'd999' is not in corpus 'wiki' "),
    ({"pos_doc": []}, r"train\.json data\[1\]: 'pos_doc' is empty"),
    ({"pos_doc": [["d0"]]}, r"train\.json data\[1\]: pos_doc\[0\] must be an id"),
    ({"corpus_id": "news"}, r"train\.json data\[1\]: corpus_id 'news' is not one of the file's corpora \(wiki\)"),
    ({"question": ""}, r"train\.json data\[1\]: 'question' is empty"),
])
def test_nemo_corpus_bad_records_name_record_and_field(tmp_path, record, message):
    path = _nemo_file(tmp_path, record)
    with pytest.raises(DataError, match=message):
        read_groups("nemo_corpus", path)
    groups, skipped = read_groups("nemo_corpus", path, skip_bad=True)
    assert skipped == 1 and [groups[i]["query"] for i in range(3)] == ["query 0", "query 2", "query 3"]


def test_nemo_corpus_folder_problems(tmp_path):
    path = _nemo_file(tmp_path, {}, corpus_class="ColPaliDataset")
    with pytest.raises(DataError, match=r"merlin_metadata\.json: class 'ColPaliDataset' is not TextQADataset"):
        read_groups("nemo_corpus", path)
    (tmp_path / "wiki" / "merlin_metadata.json").unlink()
    with pytest.raises(DataError, match=r"wiki: has no merlin_metadata\.json"):
        read_groups("nemo_corpus", path)
    path.write_text(json.dumps({"data": []}))
    with pytest.raises(DataError, match=r"train\.json: expected one JSON object with 'corpus' and a 'data' list"):
        read_groups("nemo_corpus", path)


@pytest.mark.parametrize("text", [
    '{"corpus": [{"path": "w"}], "data": [{"a": 1}, {"b": [2, "x"]}]}',
    ' \n{ "data" :[ {"a": 1} ,\n{"b": "\\u00e9\\ud800"} ] , "corpus": {"path": "w"}, "x": null }\n ',
    '{"data": [], "corpus": []}', '{"data": [1, "s", [], {}]}', '{}', '{"data": {"a": 1}}',
    '{"data": [{"a": 1}], "data": [{"b": 2}]}', '{"data": [{"a": 1}], "data": 3}', '[{"data": []}]', '"data"',
    '{"data": [NaN, -Infinity]}',
    # not JSON: json.loads's error, with its position
    '{"data": [{"a": 1} {"b": 2}]}', '{"data": [{"a": 1},]}', '{"data": [{"a": 1}]} x', '{"data": [{"a": "x}]}',
    '{"data": [{"a": 1}], }', '{"data" [1]}', "{'data': []}", '{"data": [1]', '', '{"data": [{"a": 1}]}}',
])
def test_the_corpus_id_file_is_read_as_json_loads_reads_it(text):
    """The 'data' list is decoded one record at a time (`_decode_top`): the same values as json.loads, and for a
    document that is not JSON the same error at the same place."""
    from megarank.data.formats.nemo_corpus import _decode_top, _Records

    try:
        expected = json.loads(text)
    except json.JSONDecodeError as e:
        with pytest.raises(json.JSONDecodeError) as got:
            _decode_top(text)
        assert str(got.value) == str(e)
        return
    got = _decode_top(text)
    if isinstance(expected, dict) and isinstance(expected.get("data"), list):
        assert isinstance(got["data"], _Records)  # streamed, not decoded whole
        got["data"] = list(got["data"])
    assert json.dumps(got) == json.dumps(expected)  # NaN != NaN: compared as text


def _two_file_corpus(tmp_path, first: pa.Table, second: list[dict]):
    """train.json over wiki/ whose train split is a Parquet file then a JSON Lines file (rows counted across both)."""
    path, _ = write_nemo_corpus(tmp_path)
    pq.write_table(first, tmp_path / "wiki" / "data" / "train-00000-of-00001.parquet")
    (tmp_path / "wiki" / "data" / "train-00001-of-00001.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in second))
    return path


@pytest.mark.parametrize("first, second, message", [
    (pa.table({"id": [f"d{k}" for k in range(5)], "text": list("abcde")}), [{"id": "x", "text": "x"},
     {"id": "d1", "text": "again"}], r"wiki: document id 'd1' appears twice in the train split \(rows 1 and 6\)"),
    (pa.table({"id": [f"d{k}" for k in range(5)], "text": ["a", "b", "c", None, "e"]}), [],
     r"wiki: row 3 of the train split has a null 'id' or 'text'"),
    (pa.table({"id": ["d0", "d1", "d1", None], "text": list("abcd")}), [],  # both in one read: the first bad row
     r"wiki: document id 'd1' appears twice in the train split \(rows 1 and 2\)"),
    (pa.table({"id": ["d0", "d1", None, "d1"], "text": list("abcd")}), [],
     r"wiki: row 2 of the train split has a null 'id' or 'text'"),
    (pa.table({"id": [0.5, 1.5], "text": ["a", "b"]}), [], r"train-00000-of-00001\.parquet: column 'id' is double"),
    (pa.table({"id": ["d0"], "text": [3]}), [], r"train-00000-of-00001\.parquet: column 'text' is int64, expected"),
    (pa.table({"id": ["d0"]}), [], r"train-00000-of-00001\.parquet: has no column 'text'"),
])
def test_nemo_corpus_rows_are_checked_in_row_order_across_files_and_read_batches(tmp_path, monkeypatch, first,
                                                                                  second, message):
    """The corpus is read two rows at a time (the reader streams it): a duplicate id names both rows of the whole
    split, the first bad row is the one reported, eagerly and through the index."""
    from megarank.data.formats import nemo_corpus, open_groups

    monkeypatch.setattr(nemo_corpus, "_READ_ROWS", 2)
    path = _two_file_corpus(tmp_path, first, second)
    for read in (read_groups, open_groups):
        with pytest.raises(DataError, match=message):
            read("nemo_corpus", path)


def test_nemo_corpus_streamed_into_small_batches_gives_the_files_groups(tmp_path, monkeypatch):
    """Read 5 rows at a time, copied in batches of at most 3, one folder named twice (read once), integer ids in the
    JSON Lines file: the indexed groups are the eager ones, and the file's texts."""
    from megarank.data.formats import arrow, nemo_corpus, open_groups

    monkeypatch.setattr(nemo_corpus, "_READ_ROWS", 5)
    monkeypatch.setattr(arrow, "COPY_BATCH_ROWS", 3)
    monkeypatch.setattr(nemo_corpus, "COPY_BATCH_ROWS", 3)  # the index header's record of it
    texts = [t for g in GROUPS for t in g["pos"] + g["neg"]]
    path = _two_file_corpus(tmp_path, pa.table({"id": [f"d{k}" for k in range(7)], "text": texts[:7]}),
                            [{"id": k, "text": t} for k, t in enumerate(texts[7:], start=7)])
    top = json.loads(path.read_text())
    top["corpus"] = [{"path": "wiki"}, {"path": "./wiki"}]
    def jsonl_id(doc, k):  # rows 7.. are in the JSON Lines file, under integer ids: named as 7 or "7"
        doc = doc["id"] if isinstance(doc, dict) else doc
        return doc if int(doc[1:]) < 7 else int(doc[1:]) if k % 2 else doc[1:]

    for n, record in enumerate(top["data"]):
        record["pos_doc"] = [{"id": 10}] if n == 2 else [jsonl_id(d, k) for k, d in enumerate(record["pos_doc"])]
        record["neg_doc"] = [jsonl_id(d, k) for k, d in enumerate(record["neg_doc"])]
    path.write_text(json.dumps(top))
    eager, lazy = read_groups("nemo_corpus", path)[0], open_groups("nemo_corpus", path)[0]
    expected = [_texts(g) for g in GROUPS]
    expected[2] = (expected[2][0], [texts[10]], expected[2][2])
    assert [_texts(eager[i]) for i in range(4)] == [_texts(lazy[i]) for i in range(4)] == expected
    # 7 Parquet rows read as 5 + 2, 17 JSON Lines rows as 5 + 5 + 5 + 2, each read copied as 3 + 2 (or 2)
    assert [lazy.reader.get_batch(k).num_rows for k in range(lazy.reader.num_record_batches)] == \
        [3, 2, 2, 3, 2, 3, 2, 3, 2, 2]


# ----------------------------------------------------------------------------------------------- group rules


def _source(**kwargs):
    groups = [{"query": "q", "pos": ["p0", "p1"], "neg": ["n0", "n1"], "pos_scores": [9.0, 8.0],
               "neg_scores": [0.0, 1.0], "at": "g.json data[0]"}]
    return GroupsFileSource(groups, 4, seed=3, **kwargs)


def test_nemo_automodel_rules_first_positive_negatives_in_order_repeated():
    nemo = _source(rotate_positives=False, sample_negatives=False, repeat_negatives=True, with_teacher=True)
    for epoch in range(3):  # retrieval_dataset.py _transform_func: negatives[idx % len] for idx in range(n)
        group = nemo.get(0, epoch)
        assert group.passages == ["p0", "n0", "n1", "n0", "n1"] and group.teacher == [9.0, 0.0, 1.0, 0.0, 1.0]
    sampled = _source(repeat_negatives=True)  # megarank's rotation, a shuffled order repeated
    firsts = [sampled.get(0, e).passages for e in range(4)]
    assert [p[0] for p in firsts] == ["p0", "p1", "p0", "p1"]
    assert all(p[1:3] == p[3:5] and sorted(p[1:3]) == ["n0", "n1"] for p in firsts)
    with pytest.raises(DataError, match=r"g\.json data\[0\]: the group has 2 negatives but n_negatives=4 are needed "
                                        r"\(or set data\.repeat_negatives=true\)"):
        _source()


def test_group_rule_keys_are_checked_against_the_format():
    with pytest.raises(ConfigError, match=r"data\.repeat_negatives applies to groups files"):
        validate(load_config(TINY, ["data.repeat_negatives=true"]))
    with pytest.raises(ConfigError, match=r"data\.columns maps Parquet / datasets columns; data\.format=jsonl"):
        validate(load_config(TINY, ["data.format=jsonl", "data.train_path=g.jsonl", "data.columns.query=q"]))
    with pytest.raises(ConfigError, match=r"data\.train_path must name the training groups when data\.format=parquet"):
        validate(load_config(TINY, ["data.format=parquet"]))


def test_a_resume_compares_the_columns_and_the_group_rules():
    from megarank.checkpoint.manager import training_changes

    saved = load_config(TINY, ["data.format=parquet", "data.train_path=t.parquet"])
    now = load_config(TINY, ["data.format=parquet", "data.train_path=t.parquet", "data.columns.query=q",
                             "data.repeat_negatives=true"])
    assert [key for key, _, _ in training_changes(saved, now)] == ["data.repeat_negatives", "data.columns"]


def test_preflight_checks_the_kind_of_path(tmp_path):
    folder = write_hf_disk(tmp_path / "ds")
    assert train_path_problem("hf_disk", folder, "train") is None
    assert train_path_problem("hf_disk", folder, "dev") == "is a DatasetDict without the split 'dev' (data.train_split)"
    assert train_path_problem("hf_disk", tmp_path, "train") == "has no state.json or dataset_dict.json"
    assert train_path_problem("parquet", tmp_path / "ds", "train") == "holds no .parquet file"
    assert train_path_problem("nemo_corpus", tmp_path, "train") == "is a folder, expected a file"


# ----------------------------------------------------------------------------------------------- training

TRAIN_ALL = '''
import json, sys
import megarank.training.loop as loop
from megarank.config import load_config
from megarank.data import DataError

runs, bad_runs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, overrides in runs.items():
    metrics = loop.train(load_config(sys.argv[3], overrides))
    print("RESULT", json.dumps({"format": name, "loss": float(metrics["loss"])}), flush=True)


def no_model(*args, **kwargs):
    raise AssertionError("the model was built before the bad input was found")


loop.build_model = no_model
for name, overrides in bad_runs.items():
    try:
        loop.train(load_config(sys.argv[3], overrides))
    except DataError as e:
        print("REFUSED", json.dumps({"format": name, "error": str(e)}), flush=True)
'''


def _bad_inputs(tmp_path) -> dict:
    """One bad file per format (the format's overrides, the error's expected words)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    flag = write_flag_jsonl(bad / "flag.jsonl")  # and a fifth line in NeMo AutoModel's spelling
    flag.write_text(flag.read_text() + json.dumps({"query": "q", "pos_doc": ["p"], "neg_doc": ["n"] * 4}) + "\n")
    triples = _lines(bad / "t.tsv", ["q\tp\tn"] * 4 + ["q\tp"])
    pq.write_table(_table(pos_doc=[["p"], [], ["p"]], neg_doc=[["n"] * 4] * 3), bad / "t.parquet")
    datasets.Dataset.from_dict({"query": ["q"] * 4, "pos_doc": [["p"]] * 4, "neg_doc": [["n"] * 4] * 3 + [["n"]]}
                               ).save_to_disk(str(bad / "ds"))
    nemo = _nemo_file(bad, {"neg_doc": ["d0", "d1", "d999"]})
    return {
        "jsonl": (["data.format=jsonl", f"data.train_path={flag}"],
                  f"{flag} line 5: uses NeMo AutoModel's 'pos_doc'/'neg_doc' but line 1 uses FlagEmbedding's"),
        "triples": (["data.format=triples", f"data.train_path={triples}"], f"{triples} line 5: expected 3"),
        "parquet": (["data.format=parquet", f"data.train_path={bad / 't.parquet'}"],
                    f"{bad / 't.parquet'} row 1: 'pos_doc' is empty"),
        "hf_disk": (["data.format=hf_disk", f"data.train_path={bad / 'ds'}"],
                    f"{bad / 'ds'} row 3: the group has 1 negatives but n_negatives=4 are needed"),
        "nemo_corpus": (["data.format=nemo_corpus", f"data.train_path={nemo}"],
                        f"{nemo} data[1]: neg_doc[2] id 'd999' is not in corpus 'wiki'"),
    }


def test_each_format_trains_and_bad_input_stops_before_the_model(tmp_path):
    """Two steps of the tiny model from every format, with teacher scores (train.loss=kl) wherever the format
    carries them; then a bad file of each format, refused with a DataError naming it before the model is built.
    One process: the imports are paid once."""
    folder, columns = write_parquet(tmp_path / "pq")
    nemo, _ = write_nemo_corpus(tmp_path / "nemo")
    common = ["train.steps=2", "train.log_interval=1", "checkpoint.dir=null", "logging.level=WARNING"]
    runs = {
        "jsonl": ["data.format=jsonl", f"data.train_path={write_flag_jsonl(tmp_path / 'flag.jsonl')}", "train.loss=kl"],
        "triples": ["data.format=triples", f"data.train_path={write_triples(tmp_path / 'triples.tsv')}"],
        "parquet": ["data.format=parquet", f"data.train_path={folder}", "train.loss=kl",
                    *[f"data.columns.{k}={v}" for k, v in columns.items()]],
        "hf_disk": ["data.format=hf_disk", f"data.train_path={write_hf_disk(tmp_path / 'ds')}", "train.loss=kl"],
        "nemo_corpus": ["data.format=nemo_corpus", f"data.train_path={nemo}", "data.rotate_positives=false",
                        "data.sample_negatives=false", "data.repeat_negatives=true", "data.n_passages=7"],
    }
    bad = _bad_inputs(tmp_path)
    (tmp_path / "train_all.py").write_text(TRAIN_ALL)
    out = run([sys.executable, "train_all.py", json.dumps({k: v + common for k, v in runs.items()}),
               json.dumps({k: v + common for k, (v, _) in bad.items()}), TINY], cwd=tmp_path).stdout
    results = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert [r["format"] for r in results] == list(runs), out[-3000:]
    assert all(0.0 < r["loss"] < 10.0 for r in results), results
    refused = {r["format"]: r["error"] for r in (json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                                                   if line.startswith("REFUSED "))}
    assert list(refused) == list(bad), out[-3000:]
    for name, (_, words) in bad.items():
        assert refused[name].startswith(words), (name, refused[name])
