"""`megarank mine` (megarank/cli/mine.py over megarank/data/negatives.py): hard negatives from a BEIR split and a
first-stage run, without false negatives: judged-relevant documents, exact duplicates of a positive's text under
another id, and candidates a teacher scores within the margin of the positive never become negatives."""
import argparse
import json
import math
import os

import pytest

from megarank.cli.mine import _number_problems, add_mine_args, audit_paths, run_mine
from megarank.cli.preflight import UsageError
from megarank.data import GroupsFileSource, read_beir, read_jsonl_groups, read_run, read_scored_run
from megarank.data.errors import DataError
from megarank.data.negatives import (MiningParams, NegativeMiner, audit_paths as data_audit_paths, mine_negatives,
                                     param_problems, sigmoid)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# q1's positives score -1.0 (p1, grade 2) and 0.5 (p2, grade 1): the reference is the lowest, -1.0, a negative logit.
# perc 0.95 keeps s iff sigmoid(s) < 0.95 * sigmoid(-1.0) = 0.25549, i.e. s < -1.06953; the naive s < 0.95 * s_pos
# (= -0.95) would have kept near1 (-1.02) and near2 (-1.06), which the teacher scores almost like the positive.
Q1_RUN = ["dup1", "near1", "p1", "n1", "dup2", "near2", "n2", "n3", "n4", "j0", "n5", "n6", "n7", "n8", "p2"]
Q1_SCORES = {"p1": -1.0, "p2": 0.5, "dup1": -1.0, "dup2": 0.5, "near1": -1.02, "near2": -1.06, "n1": -1.08,
             "n2": -1.5, "n3": -2.0, "n4": -3.0, "j0": -2.5, "n5": -4.0, "n6": -5.0, "n7": -0.5, "n8": -6.0}
# q2's positive scores +2.0: perc 0.95 keeps s iff sigmoid(s) < 0.95 * sigmoid(2.0) = 0.83678, i.e. s < 1.63525 (the
# naive s < 1.9 would keep m0 = 1.8).
Q2_RUN = ["dup3", "near3", "m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"]
Q2_SCORES = {"p3": 2.0, "dup3": 2.0, "near3": 1.9, "m0": 1.8, "m1": 1.5, "m2": 1.0, "m3": 0.0, "m4": -1.0,
             "m5": -2.0, "m6": -3.0, "m7": -4.0, "m8": -5.0}


def _doc(i, title, text):
    return json.dumps({"_id": i, "title": title, "text": text})


@pytest.fixture
def beir(tmp_path):
    """A BEIR folder with exact duplicates of positives (dup1, dup2, dup3) ranked at the top of the run, candidates
    the teacher scores near the positive (near1, near2, near3, m0, n7), a judged non-relevant document (j0), a
    query without a positive (q3) and one without run rows (q4); the teacher run scores every positive and candidate."""
    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = {"p1": ("Alpha", "the alpha positive passage"), "p2": ("Alpha two", "second alpha positive, lower grade"),
            "p3": ("Beta", "the beta positive passage"), "p4": ("Gamma", "gamma positive"),
            "near1": ("Alpha", "almost the alpha positive passage"), "near2": ("Alpha", "nearly alpha"),
            "near3": ("Beta", "almost the beta positive"), "j0": ("Alpha", "judged not relevant")}
    docs["dup1"] = docs["p1"]
    docs["dup2"] = docs["p2"]
    docs["dup3"] = docs["p3"]
    docs.update({f"n{i}": ("Other", f"alpha negative number {i}") for i in range(1, 9)})
    docs.update({f"m{i}": ("Other", f"beta negative number {i}") for i in range(0, 9)})
    docs.update({f"r{i}": ("Random", f"unrelated corpus passage {i}") for i in range(20)})
    (root / "corpus.jsonl").write_text("".join(_doc(i, t, x) + "\n" for i, (t, x) in docs.items()))
    queries = {"q1": "what is alpha", "q2": "what is beta", "q3": "no positive here", "q4": "gamma without run"}
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    qrels = [("q1", "p2", 1), ("q1", "p1", 2), ("q1", "j0", 0), ("q2", "p3", 1), ("q3", "n1", 0), ("q4", "p4", 1)]
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    run = tmp_path / "run.trec"
    lines = [f"q1 Q0 {d} {r} {100 - r} bm25" for r, d in enumerate(Q1_RUN, start=1)]
    lines += [f"q2 Q0 {d} {r} {100 - r} bm25" for r, d in enumerate(Q2_RUN, start=1)]
    lines += [f"q3 Q0 n{i} {i} {10 - i} bm25" for i in range(1, 5)]
    run.write_text("\n".join(lines) + "\n")
    teacher = tmp_path / "teacher.trec"
    write_scores(teacher, {"q1": Q1_SCORES, "q2": Q2_SCORES})
    return {"data": root, "run": run, "teacher": teacher, "tmp": tmp_path}


