"""Groups files read through an on-disk index (megarank/data/formats/index.py, indexed.py, arrow.open_parquet_groups)
and the batch prefetcher (megarank/training/prefetch.py): the same groups and errors as the eager readers, the
index built once, reused, rebuilt when the file changes or the index is damaged, and the same batches with the
worker as without it."""
import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megarank.data import DataError, GroupSampler, GroupsFileSource, read_groups
from megarank.data.formats import check_prompts, open_groups
from megarank.data.formats.index import index_path

INDEX_LOG = "megarank.data.formats.index"


def _group(i, spelling="nemo", n_neg=3, **extra):
    pos, neg = ("pos_doc", "neg_doc") if spelling == "nemo" else ("pos", "neg")
    docs = [f"neg {i}.{k}" if k % 2 else {"title": f"t{i}", "text": f"neg {i}.{k}"} for k in range(n_neg)]
    return json.dumps({"query": f"query {i}", pos: [f"pos {i}", f"pos {i} b"][: 1 + i % 2],
                       neg: docs if spelling == "nemo" else [f"neg {i}.{k}" for k in range(n_neg)], **extra})


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(tmp_path, n=12, bad=True, name="g.jsonl"):
    lines = [_group(i, pos_scores=[1.0] * (1 + i % 2), neg_scores=[0.5, 0.25, 0.0]) for i in range(n)]
    if bad:
        lines[3:3] = ["{oops", "", '{"query": "q", "pos_doc": []}']
    return _write(tmp_path / name, lines)


def _flag(tmp_path):
    lines = [_group(i, "flag", prompt="Answer?" if i % 3 else "Other?") for i in range(7)]
    lines[2:2] = [_group(99, "nemo")]  # the other spelling: a bad line
    return _write(tmp_path / "flag.jsonl", lines)


def _triples(tmp_path):
    rows = ["q1\tp1\tn1", "q2\tp2\tn2", "q1\tp3\tn1", "q1\tp1\tn4", "bad line", "q2\tn2\tx", "q3\ta\ta", "q3\tb\ta",
            "q3\ta\tc", "q4\t \tn", "q2\tp2\tn5"]
    return _write(tmp_path / "t.tsv", rows)


def _parquet(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part, rows in enumerate((range(0, 7), range(7, 12))):
        pq.write_table(pa.table({
            "question": [f"q{i}" for i in rows],
            "positive": [[f"p{i}"] for i in rows],
            "negative": [[f"n{i}", ""] if i == 4 else [f"n{i}", f"m{i}"] for i in rows],
            "pos_scores": [[1.0] for _ in rows], "neg_scores": [[0.0, 0.1] for _ in rows],
        }), folder / f"part-{part}.parquet", row_group_size=3)
    return folder


def _hf_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = range(12)
    train = Dataset.from_dict({"query": [f"q{i}" for i in rows], "pos_doc": [[f"p{i}"] for i in rows],
                               "neg_doc": [[f"n{i}", ""] if i == 9 else [f"n{i}", f"m{i}"] for i in rows]})
    DatasetDict({"train": train, "test": train.select(range(2))}).save_to_disk(tmp_path / "ds", num_shards={
        "train": 3, "test": 1})
    return tmp_path / "ds"


def _nemo(tmp_path, bad=True):
    """A NeMo AutoModel corpus-id file over two corpora (Parquet in row groups of 3, and JSON Lines with integer
    ids), with two bad records (an id absent from its corpus, an empty pos_doc)."""
    corpora = {"wiki": [(f"w{k}", f"wiki text {k} é") for k in range(40)],
               "news": [(k, f"news text {k}") for k in range(25)]}
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "wiki"}))
    pq.write_table(pa.table({"id": [i for i, _ in corpora["wiki"]], "text": [t for _, t in corpora["wiki"]]}),
                   tmp_path / "wiki" / "train.parquet", row_group_size=3)
    (tmp_path / "news" / "data").mkdir(parents=True)
    (tmp_path / "news" / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "news"}))
    _write(tmp_path / "news" / "data" / "train.jsonl", [json.dumps({"id": i, "text": t}) for i, t in corpora["news"]])
    data = []
    for i in range(14):
        corpus, ids = ("wiki", [f"w{k}" for k in range(40)]) if i % 2 else ("news", list(range(25)))
        data.append({"question_id": f"q{i}", "question": f"question {i}" + (" \ud800 é" if i == 5 else ""),
                     "corpus_id": corpus,
                     "pos_doc": [{"id": ids[(3 * i) % len(ids)]}] + ([ids[(3 * i + 1) % len(ids)]] if i % 3 else []),
                     "neg_doc": [ids[(5 * i + k) % len(ids)] for k in range(i % 4 + 1)]})
    if bad:
        data[4]["neg_doc"].append({"id": "missing"})
        data[9]["pos_doc"] = []
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"corpus": [{"path": "wiki"}, {"path": "news"}], "data": data}))
    return path


