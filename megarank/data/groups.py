"""Training groups: a query, its passages (positives first, then negatives), their graded labels and, for the
distillation losses, the teacher's score of every passage.

A source is indexable by (group index, epoch): the positives rotate with the epoch, and the negatives are a
sample drawn from a generator seeded by (seed, epoch, index), so any rank can rebuild any group on its own
and a resumed run sees exactly the groups it would have seen.
"""

from __future__ import annotations

import logging
import os
import random
from typing import NamedTuple, Optional, Sequence

import numpy as np

from .errors import DataError, where
from .readers import BeirData, ScoredRun

log = logging.getLogger(__name__)


class TrainingGroup(NamedTuple):
    """One query group as the batcher and the losses see it.

    ``passages``: the group's positives first (at least one), then its negatives; ``labels``: graded relevance per
    passage (a positive's qrels grade or JSONL ``pos_labels`` entry, 1 by default; 0 for negatives); ``teacher``:
    the teacher's logit per passage, or None when the source carries no teacher scores.
    """

    query: str
    passages: list[str]
    labels: list[float]
    teacher: Optional[list[float]] = None


def as_training_group(group) -> TrainingGroup:
    """A ``TrainingGroup``, or a plain ``(query, [positive, negatives...])`` pair read as one with labels 1, 0, ..."""
    if isinstance(group, TrainingGroup):
        return group
    query, passages = group
    return TrainingGroup(query, list(passages), [1.0] + [0.0] * (len(passages) - 1), None)


def group_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator private to one group in one epoch (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"megarank-group:{seed}:{epoch}:{index}")


def _check_counts(n_negatives: int, positives_per_group: int) -> None:
    if n_negatives < 0:
        raise ValueError(f"n_negatives must be >= 0, got {n_negatives}")
    if positives_per_group < 1:
        raise ValueError(f"positives_per_group must be >= 1, got {positives_per_group}")


def rotating_positions(count: int, per_group: int, epoch: int) -> list[int]:
    """Which of a query's ``count`` positives a group holds in ``epoch``: ``per_group`` consecutive ones (at most
    ``count``), the window moving by ``per_group`` each epoch, so every positive is used in turn (one positive per
    group: positive ``epoch % count``)."""
    take = min(per_group, count)
    return [(epoch * per_group + k) % count for k in range(take)]


def _at(path: str, group: dict) -> str:
    """Where a group record is, for error messages: its ``at`` (``"f.parquet row 3"``), else the path and line."""
    return group.get("at") or where(path, group.get("line"))


