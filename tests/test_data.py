"""Readers and their errors, training groups, the DP sampler, batching (training micro-batches, reranking batches)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from megarank.data import (Batcher, BeirData, BeirGroupSource, DataError, GroupSampler, GroupsFileSource,
                           PairTokenizer, Run, build_tiny_tokenizer, candidate_pairs, doc_to_text,
                           find_run_file, format_pair, read_beir, read_corpus, read_jsonl_groups, read_qrels,
                           read_queries, read_run, sample_data_dir)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOOD_LINE = json.dumps({"query": "q", "pos_doc": ["p"], "neg_doc": ["n1", "n2"]})


@pytest.fixture(scope="module")
def pair_tokenizer(tmp_path_factory):
    return PairTokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny"), max_length=64)


def rerank_batches(queries, corpus, run, top_k, batch_size, pair_tokenizer):
    """Length-sorted padded batches of a run's top_k pairs, as evaluation builds them (ids checked first)."""
    pairs = candidate_pairs(queries, corpus, run, top_k)
    return Batcher(pair_tokenizer).scoring_batches(pairs, queries, corpus, batch_size)


@pytest.fixture(scope="module")
def sample_beir():
    return read_beir(sample_data_dir(), "train")


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- template


def test_doc_to_text():
    assert doc_to_text("plain") == "plain"
    assert doc_to_text({"title": "T", "text": "body"}) == "T body"
    assert doc_to_text({"title": "", "text": "body"}) == "body"
    assert doc_to_text({"text": "body"}) == "body"
    assert doc_to_text({"title": "only title", "text": ""}) == "only title"


# ---------------------------------------------------------------- JSONL groups


def test_read_sample_groups():
    groups, skipped = read_jsonl_groups(sample_data_dir() / "train_groups.jsonl")
    assert skipped == 0 and len(groups) == 12
    assert [g["line"] for g in groups] == list(range(1, 13))
    assert all(len(g["neg"]) >= 4 and g["pos"] for g in groups)
    assert groups[0]["pos"][0].startswith("Subduction zone volcanoes At subduction zones")


