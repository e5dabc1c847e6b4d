"""Collation of training groups into one padded model batch: a shortcut to ``megarank.data.batcher.Batcher``."""

from __future__ import annotations

from typing import Sequence

from .batcher import Batcher
from .groups import Group


def collate_groups(groups: Sequence[Group], pair_tokenizer) -> dict:
    """G groups of n passages -> one padded group-major micro-batch (``Batcher.micro_batches`` with one micro-batch).

    Returns ``input_ids`` / ``attention_mask`` of shape [G * n, s] (group g in rows g*n .. g*n+n-1, its
    positive first), ``group_size`` = n and ``labels`` = LongTensor[G] of zeros (the positive's position).
    """
    return Batcher(pair_tokenizer).micro_batches(groups, micro_batch_size=max(len(groups), 1))[0]
