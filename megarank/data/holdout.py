"""Held-out validation groups (``data.valid_fraction``): a seeded fraction of a source's groups kept out of training.

`held_out_split` cuts a source of ``n`` groups into a held-out part and a training part from (seed, source number)
alone: a permutation of ``range(n)`` shuffled by ``random.Random(f"megarank-valid:{seed}:{source}")`` (string seeds
hash with SHA-512: the same on every rank, in every process and after a resume), whose first
``round(fraction * n)`` entries (at least 1, and at most ``n - 1``) are held out, in that shuffled order (so the
first ``data.valid_max_groups`` of them are a random sample), and the rest, sorted, are the training part.

`TrainingPart` is the training part as a group source of its own (``len()``, ``get(index, epoch)``): the sampler and
a blend see only its groups, so a held-out group can never be drawn for training. A group keeps its index in the
whole source (its negatives and positives are those the whole source would give it).
"""
from __future__ import annotations

import math
import random

import numpy as np

from .groups import TrainingGroup


def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` groups ``fraction`` holds out: ``round(fraction * n)``, at least 1 and at most ``n - 1``
    (0 when ``fraction`` is 0)."""
    if fraction <= 0:
        return 0
    return max(0, min(max(1, math.floor(fraction * n + 0.5)), n - 1))


def held_out_split(n: int, fraction: float, seed: int, source: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(held out, training)`` group indices of a source of ``n`` groups (module docstring): int64 arrays, the
    held-out ones in their shuffled order, the training ones sorted."""
    order = list(range(n))
    random.Random(f"megarank-valid:{seed}:{source}").shuffle(order)
    k = held_out_count(n, fraction)
    return np.asarray(order[:k], dtype=np.int64), np.sort(np.asarray(order[k:], dtype=np.int64))


class TrainingPart:
    """The groups of ``source`` that are not held out: ``get(i, epoch)`` is ``source.get(training[i], epoch)``.
    ``held_out``: the held-out indices of ``source`` (shuffled order); ``source``: the whole source."""

    def __init__(self, source, fraction: float, seed: int, number: int = 0):
        self.source = source
        self.fraction = fraction
        self.held_out, self.training = held_out_split(len(source), fraction, seed, number)

    def __len__(self) -> int:
        return len(self.training)

    @property
    def group_size(self) -> int:
        return self.source.group_size

    def get(self, index: int, epoch: int) -> TrainingGroup:
        return self.source.get(int(self.training[index]), epoch)

    def held_out_groups(self, limit: int | None = None) -> list[TrainingGroup]:
        """The first ``limit`` held-out groups (all when None), as the whole source builds them in epoch 0."""
        return [self.source.get(int(i), 0) for i in self.held_out[:limit]]
