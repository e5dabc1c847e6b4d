"""IR metrics against hand-computed values (graded relevance, ties broken by docid) and TREC run files."""

import json
import math
from pathlib import Path

import pytest

from megarank.data import DataError, iter_run_rows, read_qrels, read_run
from megarank.scoring.metrics import evaluate_run, rank_documents, read_trec_run, write_trec_run

QRELS = {
    "q1": {"d1": 3, "d2": 2, "d3": 0, "d4": 1},
    "q2": {"x1": 1, "x5": 0, "x9": 2},  # x9 is never retrieved
    "q3": {"y1": 1},  # judged, relevant, but no candidates: counts 0
    "q4": {"z1": 0},  # nothing relevant: not averaged
}
SCORES = {
    "q1": {"d3": 0.9, "d2": 0.5, "d1": 0.5, "d4": 0.1},  # tie d1/d2 -> d1 first (docid order)
    "q2": {"x5": 2.0, "x1": 2.0, "x7": 1.0},  # tie x1/x5 -> x1 first
    "q5": {"w1": 1.0},  # no qrels: ignored
}
L2, L3, L5 = math.log2(2), math.log2(3), math.log2(5)

# q1 ranking d3(0), d1(3), d2(2), d4(1); trec_eval nDCG uses linear gains and 1/log2(rank + 1):
#   DCG  = 0/log2(2) + 3/log2(3) + 2/log2(4) + 1/log2(5) = 1.892789 + 1 + 0.430677 = 3.323466
#   IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4)             = 3 + 1.261860 + 0.5     = 4.761860
#   nDCG = 0.697935;  RR = 1/2 (d1 at rank 2);  R@10 = R@100 = 3/3
# q2 ranking x1(1), x5(0), x7(unjudged):
#   DCG = 1/log2(2) = 1;  IDCG = 2/log2(2) + 1/log2(3) = 2.630930;  nDCG = 0.380094
#   RR = 1/1;  R@10 = R@100 = 1/2 (x9 not retrieved)
# q3: all 0.  Mean over the 3 judged queries q1, q2, q3:
Q1_NDCG = (3 / L3 + 2 / 2 + 1 / L5) / (3 / L2 + 2 / L3 + 1 / 2)
Q2_NDCG = 1 / (2 + 1 / L3)
EXPECTED = {
    "nDCG@10": (Q1_NDCG + Q2_NDCG + 0) / 3,  # (0.697935 + 0.380094) / 3 = 0.359343
    "RR@10": (1 / 2 + 1 + 0) / 3,  # 0.5
    "R@10": (1 + 1 / 2 + 0) / 3,  # 0.5
    "R@100": (1 + 1 / 2 + 0) / 3,
    "MRR@10": (1 / 2 + 1 + 0) / 3,
}


def test_hand_computed_example_with_graded_relevance_and_ties():
    result = evaluate_run(QRELS, SCORES)
    assert set(result) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert result[name] == pytest.approx(value, abs=1e-9), name
    assert result["nDCG@10"] == pytest.approx(0.359343, abs=1e-6)


def test_ties_are_broken_by_docid_not_by_input_order_or_library():
    reordered = {q: dict(reversed(list(docs.items()))) for q, docs in reversed(list(SCORES.items()))}
    assert evaluate_run(QRELS, reordered) == evaluate_run(QRELS, SCORES)
    # Breaking the ties the other way (d2 before d1, x5 before x1) changes nDCG and RR:
    #   q1 DCG = 2/log2(3) + 3/log2(4) + 1/log2(5) = 3.192537 -> nDCG 0.670438;  q2 RR = 1/2, nDCG = 1/log2(3) / IDCG
    flipped = {"q1": {"d3": 0.9, "d2": 0.5 + 1e-9, "d1": 0.5, "d4": 0.1},
               "q2": {"x5": 2.0 + 1e-9, "x1": 2.0, "x7": 1.0}}
    result = evaluate_run(QRELS, flipped)
    q1 = (2 / L3 + 3 / 2 + 1 / L5) / (3 + 2 / L3 + 1 / 2)
    q2 = (1 / L3) / (2 + 1 / L3)
    assert result["nDCG@10"] == pytest.approx((q1 + q2) / 3, abs=1e-9)
    assert result["RR@10"] == pytest.approx((1 / 2 + 1 / 2) / 3, abs=1e-9)