class GroupsFileSource:
    """Groups whose passages are texts: the group dicts of every `megarank.data.formats` reader (JSONL, corpus-id
    JSON, Parquet, ``datasets`` folders, TSV triples): "query", "pos", "neg", "at" (or "line") and optionally
    "pos_labels", "pos_scores", "neg_scores". ``groups`` is any sequence: read by index, never copied; one with
    ``group_counts()`` (an indexed file: positives, negatives, teacher flag per group) is checked from those
    arrays, without parsing its records.

    A group holds ``n_passages`` passages: ``positives_per_group`` of the record's positives (fewer when it has
    fewer; the free places go to negatives) and negatives from its ``neg``. The choice, per (seed, epoch, index):

    - ``rotate_positives``: the positives' window moves each epoch (`rotating_positions`); False keeps the first
      ones (NeMo AutoModel's default, ``cycle_positive_docs: false``);
    - ``sample_negatives``: a random sample of the negatives; False takes them in file order (NeMo AutoModel);
    - ``repeat_negatives``: a record with fewer negatives than the group needs repeats them cyclically (NeMo
      AutoModel; at least one is needed) instead of being an error naming it.

    ``with_teacher``: every group must carry ``pos_scores``/``neg_scores`` (a record without them is an error
    naming it) and groups hold them.
    """

    def __init__(self, groups: Sequence[dict], n_negatives: int, seed: int = 0,
                 path_for_errors: str | os.PathLike = "<groups>", fill_from_corpus: bool = False,
                 positives_per_group: int = 1, with_teacher: bool = False, rotate_positives: bool = True,
                 sample_negatives: bool = True, repeat_negatives: bool = False):
        _check_counts(n_negatives, positives_per_group)
        if fill_from_corpus and repeat_negatives:
            raise ValueError("fill_from_corpus and repeat_negatives are two ways to fill a group; pick one")
        self.groups = groups
        self.n_passages = n_negatives + 1
        self.positives_per_group = positives_per_group
        self.seed = seed
        self.path = os.fspath(path_for_errors)
        self.fill_from_corpus = fill_from_corpus
        self.with_teacher = with_teacher
        self.rotate_positives = rotate_positives
        self.sample_negatives = sample_negatives
        self.repeat_negatives = repeat_negatives
        if with_teacher and fill_from_corpus:
            raise DataError(f"{self.path}: passages filled in from other groups have no teacher score; "
                            "teacher losses need every group to carry enough scored negatives")
        counts = getattr(groups, "group_counts", None)  # an indexed file: checked from its counts, none parsed
        for index in (self._failing(*counts()) if counts is not None else range(len(groups))):
            self._check(self.groups[index])

    def _failing(self, n_pos, n_neg, teacher) -> list[int]:
        """The first group `_check` refuses, found from the index's per-group counts (empty when none is)."""
        need = self.n_passages - np.minimum(self.positives_per_group, n_pos)
        bad = np.zeros(len(n_pos), dtype=bool)
        if self.with_teacher:
            bad |= ~np.asarray(teacher, dtype=bool)
        if self.repeat_negatives:
            bad |= (need > 0) & (n_neg == 0)
        if not (self.fill_from_corpus or self.repeat_negatives):
            bad |= n_neg < need
        return [int(np.argmax(bad))] if bad.any() else []

    def _check(self, group: dict) -> None:
        if self.with_teacher and (group.get("pos_scores") is None or group.get("neg_scores") is None):
            raise DataError(f"{_at(self.path, group)}: has no 'pos_scores'/'neg_scores' but the loss needs a teacher "
                            "score for every passage (megarank mine --teacher writes them)")
        need = self.n_passages - min(self.positives_per_group, len(group["pos"]))
        have = len(group["neg"])
        if self.repeat_negatives and need and not have:
            raise DataError(f"{_at(self.path, group)}: the group has no negatives to repeat but n_negatives={need} "
                            "are needed")
        if not (self.fill_from_corpus or self.repeat_negatives) and have < need:
            raise DataError(f"{_at(self.path, group)}: the group has {have} negatives but n_negatives={need} are "
                            "needed (or set data.repeat_negatives=true)")

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def group_size(self) -> int:
        return self.n_passages

    @property
    def n_negatives(self) -> int:
        """Negatives of a group with one positive (more when a line has fewer positives than positives_per_group)."""
        return self.n_passages - 1

    def get(self, index: int, epoch: int) -> TrainingGroup:
        """Group ``index`` in ``epoch``: its positives, then its negatives, with labels and teacher scores."""
        group = self.groups[index]
        pos_at = rotating_positions(len(group["pos"]), self.positives_per_group, epoch if self.rotate_positives else 0)
        want = self.n_passages - len(pos_at)
        rng = group_rng(self.seed, epoch, index)
        negatives = group["neg"]
        take = min(want, len(negatives))
        neg_at = rng.sample(range(len(negatives)), take) if self.sample_negatives else list(range(take))
        filled: list[str] = []
        if take < want and self.repeat_negatives:
            neg_at = [neg_at[k % take] for k in range(want)]
        elif take < want:
            filled = self._fill(index, want - take, rng)
        pos_labels = group.get("pos_labels") or [1.0] * len(group["pos"])
        passages = [group["pos"][i] for i in pos_at] + [negatives[i] for i in neg_at] + filled
        labels = [float(pos_labels[i]) for i in pos_at] + [0.0] * (len(neg_at) + len(filled))
        teacher = None
        if self.with_teacher:
            teacher = [float(group["pos_scores"][i]) for i in pos_at] + [float(group["neg_scores"][i]) for i in neg_at]
        return TrainingGroup(group["query"], passages, labels, teacher)

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
        raise DataError(f"{_at(self.path, group)}: could not find {count} passages in other groups to fill the "
                        "group's negatives")


