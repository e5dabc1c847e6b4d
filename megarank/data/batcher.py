"""The one way from token rows to model batches, for training and for scoring.

    query groups, (qid, docid) pairs ──PairTokenizer.encode──▶ id rows ──Batcher──▶ batch dicts ──▶ model

A ``Batcher`` decides which rows share a batch and lays them out, padded or packed (``data.packing``):

* training micro-batches (``micro_batches``): whole query groups, group-major, positive first, either
  ``train.micro_batch_size`` groups each or, with a token budget ``train.micro_batch_tokens``, as many whole groups
  as fit (with ``loss_weight``, so that the step equals any fixed split, megarank/training/step.py);
* scoring batches (``scoring_batches``): (query, candidate) pairs sorted longest first, ``batch_size`` pairs each or,
  with a token budget ``batch_tokens``, as many consecutive pairs as fit, at most ``batch_size`` if set.

Batch dicts: ``input_ids`` LongTensor and ``attention_mask`` BoolTensor (True = real token), [b, s] right-padded to
the longest row rounded up to ``multiple``, or [1, T] packed with the stream's layout under ``packed_seq_params``
(megarank/data/packing.py); training ones add ``group_size``, ``relevance`` (FloatTensor[G, n]: graded labels, positives first),
``teacher`` (FloatTensor[G, n] teacher logits, when every group carries them) and, with a token budget, ``loss_weight``. Packed batches are built straight from the token ids.

The multiple (``Batcher.multiple``) is the one rule for a batch's length: padded, ``data.pad_to_multiple_of``
(or 1); packed, ``packing_multiple(pad_to_multiple_of, TP)`` so that sequence parallelism can split the stream.
With context parallelism (CP > 1) both are ``packing_multiple(pad_to_multiple_of, TP, CP)`` (CP x lcm(pad, 2 x TP)): every
padded row, and every sequence of a packed stream (``seq_multiple`` = 2 x CP, padded inside its segment), splits
into the 2 x CP chunks of megarank/parallel/context.py, and each rank's share still splits over TP.
Token budgets count what the model runs with it (``batch_cost``). The TP size is passed in: this package never
imports megatron-core or its parallel state.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch

from .groups import as_training_group
from .packing import pack_rows, packing_multiple

_LENGTH_CHUNK = 4096  # pairs measured per tokenizer call: bounds memory on large runs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_cost(num_rows: int, longest: int, total: int, packed: bool, multiple: int) -> int:
    """Tokens the model processes for a batch of ``num_rows`` sequences (``longest`` the longest, ``total`` all
    their tokens): the stream length packed, rows x padded length padded. From aggregates, so that a batch
    growing one item at a time is costed in O(1)."""
    multiple = multiple or 1
    if packed:
        return _round_up(total, multiple)
    return num_rows * _round_up(longest, multiple)


def split_by_budget(items: Iterable[tuple[int, int, int]], budget: int = 0, cap: int = 0, packed: bool = False,
                    multiple: int = 1) -> Iterator[range]:
    """Cut a sequence of items into consecutive batches, yielded as ranges of item positions.

    Each item is ``(rows, longest, tokens)``: a scoring pair of n tokens is ``(1, n, n)``, a query group its
    passages' count, longest and total. Without a budget (``budget`` 0) batches hold ``cap`` items (the last may
    hold fewer). With one, greedily: an item joins the current batch while the batch's ``batch_cost`` stays within
    ``budget`` and it holds fewer than ``cap`` items (no bound when ``cap`` is 0); an item over the budget on its
    own forms a batch alone.
    """
    start = count = rows = longest = tokens = 0
    for k, (r, n, t) in enumerate(items):
        if count and ((cap and count == cap)
                      or (budget > 0 and batch_cost(rows + r, max(longest, n), tokens + t, packed, multiple) > budget)):
            yield range(start, k)
            start, count, rows, longest, tokens = k, 0, 0, 0, 0
        count, rows, longest, tokens = count + 1, rows + r, max(longest, n), tokens + t
    if count:
        yield range(start, start + count)


class Batcher:
    """Token rows -> model batches, padded or ``packed``, with one length multiple (see the module docstring).

    ``pair_tokenizer`` (a ``PairTokenizer``) encodes the pairs and gives the pad id and ``pad_to_multiple_of``;
    ``tensor_parallel_size`` only matters packed (the stream is split over TP ranks under sequence parallelism) or
    with ``context_parallel_size`` > 1 (every sequence is split over CP ranks, then over TP).
    """

    def __init__(self, pair_tokenizer, *, packed: bool = False, tensor_parallel_size: int = 1,
                 context_parallel_size: int = 1):
        self.tokenizer = pair_tokenizer
        self.packed = packed
        pad = pair_tokenizer.pad_to_multiple_of
        cp = context_parallel_size or 1
        if cp > 1:
            self.multiple = packing_multiple(pad, tensor_parallel_size, cp)
        else:
            self.multiple = packing_multiple(pad, tensor_parallel_size) if packed else (pad or 1)
        # Packed under CP: every sequence padded inside its segment to 2 x CP tokens (megarank/data/packing.py).
        self.seq_multiple = 2 * cp if packed and cp > 1 else 1

    def tokens(self, length: int) -> int:
        """The stream tokens one packed sequence of ``length`` tokens takes (its segment, CP padding included)."""
        return _round_up(length, self.seq_multiple)

    def cost(self, lengths: Sequence[int]) -> int:
        """Tokens the model runs for one batch of rows of these lengths (padding included)."""
        return batch_cost(len(lengths), max(lengths), sum(map(self.tokens, lengths)), self.packed, self.multiple)

    def batch(self, rows: Sequence[Sequence[int]]) -> dict:
        """Id lists -> {"input_ids", "attention_mask"[, "packed_seq_params"]}: one stream packed, else right-padded."""
        if self.packed:
            return pack_rows(rows, self.tokenizer.pad_id, self.multiple, self.seq_multiple)
        if self.multiple == (self.tokenizer.pad_to_multiple_of or 1):
            return self.tokenizer.pad(rows)  # to the longest rounded up to pad_to_multiple_of, i.e. self.multiple
        return self.tokenizer.pad(rows, multiple=self.multiple)  # context parallelism: a multiple of 2 x CP x TP

    # ------------------------------------------------------------------------------------------ training

    def micro_batches(self, groups: Sequence, micro_batch_size: int = 0, micro_batch_tokens: int = 0) -> list[dict]:
        """One step's query groups (``TrainingGroup``s, or ``(query, [positive, negative, ...])`` pairs) ->
        micro-batches of whole groups, in order.

        ``micro_batch_tokens`` > 0: groups fill micro-batches greedily while a micro-batch's ``cost`` stays within
        it (a group over the budget alone forms a micro-batch), and every micro-batch gets ``loss_weight`` = its
        groups x number of micro-batches / all groups, so that megatron's schedule, which divides each
        micro-batch's loss by the number of micro-batches (schedules.py:266-269), gives the mean over all groups:
        the same loss and gradients as any fixed split (weights of exactly 1.0 when all micro-batches have the same
        number of groups). Else ``micro_batch_size`` groups each (the last may hold fewer), no ``loss_weight``.
        """
        if micro_batch_tokens < 0 or (micro_batch_tokens == 0 and micro_batch_size < 1):
            raise ValueError("micro-batches need train.micro_batch_size >= 1 or train.micro_batch_tokens > 0 "
                             f"(got {micro_batch_size} and {micro_batch_tokens})")
        groups = [as_training_group(g) for g in groups]
        group_size = check_group_sizes(groups)
        rows = self.tokenizer.encode([g.query for g in groups for _ in g.passages],
                                     [p for g in groups for p in g.passages])
        relevance = torch.tensor([g.labels for g in groups], dtype=torch.float32)
        teacher = (torch.tensor([g.teacher for g in groups], dtype=torch.float32)
                   if all(g.teacher is not None for g in groups) else None)
        encoded = [rows[g * group_size : (g + 1) * group_size] for g in range(len(groups))]
        if micro_batch_tokens > 0:
            sizes = ((group_size, max(map(len, g)), sum(self.tokens(len(r)) for r in g)) for g in encoded)
            chunks = list(split_by_budget(sizes, micro_batch_tokens, 0, self.packed, self.multiple))
        else:
            chunks = list(split_by_budget(((group_size, 0, 0) for _ in encoded), cap=micro_batch_size))
        batches = []
        for chunk in chunks:
            batch = self.batch([r for g in encoded[chunk.start : chunk.stop] for r in g])
            batch["group_size"] = group_size
            batch["relevance"] = relevance[chunk.start : chunk.stop]
            if teacher is not None:
                batch["teacher"] = teacher[chunk.start : chunk.stop]
            if micro_batch_tokens > 0:
                batch["loss_weight"] = len(chunk) * len(chunks) / len(groups)
            batches.append(batch)
        return batches

    # ------------------------------------------------------------------------------------------ scoring

    def scoring_batches(self, pairs: Sequence[tuple[str, str]], queries: Mapping[str, str], corpus: Mapping[str, str],
                        batch_size: Optional[int] = None, batch_tokens: int = 0
                        ) -> Iterator[tuple[list[tuple[str, str]], dict]]:
        """Yield ``(pairs, batch)`` with the (qid, docid) pairs ordered longest first (stable, so deterministic):

        * ``batch_size`` pairs per batch when ``batch_tokens`` is 0 (the last batch may be shorter);
        * with a token budget ``batch_tokens`` > 0: as many consecutive pairs as keep the batch's cost (what the
          model runs: rows x longest rounded up to ``multiple`` padded, the stream length packed) within the
          budget, and at most ``batch_size`` pairs (no bound when it is 0 or None). A single pair over the budget
          forms a batch alone.

        Every rank gets the same batches (the split depends only on the pairs' lengths). Lengths are measured
        once up front and each batch is tokenized again when it is built, which keeps memory at one integer per
        pair instead of all token ids. The arguments are checked when called, the pairs measured at the first batch.
        """
        if batch_tokens < 0:
            raise ValueError(f"batch_tokens must be >= 0 (0 = fixed batch_size), got {batch_tokens}")
        if batch_tokens == 0 and (batch_size is None or batch_size < 1):
            raise ValueError(f"batch_size must be >= 1 without a token budget, got {batch_size}")
        if batch_size is not None and batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        return self._scoring_batches(pairs, queries, corpus, batch_size or 0, batch_tokens)

    def _scoring_batches(self, pairs, queries, corpus, cap: int, budget: int):
        lengths: list[int] = []
        for start in range(0, len(pairs), _LENGTH_CHUNK):
            chunk = pairs[start : start + _LENGTH_CHUNK]
            lengths += self.tokenizer.lengths([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])
        order = sorted(range(len(pairs)), key=lambda i: -lengths[i])
        sizes = ((1, lengths[i], self.tokens(lengths[i])) for i in order)
        for span in split_by_budget(sizes, budget, cap, self.packed, self.multiple):
            chunk = [pairs[i] for i in order[span.start : span.stop]]
            rows = self.tokenizer.encode([queries[q] for q, _ in chunk], [corpus[d] for _, d in chunk])
            yield chunk, self.batch(rows)


def check_group_sizes(groups: Sequence) -> int:
    """The common number of passages of ``groups`` ``(query, passages)``; ValueError if there are no groups, or
    they differ or are 0 (the listwise loss reads rows group by group)."""
    if not groups:
        raise ValueError("cannot batch an empty list of query groups")
    sizes = sorted({len(as_training_group(g).passages) for g in groups})
    if len(sizes) != 1 or sizes[0] == 0:
        raise ValueError(f"all groups must have the same non-zero number of passages, got sizes {sizes}")
    return sizes[0]