def write_scores(path, scores):
    rows = []
    for qid, by_doc in scores.items():
        for rank, (d, s) in enumerate(sorted(by_doc.items(), key=lambda kv: -kv[1]), start=1):
            rows.append(f"{qid} Q0 {d} {rank} {s!r} teacher")
    path.write_text("\n".join(rows) + "\n")


def parse(*argv):
    parser = argparse.ArgumentParser(prog="megarank mine")
    add_mine_args(parser)
    return parser.parse_args([str(a) for a in argv])


def mine(beir, out_name="groups.jsonl", *extra, teacher=True):
    out = beir["tmp"] / out_name
    argv = ["--data", beir["data"], "--split", "train", "--run", beir["run"], "--out", out, *extra]
    if teacher:
        argv += ["--teacher-run", beir["teacher"]]
    assert run_mine(parse(*argv)) == 0
    return out


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def audit_of(out):
    audit_json, audit_png = audit_paths(str(out))
    return json.loads(audit_json.read_text()), audit_png


def test_perc_margin_on_sigmoids_drops_duplicates_and_near_positives(beir, capsys):
    out = mine(beir, "g.jsonl", "--negatives", 4)
    q1, q2 = lines(out)
    assert list(q1) == ["query", "pos_doc", "neg_doc", "pos_scores", "neg_scores", "qid", "pos_ids", "neg_ids",
                        "pos_labels"]
    assert (q1["qid"], q1["pos_ids"], q1["pos_labels"]) == ("q1", ["p1", "p2"], [2, 1])  # best grade first
    assert q1["pos_scores"] == [-1.0, 0.5]
    assert q1["neg_ids"] == ["n1", "n2", "n3", "n4"]  # top-ranked survivors, in rank order
    assert q1["neg_scores"] == [Q1_SCORES[d] for d in q1["neg_ids"]]
    assert q2["neg_ids"] == ["m1", "m2", "m3", "m4"]
    threshold = math.log(0.95 * sigmoid(-1.0) / (1 - 0.95 * sigmoid(-1.0)))  # -1.06953
    assert all(s < threshold for s in q1["neg_scores"]) and -1.06 > threshold > -1.08
    for group in (q1, q2):  # no positive text, ever, among the negatives
        assert not set(group["neg_doc"]) & set(group["pos_doc"])
        assert not {"dup1", "dup2", "dup3", "near1", "near2", "near3", "m0", "n7"} & set(group["neg_ids"])
    audit, png = audit_of(out)
    rows = {r["qid"]: r for r in audit["queries"]}
    assert {k: rows["q1"][k] for k in ("candidates", "kept", "dropped_judged", "dropped_duplicate_text",
                                       "dropped_near_positive", "unused", "short_by")} == {
        "candidates": 15, "kept": 4, "dropped_judged": 2, "dropped_duplicate_text": 2, "dropped_near_positive": 3,
        "unused": 4, "short_by": 0}
    assert {(d["docid"], d["reason"]) for d in rows["q1"]["dropped"]} == {
        ("dup1", "duplicate_text"), ("dup2", "duplicate_text"), ("near1", "near_positive"),
        ("near2", "near_positive"), ("n7", "near_positive")}
    assert (rows["q2"]["dropped_duplicate_text"], rows["q2"]["dropped_near_positive"]) == (1, 2)  # dup3; near3, m0
    assert rows["q1"]["s_pos_ref"] == -1.0  # the lowest-scored positive
    t = audit["totals"]
    assert (t["queries_written"], t["queries_without_positive"], t["queries_without_candidates"]) == (2, 1, 1)
    assert (t["dropped_duplicate_text"], t["dropped_near_positive"], t["dropped_judged"]) == (3, 5, 2)
    kept = audit["margins"]["kept"]["ratio"]
    dropped = audit["margins"]["dropped_near_positive"]["ratio"]
    assert kept["max"] < 0.95 <= dropped["min"]  # the ratio sigmoid(s_neg) / sigmoid(s_ref) splits at the margin
    assert audit["margins"]["kept"]["gap"]["min"] == pytest.approx(-1.0 - -1.08)
    assert audit["parameters"]["margin"] == 0.95 and audit["parameters"]["margin_type"] == "perc"
    assert png.read_bytes().startswith(PNG_MAGIC)
    summary = capsys.readouterr().out
    assert "mined 2 queries" in summary and "4 negatives per query" in summary and "5 near the positive" in summary