class BeirGroupSource:
    """Groups mined from a BEIR split: judged positives plus hard negatives from a first-stage run.

    One group per query with at least one positive (qrels score > 0) and a run entry. Hard negatives are the
    run's top_k minus every document judged relevant (score > 0). A group holds ``positives_per_group`` of the
    query's positives (rotating by epoch; fewer when it has fewer, the free places going to negatives), labelled
    with their qrels grades, then sampled negatives labelled 0. ``teacher``: a scored run (``megarank rerank``
    with a teacher) that must score every positive and every candidate negative: checked here, naming the file,
    query and document. `n_dropped_no_positive` and `n_dropped_no_run` count the judged queries left out.
    """

    def __init__(self, beir: BeirData, run: dict[str, list[str]], n_negatives: int, top_k: int = 100,
                 seed: int = 0, run_path: str | os.PathLike | None = None, positives_per_group: int = 1,
                 teacher: Optional[ScoredRun] = None):
        _check_counts(n_negatives, positives_per_group)
        self.beir = beir
        self.run = run
        self.n_negatives = n_negatives
        self.positives_per_group = positives_per_group
        self.seed = seed
        self.teacher = teacher
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
                self._check(qid, negatives, top_k, need=n_negatives + 1 - min(positives_per_group, len(positives)))
                if teacher is not None:
                    for docid in positives + negatives:
                        teacher.score(qid, docid)  # DataError naming the teacher run, query and document
                self.groups.append((qid, positives, negatives))
        if not self.groups:
            raise DataError(f"{self.run_path}: no query has both a relevant document in {beir.qrels_path} "
                            "and candidates")
        log.info("%d training groups; dropped %d queries without a positive and %d without candidates",
                 len(self.groups), self.n_dropped_no_positive, self.n_dropped_no_run)

    def _check(self, qid: str, negatives: list[str], top_k: int, need: int) -> None:
        if len(negatives) < need:
            raise DataError(f"{self.run_path}: query '{qid}' has {len(negatives)} hard negatives in its top {top_k} "
                            f"after removing judged-relevant documents, but data.n_passages={self.n_negatives + 1} needs "
                            f"{need}; {self._depth_advice(top_k)}")
        missing = next((d for d in negatives if d not in self.beir.corpus), None)
        if missing is not None:
            run_where = self.run.where(qid, missing) if hasattr(self.run, "where") else self.run_path
            raise DataError(f"{run_where}: candidate document '{missing}' of query '{qid}' is not in the corpus")

    def _depth_advice(self, top_k: int) -> str:
        """How to fix a shortage of negatives: the smallest data.negatives_top_k that serves every query."""
        needed, short = 0, []
        for qid, judged in self.beir.qrels.items():
            n_pos = sum(1 for s in judged.values() if s > 0)
            if not n_pos or not self.run.get(qid):
                continue  # dropped anyway
            want = self.n_negatives + 1 - min(self.positives_per_group, n_pos)
            ranked = self.run[qid]
            depths = [i + 1 for i, d in enumerate(ranked) if judged.get(d, 0) <= 0]
            if len(depths) < want:
                short.append(qid)
            else:
                needed = max(needed, depths[want - 1] if want else 0)
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
        """(query id, [positive docids..., negative docids...]) of group `index` in `epoch`."""
        qid, positives, negatives = self.groups[index]
        rng = group_rng(self.seed, epoch, index)
        pos = [positives[i] for i in rotating_positions(len(positives), self.positives_per_group, epoch)]
        return qid, [*pos, *rng.sample(negatives, self.group_size - len(pos))]

    def get(self, index: int, epoch: int) -> TrainingGroup:
        """Group ``index`` in ``epoch`` as texts, with qrels grades as labels and the teacher's scores."""
        qid, docids = self.get_ids(index, epoch)
        judged = self.beir.qrels[qid]
        labels = [float(max(judged.get(d, 0), 0)) for d in docids]
        teacher = [self.teacher.score(qid, d) for d in docids] if self.teacher is not None else None
        return TrainingGroup(self.beir.queries[qid], [self.beir.corpus[d] for d in docids], labels, teacher)