def test_cutoffs_and_explicit_mrr():
    qrels = {"q": {"r": 1}}
    scores = {"q": {**{f"n{i:02d}": 100.0 - i for i in range(10)}, "r": 1.0}}  # relevant doc at rank 11
    result = evaluate_run(qrels, scores, metrics=("MRR@10", "RR@100", "R@10", "R@100", "nDCG@10"))
    assert result == pytest.approx({"MRR@10": 0.0, "RR@100": 1 / 11, "R@10": 0.0, "R@100": 1.0, "nDCG@10": 0.0})


def test_nothing_to_average_and_nan_are_errors():
    with pytest.raises(DataError, match="no query with a relevant document"):
        evaluate_run({"q": {"a": 0}}, {"q": {"a": 1.0}})
    with pytest.raises(ValueError, match="document 'a' is NaN"):
        evaluate_run({"q": {"a": 1}}, {"q": {"a": float("nan")}})


def test_rank_documents_order():
    assert rank_documents({"b": 1.0, "a": 1.0, "c": 2.0}) == [("c", 2.0), ("a", 1.0), ("b", 1.0)]


def test_write_trec_run_is_ranked_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out" / "run.trec"
    write_trec_run(path, SCORES, tag="test")
    assert path.read_text().splitlines()[:4] == [
        "q1 Q0 d3 1 0.9 test", "q1 Q0 d1 2 0.5 test", "q1 Q0 d2 3 0.5 test", "q1 Q0 d4 4 0.1 test"]
    assert [p.name for p in path.parent.iterdir()] == ["run.trec"]  # temp file renamed away
    assert read_trec_run(path) == SCORES
    assert read_run(path) == {"q1": ["d3", "d1", "d2", "d4"], "q2": ["x1", "x5", "x7"], "q5": ["w1"]}
    write_trec_run(path, {"q9": {"a": 1.0}})  # overwrites in place
    assert path.read_text() == "q9 Q0 a 1 1.0 megarank\n"


def test_read_trec_run_errors(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q Q0 a 1 1.0 t\nq Q0 a 2 0.5 t\n")
    with pytest.raises(DataError, match=r"bad\.trec line 2: document 'a' appears twice for query 'q'"):
        read_trec_run(path)
    path.write_text("q a 1\n")
    with pytest.raises(DataError, match=r"bad\.trec line 1: the line has no score column"):
        read_trec_run(path)


def test_cranfield_bm25_matches_the_published_baseline():
    """The BM25 scores of cranfield/test reproduce candidates/bm25_eval.json (computed there with pytrec_eval)."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "cranfield"
    if not folder.is_dir():
        pytest.skip(f"{folder.parent} not found")
    qrels = read_qrels(folder / "qrels" / "test.tsv")  # only qrels and the run: the corpus is not needed
    scores = {}
    for _, qid, docid, _, score in iter_run_rows(folder / "candidates" / "test.bm25.top100.tsv"):
        scores.setdefault(qid, {})[docid] = score
    published = json.loads((folder / "candidates" / "bm25_eval.json").read_text())["results"]["test"]
    result = evaluate_run(qrels, scores)
    for ours, theirs in (("nDCG@10", "nDCG@10"), ("MRR@10", "MRR@10"), ("R@10", "Recall@10"), ("R@100", "Recall@100")):
        assert result[ours] == pytest.approx(published[theirs], abs=5e-5), ours


def test_recall_cut_offs_are_named_after_the_ranking_depth():
    from megarank.scoring.metrics import DEFAULT_METRICS, metrics_for_depth

    assert metrics_for_depth(None) == metrics_for_depth(100) == metrics_for_depth(1000) == DEFAULT_METRICS
    assert metrics_for_depth(20) == ("nDCG@10", "RR@10", "R@10", "R@20")
    assert metrics_for_depth(10) == metrics_for_depth(5)[:2] + ("R@10",)
    assert metrics_for_depth(5) == ("nDCG@10", "RR@10", "R@5")
    # R@100 of a 20-document ranking is its R@20: the name says what was measured
    qrels = {"q": {f"d{i:02d}": 1 for i in range(0, 40, 2)}}
    scores = {"q": {f"d{i:02d}": 40.0 - i for i in range(20)}}
    result = evaluate_run(qrels, scores, metrics_for_depth(20))
    assert set(result) == {"nDCG@10", "RR@10", "MRR@10", "R@10", "R@20"}
    assert result["R@20"] == evaluate_run(qrels, scores, ("R@100",))["R@100"] == pytest.approx(10 / 20)
