"""Batches of (query, candidate) pairs for reranking and evaluation, sorted by length to cut padding."""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

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
                      batch_size: Optional[int], pair_tokenizer, *, batch_tokens: int = 0, packed: bool = False,
                      multiple: Optional[int] = None) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    """Yield (pairs, batch) with pairs ordered longest first (stable, so deterministic), in batches of

    * ``batch_size`` pairs when ``batch_tokens`` is 0 (the last batch may be shorter);
    * with a token budget ``batch_tokens`` > 0: as many consecutive pairs as keep the batch's cost (what the model
      runs, ``megarank.data.packing.batch_cost``: rows x longest rounded up to ``multiple`` padded, or the
      stream length rounded up to ``multiple`` when the batches are to be ``packed``) within the budget, and at
      most ``batch_size`` pairs (no bound when ``batch_size`` is 0 or None). A single pair over the budget forms a
      batch alone. ``multiple`` defaults to the tokenizer's pad_to_multiple_of (pass the packing multiple, which
      includes the TP size, for packed batches).

    Every batch is padded (``pair_tokenizer.pad``); packing, if any, happens downstream
    (``megarank.inference.packed_batches``). Lengths are measured once up front and each batch is tokenized again
    when it is built, which keeps memory at one integer per pair instead of all token ids.
    """
    if batch_tokens < 0:
        raise ValueError(f"batch_tokens must be >= 0 (0 = fixed batch_size), got {batch_tokens}")
    if batch_tokens == 0 and (batch_size is None or batch_size < 1):
        raise ValueError(f"batch_size must be >= 1 without a token budget, got {batch_size}")
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    lengths: list[int] = []
    for start in range(0, len(pairs), _LENGTH_CHUNK):
        chunk = pairs[start : start + _LENGTH_CHUNK]
        lengths += pair_tokenizer.lengths([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])
    order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
    if multiple is None:
        multiple = pair_tokenizer.pad_to_multiple_of
    for indices in split_by_budget(order, lengths, batch_size, batch_tokens, packed, multiple):
        chunk = [pairs[i] for i in indices]
        yield chunk, pair_tokenizer([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])


def split_by_budget(order: Sequence[int], lengths: Sequence[int], batch_size: Optional[int], batch_tokens: int,
                    packed: bool = False, multiple: Optional[int] = None) -> Iterator[list[int]]:
    """Cut ``order`` (indices into ``lengths``) into consecutive batches: ``batch_size`` each without a budget,
    else greedily while ``batch_cost`` stays within ``batch_tokens`` and the batch within ``batch_size`` (if set)."""
    from .packing import batch_cost  # here: packing imports megatron-core, which megarank.data must not (seconds)

    cap = batch_size if batch_size else len(order) or 1
    if batch_tokens <= 0:
        for start in range(0, len(order), cap):
            yield list(order[start : start + cap])
        return
    current: list[int] = []
    longest = total = 0
    for i in order:
        n = lengths[i]
        if current and (len(current) == cap or batch_cost(len(current) + 1, max(longest, n), total + n, packed,
                                                          multiple) > batch_tokens):
            yield current
            current, longest, total = [], 0, 0
        current.append(i)
        longest, total = max(longest, n), total + n
    if current:
        yield current


def rerank_batches(queries: Mapping[str, str], corpus: Mapping[str, str], run: Mapping[str, Sequence[str]],
                   top_k: int, batch_size: Optional[int], pair_tokenizer, **budget) -> Iterator[tuple[list[tuple[str, str]], dict]]:
    """Length-sorted batches of every (query, top_k candidate) pair of a run: yields (pairs, batch_dict).
    ``budget``: ``batch_tokens``, ``packed``, ``multiple`` of ``batches_for_pairs``.

    Ids are checked when called (before the first batch), so a bad run fails fast.
    """
    pairs = candidate_pairs(queries, corpus, run, top_k)
    return batches_for_pairs(pairs, queries, corpus, batch_size, pair_tokenizer, **budget)