COLUMNS = {"query": "question", "pos_doc": "positive", "neg_doc": "negative"}
FILES = {"jsonl": (_jsonl, "jsonl", {}), "flag": (_flag, "jsonl", {}), "triples": (_triples, "triples", {}),
         "parquet": (_parquet, "parquet", COLUMNS), "hf_disk": (_hf_disk, "hf_disk", {}),
         "nemo_corpus": (_nemo, "nemo_corpus", {})}


@pytest.mark.parametrize("kind", FILES)
def test_indexed_groups_are_the_eager_readers_groups(tmp_path, kind, caplog):
    make, fmt, columns = FILES[kind]
    path = make(tmp_path)
    eager, eager_skipped = read_groups(fmt, path, columns=columns, skip_bad=True)
    for build in (True, False):  # built, then reused
        with caplog.at_level(logging.INFO):
            caplog.clear()
            lazy, skipped = open_groups(fmt, path, columns=columns, skip_bad=True)
        assert ("indexing" in caplog.text) == build
        assert skipped == eager_skipped > 0 and f"skipped {skipped} bad" in caplog.text  # logged on reuse too
        assert len(lazy) == len(eager) and [lazy[i] for i in range(len(lazy))] == list(eager)
        assert lazy[-1] == eager[-1]
        with pytest.raises(IndexError):
            lazy[len(lazy)]


@pytest.mark.parametrize("kind", FILES)
def test_bad_records_are_the_eager_readers_errors(tmp_path, kind):
    make, fmt, columns = FILES[kind]
    path = make(tmp_path)
    with pytest.raises(DataError) as eager:
        read_groups(fmt, path, columns=columns)
    for _ in range(2):  # the builder's error, then the same sentence from the index it recorded
        with pytest.raises(DataError) as lazy:
            open_groups(fmt, path, columns=columns)
        assert str(lazy.value) == str(eager.value)


def test_no_good_line_is_the_eager_readers_error(tmp_path):
    path = _write(tmp_path / "g.jsonl", ["nope", ""])
    with pytest.raises(DataError, match=r"g\.jsonl: no training groups found \(1 bad lines skipped\)"):
        open_groups("jsonl", path, skip_bad=True)


def test_a_changed_file_is_indexed_again(tmp_path, caplog):
    path = _jsonl(tmp_path, n=6, bad=False)
    assert len(open_groups("jsonl", path)[0]) == 6
    with open(path, "a") as f:
        f.write(_group(6) + "\n")
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        groups, _ = open_groups("jsonl", path)
    assert len(groups) == 7 and groups[6]["query"] == "query 6"
    assert f"{path} changed since (size" in caplog.text
    caplog.clear()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer: rebuilt too
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        open_groups("jsonl", path)
    assert "changed since (modification time" in caplog.text