def test_abs_margin_on_raw_logits(beir):
    out = mine(beir, "abs.jsonl", "--negatives", 4, "--margin-type", "abs", "--margin", 0.1)
    q1, q2 = lines(out)
    assert q1["neg_ids"] == ["n2", "n3", "n4", "j0"]  # keep iff s < -1.0 - 0.1: n1 (-1.08) goes too now
    assert q2["neg_ids"] == ["m0", "m1", "m2", "m3"]  # keep iff s < 2.0 - 0.1: near3 (1.9) ties and a tie goes
    out0 = mine(beir, "abs0.jsonl", "--negatives", 4, "--margin-type", "abs", "--margin", 0)
    q1, q2 = lines(out0)
    assert q1["neg_ids"] == ["near1", "n1", "near2", "n2"]  # keep iff s < -1.0
    assert q2["neg_ids"] == ["near3", "m0", "m1", "m2"]
    audit, _ = audit_of(out0)
    assert {r["qid"]: r["dropped_near_positive"] for r in audit["queries"]} == {"q1": 1, "q2": 0}  # n7 (-0.5)
    assert audit["rule"] == "keep iff s_neg < s_pos_ref - margin"


def test_judged_non_relevant_documents_stay_negatives_and_range_min_skips_survivors(beir):
    q1, _ = lines(mine(beir, "all.jsonl", "--negatives", 8))
    assert q1["neg_ids"] == ["n1", "n2", "n3", "n4", "j0", "n5", "n6", "n8"]  # j0 (qrels 0) is a real negative
    q1, _ = lines(mine(beir, "skip.jsonl", "--negatives", 4, "--range-min", 2))
    assert q1["neg_ids"] == ["n3", "n4", "j0", "n5"]
    audit, _ = audit_of(beir["tmp"] / "skip.jsonl")
    assert audit["queries"][0]["dropped_range_min"] == 2


def test_without_a_teacher_only_judged_and_duplicate_texts_are_dropped(beir):
    out = mine(beir, "plain.jsonl", "--negatives", 4, teacher=False)
    q1, q2 = lines(out)
    assert "pos_scores" not in q1 and "neg_scores" not in q1
    assert q1["neg_ids"] == ["near1", "n1", "near2", "n2"]
    assert q2["neg_ids"] == ["near3", "m0", "m1", "m2"]
    audit, png = audit_of(out)
    assert audit["margins"] is None and audit["totals"]["dropped_duplicate_text"] == 3
    assert png.read_bytes().startswith(PNG_MAGIC)


