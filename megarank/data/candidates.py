"""Batches of (query, candidate) pairs for reranking and evaluation, sorted by length to cut padding."""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

from .errors import DataError

_LENGTH_CHUNK = 4096  # pairs measured per tokenizer call: bounds memory on large runs


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
                      batch_size: int, pair_tokenizer) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    """Yield (pairs, batch) with pairs ordered longest first (stable, so deterministic) in `batch_size` chunks.

    Lengths are measured once up front and each batch is tokenized again when it is built, which keeps memory
    at one integer per pair instead of all token ids.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths: list[int] = []
    for start in range(0, len(pairs), _LENGTH_CHUNK):
        chunk = pairs[start : start + _LENGTH_CHUNK]
        lengths += pair_tokenizer.lengths([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        chunk = [pairs[i] for i in order[start : start + batch_size]]
        yield chunk, pair_tokenizer([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])


def rerank_batches(queries: Mapping[str, str], corpus: Mapping[str, str], run: Mapping[str, Sequence[str]],
                   top_k: int, batch_size: int, pair_tokenizer) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    """Length-sorted batches of every (query, top_k candidate) pair of a run: yields (pairs, batch_dict).

    Ids are checked when called (before the first batch), so a bad run fails fast.
    """
    pairs = candidate_pairs(queries, corpus, run, top_k)
    return batches_for_pairs(pairs, queries, corpus, batch_size, pair_tokenizer)
