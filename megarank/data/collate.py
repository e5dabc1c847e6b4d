"""Collation of training groups into one model batch."""

from __future__ import annotations

from typing import Sequence

import torch

from .groups import Group


def collate_groups(groups: Sequence[Group], pair_tokenizer) -> dict:
    """Tokenize G groups of n passages into a group-major batch.

    Returns ``input_ids`` / ``attention_mask`` of shape [G * n, s] (group g in rows g*n .. g*n+n-1, its
    positive first), ``group_size`` = n and ``labels`` = LongTensor[G] of zeros (the positive's position).
    """
    if not groups:
        raise ValueError("cannot collate an empty list of groups")
    group_size = len(groups[0][1])
    if group_size == 0 or any(len(passages) != group_size for _, passages in groups):
        sizes = sorted({len(passages) for _, passages in groups})
        raise ValueError(f"all groups must have the same non-zero number of passages, got sizes {sizes}")
    queries = [query for query, passages in groups for _ in passages]
    passages = [passage for _, group_passages in groups for passage in group_passages]
    batch = pair_tokenizer(queries, passages)
    batch["group_size"] = group_size
    batch["labels"] = torch.zeros(len(groups), dtype=torch.long)
    return batch