def test_a_fixed_file_replaces_the_recorded_error(tmp_path):
    path = _jsonl(tmp_path, n=6, bad=True)
    with pytest.raises(DataError, match="line 4: malformed JSON"):
        open_groups("jsonl", path)
    _jsonl(tmp_path, n=6, bad=False)
    assert len(open_groups("jsonl", path)[0]) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_corrupt_index_is_rebuilt(tmp_path, caplog, damage):
    path = _jsonl(tmp_path, n=6, bad=False)
    eager, _ = read_groups("jsonl", path)
    open_groups("jsonl", path)
    index = index_path(path)
    data = bytearray(index.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip":
        data[-64] ^= 0x01  # the first byte of the last array (arrays start at 64-byte boundaries)
    else:
        data = b"not an index"
    index.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        groups, _ = open_groups("jsonl", path)
    assert "indexing" in caplog.text and list(groups) == eager


def test_a_missing_parquet_arrow_copy_is_rebuilt(tmp_path, caplog):
    folder = _parquet(tmp_path)
    eager, _ = read_groups("parquet", folder, columns=COLUMNS, skip_bad=True)
    open_groups("parquet", folder, columns=COLUMNS, skip_bad=True)
    os.unlink(f"{index_path(folder)}.arrow")
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        groups, _ = open_groups("parquet", folder, columns=COLUMNS, skip_bad=True)
    assert "Arrow copy" in caplog.text and list(groups) == list(eager)


def test_source_checks_indexed_nemo_corpus_groups_from_their_counts(tmp_path):
    path = _nemo(tmp_path)
    eager, lazy = read_groups("nemo_corpus", path, skip_bad=True)[0], open_groups("nemo_corpus", path, skip_bad=True)[0]
    with pytest.raises(DataError) as a:
        GroupsFileSource(eager, 3)
    with pytest.raises(DataError) as b:
        GroupsFileSource(lazy, 3)
    assert str(a.value) == str(b.value) and "train.json data[0]: the group has 1 negatives" in str(a.value)
    a, b = (GroupsFileSource(groups, 3, seed=5, repeat_negatives=True) for groups in (eager, lazy))
    assert len(eager) == len(lazy) == 12
    assert [a.get(i, e) for i in range(12) for e in range(3)] == [b.get(i, e) for i in range(12) for e in range(3)]


def test_a_changed_nemo_corpus_is_indexed_again(tmp_path, caplog):
    """The corpus folders are named inside the JSON: the index records their files and is rebuilt when one changes,
    also when it had recorded an error that the corpus fix repairs."""
    path = _nemo(tmp_path, bad=False)
    groups, _ = open_groups("nemo_corpus", path)
    assert groups[0]["pos"] == ["news text 0"] and groups[1]["pos"] == ["wiki text 3 é", "wiki text 4 é"]
    (tmp_path / "news" / "notes.txt").write_text("not read by the reader")
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        open_groups("nemo_corpus", path)
    assert "indexing" not in caplog.text  # a file the reader does not look at changes nothing
    corpus = tmp_path / "news" / "data" / "train.jsonl"
    corpus.write_text(corpus.read_text().replace("news text 0", "news text zero"))
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        groups, _ = open_groups("nemo_corpus", path)
    assert f"corpus folder {tmp_path / 'news'} changed since ({corpus})" in caplog.text
    assert groups[0]["pos"] == ["news text zero"] == read_groups("nemo_corpus", path)[0][0]["pos"]
    top = json.loads(path.read_text())
    top["data"][2]["neg_doc"].append(99)
    path.write_text(json.dumps(top))
    for _ in range(2):  # the error, then the same sentence from the index that recorded it
        with pytest.raises(DataError, match=r"train\.json data\[2\]: neg_doc\[3\] id '99' is not in corpus 'news'"):
            open_groups("nemo_corpus", path)
    _write(corpus, [json.dumps({"id": i, "text": f"news text {i}"}) for i in range(100)])  # the corpus is fixed
    with caplog.at_level(logging.INFO, logger=INDEX_LOG):
        caplog.clear()
        groups, _ = open_groups("nemo_corpus", path)
    assert "changed since" in caplog.text and groups[2]["neg"][-1] == "news text 99"


def test_a_file_changed_under_a_running_reader_is_one_sentence(tmp_path):
    path = _jsonl(tmp_path, n=6, bad=False)
    groups, _ = open_groups("jsonl", path)
    with open(path, "a") as f:
        f.write(_group(6) + "\n")
    with pytest.raises(DataError) as e:
        groups[0]
    assert str(e.value).startswith(f"{path}: changed while training read it through its index {index_path(path)}")


def test_index_dir_from_the_environment(tmp_path, monkeypatch):
    path = _jsonl(tmp_path, n=6, bad=False)
    monkeypatch.setenv("MEGARANK_INDEX_DIR", str(tmp_path / "cache"))
    open_groups("jsonl", path)
    assert index_path(path).parent == tmp_path / "cache" and index_path(path).is_file()
    assert not (tmp_path / "g.jsonl.megarank-index").exists()


def test_an_index_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch):
    import megarank.data.formats.index as index_module

    path = _jsonl(tmp_path, n=6, bad=False)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(index_module.tempfile, "mkstemp", full_disk)
    with pytest.raises(DataError) as e:
        open_groups("jsonl", path)
    assert str(e.value) == (f"{path}: cannot write its index {index_path(path)} (No space left on device); free "
                            "space there or set MEGARANK_INDEX_DIR to a writable folder")


