"""IR metrics through ir-measures, with deterministic tie-breaking, and TREC run files.

ir-measures' default pipeline picks the backend per measure: pytrec_eval for nDCG@k and R@k, its msmarco
provider for RR@k (trec_eval's recip_rank has no cutoff; note that calling `ir_measures.pytrec_eval` directly
with RR@10 silently ignores the cutoff in ir-measures 0.4.3, so never pin that provider).

Ties: scores are first turned into a strict ranking sorted by (-score, docid) and the library is given the
rank-derived scores ``n - position``, so two documents with equal scores are always ordered by ascending docid
(trec_eval itself would break ties by docid in reverse order). Written runs use the same order.

What is averaged: the mean over the queries of `qrels` that have at least one document with relevance > 0.
Such a query missing from `scores` (or with no candidates) counts 0; queries without qrels are ignored.
Relevance: nDCG uses the graded judgements as linear gains (trec_eval's ndcg_cut); RR and R count any
score >= 1 as relevant.

Names match what was measured: a reranked top-k holds k documents per query, and recall at a deeper cut-off is
recall at k, so `metrics_for_depth(top_k)` names the recall cut-offs 10 and 100 after k when k is smaller
(`rerank --top-k 20` reports R@10 and R@20, `--top-k 5` reports R@5). nDCG@10 and RR@10 keep their cut-off:
a ranking shorter than 10 counts as it is (its missing ranks hold nothing relevant).
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

import ir_measures

from megarank.data.errors import DataError
from megarank.data.readers import iter_run_rows
from megarank.files import atomic_write

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@10", "R@100")
RECALL_CUTOFFS = (10, 100)


def metrics_for_depth(top_k: Optional[int] = None) -> tuple[str, ...]:
    """The metrics reported for rankings of ``top_k`` documents per query: nDCG@10, RR@10 and recall at 10 and 100,
    each recall cut-off capped at ``top_k`` (duplicates dropped); DEFAULT_METRICS when ``top_k`` is None or >= 100."""
    recall = [f"R@{c if top_k is None else min(c, top_k)}" for c in RECALL_CUTOFFS]
    return ("nDCG@10", "RR@10", *dict.fromkeys(recall))

Scores = Mapping[str, Mapping[str, float]]


def rank_documents(doc_scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """(docid, score) sorted by descending score, ties by ascending docid."""
    for docid, score in doc_scores.items():
        if math.isnan(score):
            raise ValueError(f"score of document '{docid}' is NaN")
    return sorted(((d, float(s)) for d, s in doc_scores.items()), key=lambda item: (-item[1], item[0]))


def _strict_run(scores: Scores) -> dict[str, dict[str, float]]:
    """Scores replaced by ``n - position`` of the tie-broken ranking, so the library cannot reorder ties."""
    run = {}
    for qid, doc_scores in scores.items():
        ranked = rank_documents(doc_scores)
        run[qid] = {docid: float(len(ranked) - i) for i, (docid, _) in enumerate(ranked)}
    return run


def _parse(name: str):
    """An ir-measures measure for `name`; "MRR@k" is read as RR@k."""
    return ir_measures.parse_measure("RR" + name[3:] if name.startswith("MRR") else name)


def evaluate_run(qrels: Mapping[str, Mapping[str, int]], scores: Scores,
                 metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over the judged queries (see the module docstring); keys as given.

    "MRR@10" is added as an alias of "RR@10" whenever RR@10 is computed.
    """
    judged = [qid for qid, docs in qrels.items() if any(rel > 0 for rel in docs.values())]
    if not judged:
        raise DataError("qrels have no query with a relevant document, so there is nothing to average")
    measures = {name: _parse(name) for name in metrics}
    judged_set = set(judged)
    run = {qid: docs for qid, docs in _strict_run(scores).items() if qid in judged_set and docs}
    per_query: dict[tuple[str, str], float] = {}
    if run:
        qrels_subset = {qid: {d: int(r) for d, r in qrels[qid].items()} for qid in run}
        for m in ir_measures.iter_calc(set(measures.values()), qrels_subset, run):
            per_query[(str(m.measure), m.query_id)] = m.value
    result = {}
    for name, measure in measures.items():
        result[name] = sum(per_query.get((str(measure), qid), 0.0) for qid in judged) / len(judged)
    if "RR@10" in result:
        result.setdefault("MRR@10", result["RR@10"])
    return result


def write_trec_run(path: str | os.PathLike, scores: Scores, tag: str = "megarank") -> None:
    """Write ``qid Q0 docid rank score tag`` lines (ranks 1..n in tie-broken order), atomically."""
    with atomic_write(path) as f:
        for qid, doc_scores in scores.items():
            for rank, (docid, score) in enumerate(rank_documents(doc_scores), start=1):
                f.write(f"{qid} Q0 {docid} {rank} {score!r} {tag}\n")


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{qid: {docid: score}}`` from a TREC run file (the inverse of `write_trec_run`)."""
    scores: dict[str, dict[str, float]] = {}
    for number, qid, docid, _, score in iter_run_rows(path):
        if score is None:
            raise DataError(f"{path} line {number}: the line has no score column")
        if docid in scores.setdefault(qid, {}):
            raise DataError(f"{path} line {number}: document '{docid}' appears twice for query '{qid}'")
        scores[qid][docid] = score
    return scores