def test_random_sampling_is_deterministic_per_seed(beir):
    a = mine(beir, "a.jsonl", "--negatives", 4, "--sampling", "random", "--seed", 1)
    b = mine(beir, "b.jsonl", "--negatives", 4, "--sampling", "random", "--seed", 1)
    c = mine(beir, "c.jsonl", "--negatives", 4, "--sampling", "random", "--seed", 2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for group in lines(a) + lines(c):
        survivors = {"q1": ["n1", "n2", "n3", "n4", "j0", "n5", "n6", "n8"], "q2": [f"m{i}" for i in range(1, 9)]}
        order = survivors[group["qid"]]
        assert set(group["neg_ids"]) <= set(order) and len(group["neg_ids"]) == 4
        assert group["neg_ids"] == sorted(group["neg_ids"], key=order.index)  # written in rank order


def test_random_corpus_negatives(beir):
    out = mine(beir, "r1.jsonl", "--negatives", 2, "--random-negatives", 3, "--seed", 5, teacher=False)
    again = mine(beir, "r2.jsonl", "--negatives", 2, "--random-negatives", 3, "--seed", 5, teacher=False)
    assert out.read_bytes() == again.read_bytes()
    data = read_beir(beir["data"], "train")
    for group in lines(out):
        extra = group["neg_ids"][2:]
        assert len(extra) == 3 and len(set(group["neg_ids"])) == 5
        judged = data.qrels[group["qid"]]
        assert not set(extra) & set(judged)  # never judged for the query (j0 included)
        assert not {data.corpus[d] for d in extra} & set(group["pos_doc"])
    audit, _ = audit_of(out)
    assert audit["totals"]["random_kept"] == 6


def test_random_negatives_with_a_teacher_run_is_an_error(beir):
    with pytest.raises(UsageError, match="--random-negatives cannot be used with --teacher-run"):
        mine(beir, "x.jsonl", "--random-negatives", 2)
    data, run = read_beir(beir["data"], "train"), read_run(beir["run"])
    with pytest.raises(ValueError, match="--random-negatives"):
        mine_negatives(data, run, read_scored_run(beir["teacher"]), MiningParams(negatives=2, random_negatives=1))
    assert not (beir["tmp"] / "x.jsonl").exists()


def _nothing_written(tmp):
    return not [p.name for p in tmp.iterdir() if p.name.startswith(("out", ".out"))]


def test_too_many_negatives_names_the_count_a_query_and_settings_that_work(beir):
    with pytest.raises(DataError) as e:
        mine(beir, "out.jsonl", "--negatives", 9)
    msg = str(e.value)
    assert "2 of 2 queries keep fewer than --negatives 9" in msg and "query 'q1' keeps 8" in msg
    assert "--negatives 8" in msg and "no --depth serves" in msg and "--allow-short" in msg
    assert _nothing_written(beir["tmp"])
    with pytest.raises(DataError) as e:  # a deeper run would do: q1 keeps 3 in its top 8, the 4th survivor is rank 9
        mine(beir, "out.jsonl", "--negatives", 4, "--depth", 8)
    msg = str(e.value)
    assert "1 of 2 queries keep fewer than --negatives 4" in msg and "query 'q1' keeps 3" in msg
    assert "--negatives 3" in msg and "--depth 9" in msg
    assert _nothing_written(beir["tmp"])
    out = mine(beir, "out.jsonl", "--negatives", 4, "--depth", 8, "--allow-short")  # written, and counted
    q1, q2 = lines(out)
    assert (len(q1["neg_ids"]), len(q2["neg_ids"])) == (3, 4)
    audit, _ = audit_of(out)
    assert audit["totals"]["queries_short"] == 1 and audit["queries"][0]["short_by"] == 1


def test_a_missing_teacher_score_names_the_file_query_and_document(beir):
    scores = {"q1": dict(Q1_SCORES), "q2": Q2_SCORES}
    del scores["q1"]["n3"]
    write_scores(beir["teacher"], scores)
    with pytest.raises(DataError, match=r"teacher.trec: has no teacher score for candidate document 'n3' of query 'q1'"):
        mine(beir, "out.jsonl", "--negatives", 4)
    del scores["q1"]["p2"]
    write_scores(beir["teacher"], scores)
    with pytest.raises(DataError, match=r"teacher.trec: .*positive document 'p2' of query 'q1'"):
        mine(beir, "out.jsonl", "--negatives", 4)
    assert _nothing_written(beir["tmp"])


@pytest.mark.parametrize("flags, needle", [
    (["--margin", "1.5"], "--margin 1.5 is out of range for --margin-type perc"),
    (["--margin", "0"], "--margin 0.0 is out of range for --margin-type perc"),
    (["--margin", "nan"], "--margin must be a finite number"),
    (["--margin-type", "abs", "--margin", "-0.5"], "--margin -0.5 is out of range for --margin-type abs"),
    (["--margin-type", "abs"], "--margin-type abs needs an explicit --margin"),
    (["--negatives", "0"], "--negatives must be >= 1"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--range-min", "-1"], "--range-min must be >= 0"),
    (["--range-min", "97", "--negatives", "4"], "--range-min 97 leaves 3 of the --depth 100 candidates"),
])
def test_out_of_range_settings_name_the_flag_before_anything_is_read(beir, flags, needle):
    with pytest.raises(UsageError, match=needle.replace("+", r"\+")):
        mine(beir, "out.jsonl", *flags)
    assert _nothing_written(beir["tmp"])
    # The library's own check (megarank.data.negatives, imported after torch) rejects the same settings.
    args = parse("--data", "d", "--run", "r", "--out", "o", "--teacher-run", "t", *flags)
    assert _number_problems(args)
    params = dict(negatives=args.negatives, depth=args.depth, margin_type=args.margin_type, margin=args.margin,
                  range_min=args.range_min)
    try:
        problems = param_problems(MiningParams(**params), "run")
    except ValueError as e:
        problems = [str(e)]
    assert problems and problems[0] == _number_problems(args)[0]


def test_a_margin_without_teacher_and_an_output_that_is_an_input_are_usage_errors(beir):
    with pytest.raises(UsageError, match="--margin needs a teacher"):
        mine(beir, "out.jsonl", "--margin", "0.9", teacher=False)
    with pytest.raises(UsageError, match="--out .*run.trec is the --run input file"):
        run_mine(parse("--data", beir["data"], "--run", beir["run"], "--out", beir["run"]))
    with pytest.raises(UsageError, match="--teacher-run .* does not exist"):
        mine(beir, "out.jsonl", "--teacher-run", beir["tmp"] / "missing.trec", teacher=False)
    assert audit_paths("x/g.jsonl") == data_audit_paths("x/g.jsonl")


def test_max_queries_and_the_output_trains(beir):
    out = mine(beir, "one.jsonl", "--negatives", 4, "--max-queries", 1)
    assert [g["qid"] for g in lines(out)] == ["q1"]
    out = mine(beir, "train.jsonl", "--negatives", 4)
    groups, skipped = read_jsonl_groups(out)
    assert skipped == 0 and len(groups) == 2
    source = GroupsFileSource(groups, n_negatives=4, path_for_errors=out, with_teacher=True)
    group = source.get(0, epoch=0)
    assert group.query == "what is alpha" and len(group.passages) == 5
    assert group.passages[0] == "Alpha the alpha positive passage" and group.labels[0] == 2.0  # p1: grade 2
    assert group.teacher[0] == -1.0 and sorted(group.teacher[1:]) == [-3.0, -2.0, -1.5, -1.08]


def test_mining_is_the_same_through_the_library(beir):
    data, run = read_beir(beir["data"], "train"), read_run(beir["run"])
    result = mine_negatives(data, run, read_scored_run(beir["teacher"]), MiningParams(negatives=4))
    assert [g.neg_ids for g in result.groups] == [["n1", "n2", "n3", "n4"], ["m1", "m2", "m3", "m4"]]
    miner = NegativeMiner(data, run, MiningParams(negatives=4))
    pairs = dict(miner.pairs_by_query())
    assert set(pairs["q1"]) == set(Q1_SCORES) and set(pairs["q2"]) == set(Q2_SCORES)  # what a model must score
    scores = {(q, d): s for q, by in (("q1", Q1_SCORES), ("q2", Q2_SCORES)) for d, s in by.items()}
    assert [g.neg_ids for g in miner.mine(scores).check().groups] == [g.neg_ids for g in result.groups]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from megarank.cli.tiny import write_tiny_hf_model

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield write_tiny_hf_model(tmp_path_factory.mktemp("teacher") / "tiny-hf", seed=7)
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE")
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def test_a_model_teacher_scores_what_reranker_score_gives(beir, tiny_teacher):
    from megarank import Reranker

    out = mine(beir, "model.jsonl", "--teacher", tiny_teacher, "--dtype", "fp32", "--negatives", 2,
               "--margin-type", "abs", "--margin", 0, "--random-negatives", 1, "--allow-short", teacher=False)
    groups = lines(out)
    audit, png = audit_of(out)
    assert png.read_bytes().startswith(PNG_MAGIC)
    rows = {r["qid"]: r for r in audit["queries"]}
    with Reranker.from_checkpoint(tiny_teacher, dtype="fp32") as reranker:
        for group in groups:
            qid, query = group["qid"], group["query"]
            pairs = [(query, p) for p in group["pos_doc"] + group["neg_doc"]]
            expected = reranker.score(pairs).tolist()
            assert group["pos_scores"] + group["neg_scores"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            s_ref = min(group["pos_scores"])
            assert all(s < s_ref for s in group["neg_scores"])  # abs 0: strictly below every positive
            # Duplicates of a positive get exactly that positive's score (one pair per distinct text) and are dropped.
            dups = [d for d in rows[qid]["dropped"] if d["reason"] == "duplicate_text"]
            assert dups and not {d["docid"] for d in dups} & set(group["neg_ids"])
            twin = {"dup1": "p1", "dup2": "p2", "dup3": "p3"}
            for d in dups:
                assert d["score"] == group["pos_scores"][group["pos_ids"].index(twin[d["docid"]])]