BAD_LINES = [
    ('{"query": "q", ', "malformed JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"query": "q", "pos_doc": ["p"]}', "missing field 'neg_doc'"),
    ('{"pos_doc": ["p"], "neg_doc": []}', "missing field 'query'"),
    ('{"query": 5, "pos_doc": ["p"], "neg_doc": []}', "'query' must be a string, got int"),
    ('{"query": " ", "pos_doc": ["p"], "neg_doc": []}', "'query' is empty"),
    ('{"query": "q", "pos_doc": 5, "neg_doc": []}', "'pos_doc' must be a document or a list of documents, got int"),
    ('{"query": "q", "pos_doc": [], "neg_doc": ["n"]}', "'pos_doc' is empty"),
    ('{"query": "q", "pos_doc": ["p"], "neg_doc": [5]}',
     "neg_doc[0] must be a string or an object with 'text', got int"),
    ('{"query": "q", "pos_doc": [{"title": "t"}], "neg_doc": []}', "pos_doc[0] must have a string 'text'"),
    ('{"query": "q", "pos_doc": ["p", ""], "neg_doc": []}', "pos_doc[1] is empty"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_group_line_names_file_and_line(tmp_path, line, problem):
    path = write(tmp_path / "train.jsonl", [GOOD_LINE, "", line, GOOD_LINE])  # blank line 2 still counts
    with pytest.raises(DataError) as e:
        read_jsonl_groups(path)
    assert str(e.value).startswith(f"{path} line 3: ")
    assert problem in str(e.value)


def test_skip_bad_lines_counts_and_logs(tmp_path, caplog):
    path = write(tmp_path / "train.jsonl", [GOOD_LINE, "{oops", '{"query": "q"}', GOOD_LINE])
    with caplog.at_level(logging.WARNING):
        groups, skipped = read_jsonl_groups(path, skip_bad_lines=True)
    assert skipped == 2 and [g["line"] for g in groups] == [1, 4]
    assert "skipped 2 bad lines" in caplog.text and "train.jsonl line 2: malformed JSON" in caplog.text


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_groups_file_is_an_error(tmp_path, lines):
    path = write(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=r"train\.jsonl: no training groups found"):
        read_jsonl_groups(path)


def test_all_lines_bad_with_skip_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"train\.jsonl: no training groups found \(1 bad lines skipped\)"):
        read_jsonl_groups(write(tmp_path / "train.jsonl", ["nope"]), skip_bad_lines=True)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        read_jsonl_groups(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- BEIR files


def test_read_corpus_and_queries(tmp_path):
    corpus = write(tmp_path / "corpus.jsonl", ['{"_id": "1", "title": "T", "text": "x"}', '{"_id": 2, "text": "y"}'])
    assert read_corpus(corpus) == {"1": "T x", "2": "y"}
    queries = write(tmp_path / "queries.jsonl", ['{"_id": "q1", "text": "what", "metadata": {}}'])
    assert read_queries(queries) == {"q1": "what"}


@pytest.mark.parametrize("line,problem", [
    ("{bad", "corpus.jsonl line 2: malformed JSON"),
    ('{"text": "x"}', "corpus.jsonl line 2: document needs a string '_id'"),
    ('{"_id": "2", "text": 3}', "corpus.jsonl line 2: document '2' needs a string 'text'"),
    ('{"_id": "1", "text": "again"}', "corpus.jsonl line 2: duplicate document id '1'"),
])
def test_bad_corpus_line(tmp_path, line, problem):
    with pytest.raises(DataError, match=problem):
        read_corpus(write(tmp_path / "corpus.jsonl", ['{"_id": "1", "text": "x"}', line]))


def test_read_qrels_with_and_without_header_and_trec(tmp_path):
    expected = {"1": {"a": 2, "b": 0}, "2": {"c": 1}}
    header = "query-id\tcorpus-id\tscore"
    assert read_qrels(write(tmp_path / "h.tsv", [header, "1\ta\t2", "1\tb\t0", "2\tc\t1"])) == expected
    assert read_qrels(write(tmp_path / "n.tsv", ["1\ta\t2", "1\tb\t0", "2\tc\t1"])) == expected
    assert read_qrels(write(tmp_path / "trec.txt", ["1 0 a 2", "1 0 b 0", "2 0 c 1"])) == expected


@pytest.mark.parametrize("lines,problem", [
    (["1\ta\t2", "1\ta"], "q.tsv line 2: expected 3 columns"),
    (["1\ta\t2", "1\tb\thigh"], "q.tsv line 2: relevance score 'high' is not an integer"),
    (["1\ta\t2", "1\ta\t1"], r"q.tsv line 2: pair \(1, a\) is judged twice"),
])
def test_bad_qrels_line(tmp_path, lines, problem):
    with pytest.raises(DataError, match=problem):
        read_qrels(write(tmp_path / "q.tsv", lines))


def test_read_run_beir_and_trec_formats_in_rank_order(tmp_path):
    header = "query-id\tcorpus-id\trank\tscore"
    beir = write(tmp_path / "run.tsv", [header, "1\tb\t2\t5.0", "1\ta\t1\t9.0", "2\tc\t1\t1"])
    run = read_run(beir)
    assert run == {"1": ["a", "b"], "2": ["c"]} and isinstance(run, Run) and run.path == str(beir)
    trec = write(tmp_path / "run.trec", ["1 Q0 b 2 5.0 bm25", "1 Q0 a 1 9.0 bm25", "2 Q0 c 1 1 bm25"])
    assert read_run(trec) == {"1": ["a", "b"], "2": ["c"]}


@pytest.mark.parametrize("lines,problem", [
    (["1\ta\t1\t3.0", "1\ta\t2\t2.0"], "run.tsv line 2: document 'a' appears twice for query '1'"),
    (["1\ta\t1\t3.0", "1\tb\tsecond\t2.0"], "run.tsv line 2: rank 'second' is not an integer"),
    (["1\ta\t1\t3.0", "1\tb\t2\tx"], "run.tsv line 2: score 'x' is not a number"),
    (["1\ta\t1\t3.0", "1 b"], "run.tsv line 2: expected 6 columns"),
])
def test_bad_run_line(tmp_path, lines, problem):
    with pytest.raises(DataError, match=problem):
        read_run(write(tmp_path / "run.tsv", lines))


def test_read_beir_sample():
    train, test = read_beir(sample_data_dir(), "train"), read_beir(sample_data_dir(), "test")
    assert len(train.corpus) == 40 and len(train.queries) == 12
    assert len(train.qrels) == 6 and len(test.qrels) == 6 and not set(train.qrels) & set(test.qrels)
    assert train.corpus["d01"].startswith("How volcanoes form Volcanoes form")
    for split in ("train", "test"):
        run = read_run(find_run_file(sample_data_dir(), split))
        assert set(run) == set(read_beir(sample_data_dir(), split).qrels)
        assert all(len(docs) == 10 for docs in run.values())


@pytest.fixture
def beir_copy(tmp_path):
    folder = tmp_path / "beir"
    shutil.copytree(sample_data_dir(), folder)
    return folder


def test_read_beir_missing_file_names_path(beir_copy):
    with pytest.raises(DataError, match=r"beir/qrels/dev\.tsv: file not found"):
        read_beir(beir_copy, "dev")
    (beir_copy / "queries.jsonl").unlink()
    with pytest.raises(DataError, match=r"beir/queries\.jsonl: file not found"):
        read_beir(beir_copy, "train")


@pytest.mark.parametrize("row,problem", [
    ("3\td99\t1", r"qrels/train\.tsv line 2: document id 'd99' is not in corpus\.jsonl"),
    ("99\td01\t1", r"qrels/train\.tsv line 2: query id '99' is not in queries\.jsonl"),
])
def test_read_beir_unknown_ids_name_qrels_line(beir_copy, row, problem):
    write(beir_copy / "qrels" / "train.tsv", ["query-id\tcorpus-id\tscore", row])
    with pytest.raises(DataError, match=problem):
        read_beir(beir_copy, "train")


def test_find_run_file_errors(beir_copy):
    assert find_run_file(beir_copy, "test").name == "test.run.tsv"
    with pytest.raises(DataError, match=r"candidates: expected exactly one run file 'dev\.\*\.tsv'.*found none"):
        find_run_file(beir_copy, "dev")


# ---------------------------------------------------------------- groups


def jsonl_source(n_negatives=3, seed=0, **kwargs):
    groups = [{"query": f"q{i}", "pos": [f"pos{i}a", f"pos{i}b"], "neg": [f"neg{i}_{j}" for j in range(6)],
               "line": i + 1} for i in range(8)]
    return GroupsFileSource(groups, n_negatives, seed, "train.jsonl", **kwargs)


def test_jsonl_groups_are_deterministic_and_sized():
    a, b = jsonl_source(seed=1), jsonl_source(seed=1)
    assert len(a) == 8 and a.group_size == 4
    for index in range(8):
        query, passages, labels, teacher = a.get(index, 0)
        assert (query, passages) == b.get(index, 0)[:2] and labels == [1, 0, 0, 0] and teacher is None
        assert len(passages) == 4 and len(set(passages[1:])) == 3
        assert set(passages[1:]) <= {f"neg{index}_{j}" for j in range(6)}
    assert [a.get(i, 1) for i in range(8)] != [a.get(i, 0) for i in range(8)]  # resampled each epoch
    assert [jsonl_source(seed=2).get(i, 0) for i in range(8)] != [a.get(i, 0) for i in range(8)]


def test_jsonl_positive_rotates_by_epoch():
    source = jsonl_source()
    assert [source.get(3, epoch)[1][0] for epoch in range(4)] == ["pos3a", "pos3b", "pos3a", "pos3b"]


def test_jsonl_too_few_negatives_names_file_and_line():
    with pytest.raises(DataError, match=r"^train\.jsonl line 1: the group has 6 negatives but n_negatives=7"):
        jsonl_source(n_negatives=7)


def test_jsonl_fill_from_corpus_is_deterministic_and_foreign():
    source = jsonl_source(n_negatives=9, fill_from_corpus=True)
    passages = source.get(2, 0).passages
    assert len(passages) == 10 and len(set(passages)) == 10
    own = {f"neg2_{j}" for j in range(6)}
    assert set(passages[1:7]) == own
    assert not any(p.startswith(("pos2", "neg2")) for p in passages[7:])
    assert source.get(2, 0) == jsonl_source(n_negatives=9, fill_from_corpus=True).get(2, 0)


def test_beir_groups_exclude_judged_relevant(sample_beir):
    run = read_run(find_run_file(sample_data_dir(), "train"))
    source = BeirGroupSource(sample_beir, run, n_negatives=4, top_k=10, seed=3)
    assert len(source) == 6 and source.group_size == 5
    assert source.n_dropped_no_positive == 0 and source.n_dropped_no_run == 0
    for epoch in range(3):
        for index, qid in enumerate(source.qids):
            _, docids = source.get_ids(index, epoch)
            relevant = {d for d, s in sample_beir.qrels[qid].items() if s > 0}
            assert docids[0] in relevant and not relevant & set(docids[1:])
            assert set(docids[1:]) <= set(run[qid]) and len(set(docids)) == 5
            query, passages, labels, teacher = source.get(index, epoch)
            assert query == sample_beir.queries[qid] and passages == [sample_beir.corpus[d] for d in docids]
            assert labels == [float(sample_beir.qrels[qid][docids[0]]), 0, 0, 0, 0] and teacher is None


def test_beir_positive_rotation_and_determinism(sample_beir):
    run = read_run(find_run_file(sample_data_dir(), "train"))
    source = BeirGroupSource(sample_beir, run, n_negatives=4, top_k=10)
    index = source.qids.index("9")  # judged d33:2, d34:1, d39:1 -> sorted by relevance desc, then docid
    assert [source.get_ids(index, e)[1][0] for e in range(4)] == ["d33", "d34", "d39", "d33"]
    again = BeirGroupSource(sample_beir, run, n_negatives=4, top_k=10)
    assert [again.get_ids(i, 5) for i in range(6)] == [source.get_ids(i, 5) for i in range(6)]
    # query 1 judges d08 with score 0: a judged non-relevant document is a valid negative
    negatives = {d for e in range(20) for d in source.get_ids(source.qids.index("1"), e)[1][1:]}
    assert "d08" in negatives and not {"d01", "d02"} & negatives


def test_beir_drop_counts():
    beir = BeirData(corpus={"a": "A", "b": "B", "c": "C"}, queries={"1": "x", "2": "y", "3": "z"},
                    qrels={"1": {"a": 1}, "2": {"b": 0}, "3": {"c": 1}})
    source = BeirGroupSource(beir, Run({"1": ["a", "b", "c"], "2": ["b"]}, path="r.tsv"), n_negatives=2)
    assert len(source) == 1 and source.n_dropped_no_positive == 1 and source.n_dropped_no_run == 1


def test_beir_too_few_negatives_names_query_and_run(sample_beir):
    run = read_run(find_run_file(sample_data_dir(), "train"))
    with pytest.raises(DataError, match=r"train\.run\.tsv: query '1' has 2 hard negatives in its top 4"):
        BeirGroupSource(sample_beir, run, n_negatives=4, top_k=4)


def test_beir_unknown_candidate_names_run_and_id(sample_beir):
    run = Run({"1": ["d02", "nope", "d05"]}, path="cands.tsv")
    with pytest.raises(DataError, match=r"cands\.tsv: candidate document 'nope' of query '1' is not in the corpus"):
        BeirGroupSource(sample_beir, run, n_negatives=1)


# ---------------------------------------------------------------- sampler


def steps(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_dp_slices_concatenate_to_the_single_rank_batch():
    single = steps(GroupSampler(23, 6, dp_rank=0, dp_size=1, seed=7), 10)  # 3 steps per epoch: crosses epochs
    ranks = [steps(GroupSampler(23, 6, dp_rank=r, dp_size=2, seed=7), 10) for r in range(2)]
    for step in range(10):
        assert len(ranks[0][step]) == 3
        assert ranks[0][step] + ranks[1][step] == single[step]


def test_epochs_reshuffle_and_drop_the_incomplete_batch():
    batches = steps(GroupSampler(10, 4, 0, 1, seed=0), 6)  # 2 steps per epoch, 2 groups dropped each epoch
    assert [{e for _, e in b} for b in batches] == [{0}, {0}, {1}, {1}, {2}, {2}]
    epoch_orders = [[i for b in batches[2 * e : 2 * e + 2] for i, _ in b] for e in range(3)]
    assert all(len(set(order)) == 8 for order in epoch_orders)
    assert epoch_orders[0] != epoch_orders[1] != epoch_orders[2]
    assert steps(GroupSampler(10, 4, 0, 1, shuffle=False), 3) == [
        [(0, 0), (1, 0), (2, 0), (3, 0)], [(4, 0), (5, 0), (6, 0), (7, 0)], [(0, 1), (1, 1), (2, 1), (3, 1)]]


@pytest.mark.parametrize("done", [0, 1, 2, 5])
def test_resume_continues_with_exactly_the_next_batch(done):
    straight = GroupSampler(11, 4, 1, 2, seed=3)
    expected = steps(straight, done + 4)[done:]
    first = GroupSampler(11, 4, 1, 2, seed=3)
    steps(first, done)
    state = first.state_dict()
    assert set(state) == {"epoch", "step_in_epoch", "seed"}
    resumed = GroupSampler(11, 4, 1, 2, seed=3)
    resumed.load_state_dict(state)
    assert steps(resumed, 4) == expected


def test_sampler_validation():
    with pytest.raises(ValueError, match="multiple of dp_size"):
        GroupSampler(10, 5, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        GroupSampler(10, 4, 2, 2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        GroupSampler(3, 4, 0, 1)
    with pytest.raises(ValueError, match="seed 1 but this run uses seed 0"):
        GroupSampler(10, 4, 0, 1).load_state_dict({"epoch": 0, "step_in_epoch": 0, "seed": 1})


# ---------------------------------------------------------------- batching: micro-batches and rerank batches


def test_micro_batch_is_group_major_positive_first(pair_tokenizer):
    groups = [("q one", ["pos one", "neg a", "neg b"]), ("q two", ["pos two", "neg c", "neg d"])]
    (batch,) = Batcher(pair_tokenizer).micro_batches(groups, micro_batch_size=2)
    assert set(batch) == {"input_ids", "attention_mask", "group_size", "relevance"}
    assert batch["input_ids"].shape[0] == 6 and batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] % 8 == 0
    assert batch["group_size"] == 3 and batch["relevance"].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert batch["relevance"].dtype == torch.float32
    tok = pair_tokenizer.tokenizer
    for g, (query, passages) in enumerate(groups):
        for j, passage in enumerate(passages):
            row = g * 3 + j
            ids = batch["input_ids"][row][batch["attention_mask"][row]]
            assert tok.decode(ids[1:]) == format_pair(query, passage)
    packed = Batcher(pair_tokenizer, packed=True).micro_batches(groups, micro_batch_size=1)
    assert [b["input_ids"].shape[0] for b in packed] == [1, 1]
    assert [b["packed_seq_params"].num_sequences for b in packed] == [3, 3]
    assert torch.equal(packed[1]["input_ids"][0, : int(packed[1]["attention_mask"].sum())],
                       batch["input_ids"][3:][batch["attention_mask"][3:]])  # group 2's rows, end to end


def test_micro_batches_reject_unequal_groups(pair_tokenizer):
    for packed in (False, True):
        with pytest.raises(ValueError, match=r"same non-zero number of passages, got sizes \[2, 3\]"):
            Batcher(pair_tokenizer, packed=packed).micro_batches([("q", ["a", "b"]), ("q", ["a", "b", "c"])], 1)


def test_rerank_batches_cover_all_pairs_longest_first(pair_tokenizer):
    beir = read_beir(sample_data_dir(), "test")
    run = read_run(find_run_file(sample_data_dir(), "test"))
    batches = list(rerank_batches(beir.queries, beir.corpus, run, top_k=5, batch_size=4, pair_tokenizer=pair_tokenizer))
    pairs = [p for chunk, _ in batches for p in chunk]
    assert sorted(pairs) == sorted((q, d) for q, docs in run.items() for d in docs[:5]) and len(pairs) == 30
    lengths = [n for _, batch in batches for n in batch["attention_mask"].sum(1).tolist()]
    assert lengths == sorted(lengths, reverse=True)
    assert [len(chunk) for chunk, _ in batches] == [4] * 7 + [2]
    again = list(rerank_batches(beir.queries, beir.corpus, run, 5, 4, pair_tokenizer))
    assert [c for c, _ in again] == [c for c, _ in batches]


def test_rerank_batches_unknown_ids_name_run_file(pair_tokenizer):
    with pytest.raises(DataError, match=r"dev\.run: candidate document 'zz' of query '1' is not in the corpus"):
        rerank_batches({"1": "q"}, {"a": "A"}, Run({"1": ["a", "zz"]}, path="dev.run"), 10, 2, pair_tokenizer)
    with pytest.raises(DataError, match=r"dev\.run: query id '2' is not in the queries"):
        rerank_batches({"1": "q"}, {"a": "A"}, Run({"2": ["a"]}, path="dev.run"), 10, 2, pair_tokenizer)


# ---------------------------------------------------------------- real data (shared/data/cranfield)


def test_cranfield_train_groups_and_batches(pair_tokenizer):
    folder = SHARED_DATA / "cranfield"
    if not folder.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    beir = read_beir(folder, "train")
    run = read_run(folder / "candidates" / "train.bm25.top100.tsv")
    source = BeirGroupSource(beir, run, n_negatives=4, top_k=100, seed=0)
    assert len(source) == 113 and source.n_dropped_no_positive == 0 and source.n_dropped_no_run == 0
    sampler = GroupSampler(len(source), global_batch=8, dp_rank=0, dp_size=1)
    groups = [source.get(i, e) for i, e in next(sampler)]
    batch = Batcher(pair_tokenizer).micro_batches(groups, micro_batch_size=len(groups))[0]
    assert batch["input_ids"].shape[0] == 40 and batch["input_ids"].shape[1] <= 64
    for i, e in next(sampler):
        qid, docids = source.get_ids(i, e)
        assert beir.qrels[qid][docids[0]] > 0 and all(beir.qrels[qid].get(d, 0) <= 0 for d in docids[1:])
    sliced = Run({q: run[q][:10] for q in list(run)[:3]}, path=run.path)
    pairs = [p for chunk, _ in rerank_batches(beir.queries, beir.corpus, sliced, 10, 8, pair_tokenizer) for p in chunk]
    assert len(pairs) == 30


# ---------------------------------------------------------------- bad bytes, line numbers, advice


def write_bytes(path, lines: list[bytes]):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


NOT_UTF8 = b'{"_id": "d2", "text": "caf\xe9"}'  # latin-1 e-acute


@pytest.mark.parametrize("reader, good, bad", [
    (read_corpus, b'{"_id": "d1", "text": "a"}', NOT_UTF8),
    (read_queries, b'{"_id": "q1", "text": "a"}', NOT_UTF8),
    (read_qrels, b"q1\td1\t1", b"q2\td\xff\t1"),
    (read_run, b"q1\td1\t1\t2.0", b"q1\td\xff\t2\t1.0"),
    (lambda p: read_jsonl_groups(p), GOOD_LINE.encode(), b'{"query": "\xff", "pos_doc": ["p"], "neg_doc": []}'),
])
def test_non_utf8_line_is_named_with_its_byte(tmp_path, reader, good, bad):
    path = write_bytes(tmp_path / "f.txt", [good, good.replace(b"1", b"3"), bad])
    with pytest.raises(DataError, match=r"^.*f\.txt line 3: is not valid UTF-8 \(byte 0x(e9|ff) at column \d+\)"):
        reader(path)


def test_skip_bad_lines_skips_non_utf8_lines(tmp_path, caplog):
    path = write_bytes(tmp_path / "g.jsonl", [GOOD_LINE.encode(), b"\xff\xfe", b"{bad json", GOOD_LINE.encode()])
    with caplog.at_level(logging.WARNING):
        groups, skipped = read_jsonl_groups(path, skip_bad_lines=True)
    assert [g["line"] for g in groups] == [1, 4] and skipped == 2
    assert "g.jsonl line 2: is not valid UTF-8" in caplog.text and "g.jsonl line 3: malformed JSON" in caplog.text


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write_bytes(tmp_path / "c.jsonl", [b'\xef\xbb\xbf{"_id": "d1", "text": "a"}'])
    assert read_corpus(path) == {"d1": "a"}


def test_folder_given_as_a_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"corpus\.jsonl: is a folder, expected a file"):
        read_corpus((tmp_path / "corpus.jsonl").mkdir() or tmp_path / "corpus.jsonl")


def test_unknown_candidate_is_named_with_the_run_line(tmp_path, sample_beir, pair_tokenizer):
    path = write(tmp_path / "r.tsv", ["query-id\tcorpus-id\trank\tscore", "1\td02\t1\t3", "1\tnope\t2\t2",
                                      "999\td02\t1\t1"])
    with pytest.raises(DataError, match=r"r\.tsv line 3: candidate document 'nope' of query '1' is not in the corpus"):
        BeirGroupSource(sample_beir, read_run(path), n_negatives=1)
    with pytest.raises(DataError, match=r"r\.tsv line 3: candidate document 'nope' of query '1'"):
        rerank_batches(sample_beir.queries, sample_beir.corpus, read_run(path), 10, 2, pair_tokenizer)
    with pytest.raises(DataError, match=r"r\.tsv line 4: query id '999' is not in the queries"):
        rerank_batches(sample_beir.queries, sample_beir.corpus, Run({"999": ["d02"]}, path=path), 10, 2,
                       pair_tokenizer)


def test_too_few_negatives_suggests_a_depth_that_works(sample_beir):
    run = read_run(find_run_file(sample_data_dir(), "train"))
    with pytest.raises(DataError, match=r"set data\.negatives_top_k=(\d+) \(or more; it is 4\)") as e:
        BeirGroupSource(sample_beir, run, n_negatives=4, top_k=4)
    depth = int(e.value.args[0].split("negatives_top_k=")[1].split()[0])
    BeirGroupSource(sample_beir, run, n_negatives=4, top_k=depth)  # the advice works ...
    with pytest.raises(DataError):
        BeirGroupSource(sample_beir, run, n_negatives=4, top_k=depth - 1)  # ... and is the smallest that does
    with pytest.raises(DataError, match=r"lower data\.n_passages to at most \d+ or use a deeper run"):
        BeirGroupSource(sample_beir, run, n_negatives=20, top_k=100)


def test_max_length_without_room_for_the_passage_is_rejected(pair_tokenizer):
    tok = pair_tokenizer.tokenizer
    with pytest.raises(DataError, match=r"data\.max_length=16 is too short for data\.template: .* take 23 tokens"):
        PairTokenizer(tok, max_length=16)
    PairTokenizer(tok, max_length=16, template="{query} {passage}")  # a short template leaves room


def test_long_queries_no_longer_push_every_passage_out(pair_tokenizer):
    """Once, a query filling max_length cut every passage off (and only a warning said so); now the query is cut
    down to data.max_query_length and the passages keep the rest (tests/test_truncation.py has the rule)."""
    pt = PairTokenizer(pair_tokenizer.tokenizer, max_length=32)
    batch = pt(["a long query of many many bytes"] * 2, ["the passage", "another one"])
    assert batch["input_ids"][0].tolist() != batch["input_ids"][1].tolist()
    assert (pt.truncation.pairs, pt.truncation.query_cut, pt.truncation.passage_cut) == (2, 2, 2)
