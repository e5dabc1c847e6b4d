"""The (query, candidate) pairs of a first-stage run to rerank; their length-sorted batches come from
``megarank.data.batcher.Batcher.scoring_batches``."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

from .batcher import Batcher
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


def batches_for_pairs(pairs: Sequence[tuple[str, str]], queries: Mapping[str, str], corpus: Mapping[str, str],
                      batch_size: Optional[int], pair_tokenizer, *, batch_tokens: int = 0, packed: bool = False,
                      tensor_parallel_size: int = 1) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    """``Batcher(pair_tokenizer, packed=..., tensor_parallel_size=...).scoring_batches(pairs, ...)`` in one call
    (megarank.data.batcher): length-sorted ``(pairs, batch)``, ``batch_size`` pairs each or up to ``batch_tokens``."""
    batcher = Batcher(pair_tokenizer, packed=packed, tensor_parallel_size=tensor_parallel_size)
    return batcher.scoring_batches(pairs, queries, corpus, batch_size, batch_tokens)
