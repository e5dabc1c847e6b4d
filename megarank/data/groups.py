"""Training groups: ``(query, [positive, negative_1, ..., negative_n])``, positive first.

A source is indexable by (group index, epoch): the positive rotates with the epoch, and the negatives are a
sample drawn from a generator seeded by (seed, epoch, index), so any rank can rebuild any group on its own
and a resumed run sees exactly the groups it would have seen.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Sequence

from .errors import DataError, data_error
from .readers import BeirData

log = logging.getLogger(__name__)

Group = tuple[str, list[str]]


def group_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator private to one group in one epoch (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"megarank-group:{seed}:{epoch}:{index}")


def _check_n_negatives(n_negatives: int) -> None:
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")


class JsonlGroupSource:
    """Groups read by `read_jsonl_groups` (dicts with "query", "pos", "neg", "line")."""

    def __init__(self, groups: Sequence[dict], n_negatives: int, seed: int = 0,
                 path_for_errors: str | os.PathLike = "<groups>", fill_from_corpus: bool = False):
        _check_n_negatives(n_negatives)
        self.groups = list(groups)
        self.n_negatives = n_negatives
        self.seed = seed
        self.path = os.fspath(path_for_errors)
        self.fill_from_corpus = fill_from_corpus
        if not fill_from_corpus:
            for group in self.groups:
                if len(group["neg"]) < n_negatives:
                    raise data_error(self.path, group.get("line"), f"the group has {len(group['neg'])} negatives but "
                                     f"n_negatives={n_negatives} are needed (or enable fill_from_corpus)")

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def group_size(self) -> int:
        return 1 + self.n_negatives

    def get(self, index: int, epoch: int) -> Group:
        """(query, [positive, negatives...]) of group `index` in `epoch`."""
        group = self.groups[index]
        positive = group["pos"][epoch % len(group["pos"])]
        rng = group_rng(self.seed, epoch, index)
        negatives = group["neg"]
        if len(negatives) >= self.n_negatives:
            return group["query"], [positive, *rng.sample(negatives, self.n_negatives)]
        shortfall = self.n_negatives - len(negatives)
        return group["query"], [positive, *rng.sample(negatives, len(negatives)), *self._fill(index, shortfall, rng)]

    def _fill(self, index: int, count: int, rng: random.Random) -> list[str]:
        """`count` distinct passages drawn from other groups, none equal to one of this group's passages."""
        group = self.groups[index]
        taken = set(group["pos"]) | set(group["neg"])
        found: list[str] = []
        for _ in range(100 * count):  # bounded: a tiny file may not hold enough distinct passages
            other = rng.randrange(len(self.groups))
            if other == index:
                continue
            pool = self.groups[other]["pos"] + self.groups[other]["neg"]
            passage = pool[rng.randrange(len(pool))]
            if passage not in taken:
                taken.add(passage)
                found.append(passage)
                if len(found) == count:
                    return found
        raise data_error(self.path, group.get("line"),
                         f"could not find {count} passages in other groups to fill the group's negatives")


class BeirGroupSource:
    """Groups mined from a BEIR split: judged positives plus hard negatives from a first-stage run.

    One group per query with at least one positive (qrels score > 0) and a run entry. Hard negatives are the
    run's top_k minus every document judged relevant (score > 0). `n_dropped_no_positive` and
    `n_dropped_no_run` count the judged queries left out.
    """

    def __init__(self, beir: BeirData, run: dict[str, list[str]], n_negatives: int, top_k: int = 100,
                 seed: int = 0, run_path: str | os.PathLike | None = None):
        _check_n_negatives(n_negatives)
        self.beir = beir
        self.run = run
        self.n_negatives = n_negatives
        self.seed = seed
        self.run_path = os.fspath(run_path) if run_path is not None else getattr(run, "path", "<run>")
        self.n_dropped_no_positive = 0
        self.n_dropped_no_run = 0
        self.groups: list[tuple[str, list[str], list[str]]] = []  # (qid, positives, hard negatives)
        for qid, judged in beir.qrels.items():
            positives = sorted((d for d, s in judged.items() if s > 0), key=lambda d: (-judged[d], d))
            if not positives:
                self.n_dropped_no_positive += 1
            elif not run.get(qid):
                self.n_dropped_no_run += 1
            else:
                negatives = [d for d in run[qid][:top_k] if judged.get(d, 0) <= 0]
                self._check(qid, negatives, top_k)
                self.groups.append((qid, positives, negatives))
        if not self.groups:
            raise DataError(f"{self.run_path}: no query has both a relevant document in {beir.qrels_path} "
                            "and candidates")
        log.info("%d training groups; dropped %d queries without a positive and %d without candidates",
                 len(self.groups), self.n_dropped_no_positive, self.n_dropped_no_run)

    def _check(self, qid: str, negatives: list[str], top_k: int) -> None:
        if len(negatives) < self.n_negatives:
            raise DataError(f"{self.run_path}: query '{qid}' has {len(negatives)} hard negatives in its top {top_k} "
                            f"after removing judged-relevant documents, but data.n_passages={self.n_negatives + 1} needs "
                            f"{self.n_negatives}; {self._depth_advice(top_k)}")
        missing = next((d for d in negatives if d not in self.beir.corpus), None)
        if missing is not None:
            run_where = self.run.where(qid, missing) if hasattr(self.run, "where") else self.run_path
            raise DataError(f"{run_where}: candidate document '{missing}' of query '{qid}' is not in the corpus")

    def _depth_advice(self, top_k: int) -> str:
        """How to fix a shortage of negatives: the smallest data.negatives_top_k that serves every query."""
        needed, short = 0, []
        for qid, judged in self.beir.qrels.items():
            if not any(s > 0 for s in judged.values()) or not self.run.get(qid):
                continue  # dropped anyway
            ranked = self.run[qid]
            depths = [i + 1 for i, d in enumerate(ranked) if judged.get(d, 0) <= 0]
            if len(depths) < self.n_negatives:
                short.append(qid)
            else:
                needed = max(needed, depths[self.n_negatives - 1] if self.n_negatives else 0)
        if short:
            fewest = min(len([d for d in self.run[q] if self.beir.qrels[q].get(d, 0) <= 0]) for q in short)
            return (f"{len(short)} queries (e.g. '{short[0]}') have fewer than {self.n_negatives} unjudged candidates "
                    f"in the whole run, so lower data.n_passages to at most {fewest + 1} or use a deeper run")
        return f"set data.negatives_top_k={needed} (or more; it is {top_k}) or lower data.n_passages"

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def group_size(self) -> int:
        return 1 + self.n_negatives

    @property
    def qids(self) -> list[str]:
        return [qid for qid, _, _ in self.groups]

    def get_ids(self, index: int, epoch: int) -> tuple[str, list[str]]:
        """(query id, [positive docid, negative docids...]) of group `index` in `epoch`."""
        qid, positives, negatives = self.groups[index]
        rng = group_rng(self.seed, epoch, index)
        return qid, [positives[epoch % len(positives)], *rng.sample(negatives, self.n_negatives)]

    def get(self, index: int, epoch: int) -> Group:
        """(query text, [positive text, negative texts...]) of group `index` in `epoch`."""
        qid, docids = self.get_ids(index, epoch)
        return self.beir.queries[qid], [self.beir.corpus[d] for d in docids]
