"""A blend of group sources (``data.blend``): groups drawn from several sources in proportion to their weights.

The anchor is megatron-core 0.16.1's ``BlendedDataset``
(megatron/core/datasets/blended_dataset.py:110-215): for ``size`` samples it builds two tables once,
``dataset_index[i]`` (which dataset sample ``i`` comes from) and ``dataset_sample_index[i]`` (the how-many-th sample
of that dataset it is), with ``helpers.build_blending_indices`` (helpers.cpp:77-129; there is no Python fallback in
0.16.1, only the compiled helper): sample ``i`` goes to the dataset whose count lags its target
``weight * max(i, 1)`` most (the first such dataset on a tie), so every prefix of the table follows the weights
within one sample per dataset. `blending_indices` is that loop, kept here because ``megarank/data`` imports no
megatron-core (tests/test_blend.py compares the two tables).

What megarank adds on top, so that a blend is a group source like any other (``len()``, ``get(index, epoch)``):

- The blend has ``size = sum of the sources' lengths`` positions; `GroupSampler` shuffles them per (seed, epoch)
  as it shuffles one source's groups. One pass over the blend (a sampler epoch) draws ``counts[s]`` groups from
  source ``s`` (the table's count, ``weight_s * size`` within one).
- Each source runs its own epochs. Position ``index`` of blend epoch ``e`` is draw number
  ``e * counts[s] + dataset_sample_index[index]`` of its source ``s``; draw ``d`` is position ``d % len(s)`` of
  that source's epoch ``d // len(s)``, whose order is a permutation seeded by (seed, source, source epoch). So a
  source exhausts all its groups before repeating one, re-shuffles on its own epoch, and a small source with a
  large weight cycles (and re-draws its negatives, and rotates its positives) many times per blend epoch.
- Everything is a function of (seed, blend epoch, index) and the config: any rank rebuilds any group, and a
  resumed run (the sampler's saved position) sees the groups the uninterrupted run saw, bit for bit. As for one
  source, the sampler drops a pass's incomplete last global batch, so up to ``global_batch - 1`` draws per pass are
  skipped.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from typing import Sequence

import numpy as np

from .groups import TrainingGroup


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index int16, dataset_sample_index int64)`` of ``size`` samples blended by normalized
    ``weights``: megatron-core's ``build_blending_indices`` (helpers.cpp:77-129), the same tables."""
    w = [float(x) for x in weights]
    current = [0] * len(w)
    which, nth = [0] * size, [0] * size
    for i in range(size):
        at = max(float(i), 1.0)
        best, best_error = 0, w[0] * at - current[0]
        for d in range(1, len(w)):
            error = w[d] * at - current[d]
            if error > best_error:  # strict, as the C++ loop: the first maximum wins a tie
                best, best_error = d, error
        which[i], nth[i] = best, current[best]
        current[best] += 1
    dataset_index = np.asarray(which, dtype=np.int16)
    dataset_sample_index = np.asarray(nth, dtype=np.int64)
    return dataset_index, dataset_sample_index


class BlendedGroupSource:
    """Groups drawn from ``sources`` (each with ``len()`` and ``get(index, epoch) -> TrainingGroup``) by
    ``weights`` (any positive numbers, normalized here as megatron-core's ``utils.normalize``, utils.py:33); ``names`` label
    the per-source counts; ``query_prefixes`` (one per source, "" for none) are put before each query of that
    source. See the module docstring for how positions map to groups."""

    ORDERS_KEPT = 4  # source epochs whose order stays cached per process (a pass spans few epochs of a large source)

    def __init__(self, sources: Sequence, weights: Sequence[float], names: Sequence[str], seed: int,
                 query_prefixes: Sequence[str] | None = None):
        if not sources or not len(sources) == len(weights) == len(names):
            raise ValueError("a blend needs one weight and one name per source, and at least one source")
        if min(weights) <= 0:
            raise ValueError(f"blend weights must be > 0, got {list(weights)}")
        self.sources = list(sources)
        self.names = list(names)
        self.weights = [float(w) / sum(weights) for w in weights]
        self.seed = seed
        self.query_prefixes = list(query_prefixes or [""] * len(sources))
        self.lengths = [len(s) for s in self.sources]
        self.size = sum(self.lengths)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
        self.counts = np.bincount(self.dataset_index, minlength=len(self.sources)).astype(np.int64)
        self._orders: OrderedDict[tuple[int, int], list[int]] = OrderedDict()

    def __len__(self) -> int:
        return self.size

    def source_of(self, index: int) -> int:
        """Which source blend position ``index`` draws from (the same in every blend epoch)."""
        return int(self.dataset_index[index])

    def source_epoch_order(self, source: int, epoch: int) -> list[int]:
        """The order of source ``source``'s groups in its own epoch ``epoch`` (seeded by (seed, source, epoch))."""
        key = (source, epoch)
        if key not in self._orders:
            order = list(range(self.lengths[source]))
            random.Random(f"megarank-blend:{self.seed}:{source}:{epoch}").shuffle(order)
            self._orders[key] = order
            while len(self._orders) > self.ORDERS_KEPT * len(self.sources):
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(key)
        return self._orders[key]

    def locate(self, index: int, epoch: int) -> tuple[int, int, int]:
        """``(source, group index in it, source epoch)`` of blend position ``index`` in blend epoch ``epoch``."""
        source = self.source_of(index)
        draw = epoch * int(self.counts[source]) + int(self.dataset_sample_index[index])
        source_epoch, at = divmod(draw, self.lengths[source])
        return source, self.source_epoch_order(source, source_epoch)[at], source_epoch

    def get(self, index: int, epoch: int) -> TrainingGroup:
        """The group at blend position ``index`` of blend epoch ``epoch``: its source's group, built for the
        source's own epoch, with the source's query prefix."""
        source, group_index, source_epoch = self.locate(index, epoch)
        group = self.sources[source].get(group_index, source_epoch)
        prefix = self.query_prefixes[source]
        return group._replace(query=prefix + group.query) if prefix else group

    def source_counts(self, positions: Sequence[int]) -> dict[str, int]:
        """{source name: how many of ``positions`` (blend indices, e.g. one global batch) draw from it}."""
        found = np.bincount(self.dataset_index[np.asarray(positions, dtype=np.int64)], minlength=len(self.sources))
        return {name: int(n) for name, n in zip(self.names, found)}

    def describe(self) -> str:
        """One line: each source's groups, weight, draws per blend epoch and how many of its own epochs that is."""
        return "; ".join(f"{name}: {n} groups, weight {w:.3g}, {int(c)} per blend epoch of {self.size} "
                         f"({c / n:.3g} of its epochs)"
                         for name, n, w, c in zip(self.names, self.lengths, self.weights, self.counts))
