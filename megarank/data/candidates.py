"""The (query, candidate) pairs of a first-stage run to rerank; their length-sorted batches come from
``megarank.data.batcher.Batcher.scoring_batches``."""

from __future__ import annotations

from typing import Mapping, Sequence

from .errors import DataError


def candidate_pairs(queries: Mapping[str, str], corpus: Mapping[str, str], run: Mapping[str, Sequence[str]],
                    top_k: int) -> list[tuple[str, str]]:
    """(qid, docid) for the top_k candidates of every query in the run, in run order; ids are checked."""
    pairs = []
    for qid, docids in run.items():
        if qid not in queries:
            raise DataError(f"{_where(run, qid)}: query id '{qid}' is not in the queries")
        for docid in docids[:top_k]:
            if docid not in corpus:
                raise DataError(f"{_where(run, qid, docid)}: candidate document '{docid}' of query '{qid}' "
                                "is not in the corpus")
            pairs.append((qid, docid))
    return pairs


def _where(run, qid: str, docid: str | None = None) -> str:
    """The run file and line of a row (a `Run` knows its file), for error messages."""
    return run.where(qid, docid) if hasattr(run, "where") else getattr(run, "path", "<run>")