def test_two_processes_build_one_index(tmp_path):
    path = _write(tmp_path / "big.jsonl", [_group(i) for i in range(20000)])
    script = textwrap.dedent(f"""
        import logging, sys
        from megarank.data.formats import open_groups
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        groups, _ = open_groups("jsonl", {str(path)!r})
        print("groups", len(groups), groups[19999]["query"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("indexing" in out for out in outs) == 1, outs
    assert all("groups 20000 query 19999" in out for out in outs)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_source_checks_indexed_groups_from_their_counts(tmp_path):
    path = _jsonl(tmp_path, n=12, bad=False)
    eager, _ = read_groups("jsonl", path)
    lazy, _ = open_groups("jsonl", path)
    for kwargs in ({"n_negatives": 4}, {"n_negatives": 4, "positives_per_group": 2}):
        with pytest.raises(DataError) as a:
            GroupsFileSource(eager, **kwargs)
        with pytest.raises(DataError) as b:
            GroupsFileSource(lazy, **kwargs)
        assert str(a.value) == str(b.value) and "line 1: the group has 3 negatives" in str(a.value)
    a, b = GroupsFileSource(eager, 3, seed=5, with_teacher=True), GroupsFileSource(lazy, 3, seed=5, with_teacher=True)
    assert [a.get(i, e) for i in range(12) for e in range(3)] == [b.get(i, e) for i in range(12) for e in range(3)]
    no_teacher = _write(tmp_path / "n.jsonl", [_group(0, pos_scores=[1.0], neg_scores=[0.0] * 3), _group(1)])
    with pytest.raises(DataError, match=r"n\.jsonl line 2: has no 'pos_scores'"):
        GroupsFileSource(open_groups("jsonl", no_teacher)[0], 3, with_teacher=True)


def test_prompts_of_an_indexed_file_are_checked_as_before(tmp_path):
    path = _write(tmp_path / "flag.jsonl", [_group(i, "flag", prompt=p) for i, p in enumerate(["A?", "A?", "B?"])])
    eager, lazy = read_groups("jsonl", path)[0], open_groups("jsonl", path)[0]
    check_prompts(lazy, "{query} {passage} A? B?")
    with pytest.raises(DataError) as a:
        check_prompts(eager, "{query} {passage} A?")
    with pytest.raises(DataError) as b:
        check_prompts(lazy, "{query} {passage} A?")
    assert str(a.value) == str(b.value) and "flag.jsonl line 3: 'prompt'" in str(a.value)


# ---- the prefetcher ----------------------------------------------------------------------------------------------

def _prefetch_setup(tmp_path, n=40):
    from megarank.data import Batcher, PairTokenizer, build_tiny_tokenizer

    source = GroupsFileSource(open_groups("jsonl", _jsonl(tmp_path, n=n, bad=False))[0], 3, seed=3)
    batcher = Batcher(PairTokenizer(build_tiny_tokenizer(tmp_path / "tok"), max_length=64), packed=True)
    return source, lambda groups: batcher.micro_batches(groups, micro_batch_size=2)


def _same(a, b):
    import torch

    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


@pytest.mark.parametrize("resume_at", [0, 7])
def test_prefetched_batches_are_the_synchronous_ones(tmp_path, resume_at):
    from megarank.training.prefetch import BatchPrefetcher

    source, micro_batches = _prefetch_setup(tmp_path)
    steps = 12  # over three epochs of 5 steps (40 groups / global batch 8)

    def sampler():
        s = GroupSampler(len(source), 8, dp_rank=1, dp_size=2, seed=3)
        if resume_at:
            s.load_state_dict({"epoch": resume_at // 5, "step_in_epoch": resume_at % 5, "seed": 3})
        return s

    reference, plain = [], sampler()  # the loop without a prefetcher: draw, build, train, in turn
    for _ in range(steps - resume_at):
        groups = [source.get(i, e) for i, e in next(plain)]
        reference.append((groups, micro_batches(groups), plain.state_dict()))
    for enabled in (False, True):
        run_sampler = sampler()
        batches = BatchPrefetcher(source, run_sampler, micro_batches, steps - resume_at, enabled=enabled)
        got = []
        for _ in range(steps - resume_at):
            groups, micro, waited = batches.next()
            assert waited >= 0
            got.append((groups, micro, run_sampler.state_dict()))  # the state a checkpoint would save
        batches.close()
        assert len(got) == steps - resume_at and _same(got, reference)
        assert not _same(got[1:], reference[:-1])  # (the comparison sees a one-step shift)


def test_a_worker_error_is_raised_by_next_unchanged(tmp_path):
    from megarank.training.prefetch import BatchPrefetcher

    source, micro_batches = _prefetch_setup(tmp_path, n=16)
    sampler = GroupSampler(len(source), 8, dp_rank=0, dp_size=1, seed=3)

    def broken(groups):
        raise DataError("g.jsonl line 3: something the worker found")

    batches = BatchPrefetcher(source, sampler, broken, 3)
    with pytest.raises(DataError, match=r"^g\.jsonl line 3: something the worker found$"):
        batches.next()
    batches.close()
    assert batches.executor is None
