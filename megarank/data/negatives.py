"""Hard-negative mining: training groups ``{"query", "pos_doc", "neg_doc", ...}`` from a BEIR split, a first-stage
run and, optionally, a teacher's scores (``megarank mine``; the command line is megarank/cli/mine.py).

Pure Python (no torch): the teacher's scores come in as a lookup ``(qid, docid) -> float`` (a ``ScoredRun`` read by
``read_scored_run``, a ``{(qid, docid): score}`` dict the CLI fills by scoring with ``Reranker``, or a callable).

Per query with a judged-relevant document (qrels > 0) and run candidates:

* positives: the judged-relevant documents, best grade first (ties by docid), as ``BeirGroupSource`` orders them;
* candidates: the run's top ``depth``, in rank order, minus
  - ``judged``: documents judged relevant (qrels > 0). Documents judged *non*-relevant (qrels <= 0) stay
    candidates: they are the one kind of negative a person has checked, and ``megarank train`` on BEIR data keeps
    them too (groups.py, ``judged.get(d, 0) <= 0``); they still go through the text and margin filters;
  - ``duplicate_text``: the text equals a positive's (whitespace collapsed): the same passage under another id,
    which would teach the model to rank a positive below itself;
  - ``duplicate_negative``: the text equals a negative kept earlier in rank order;
  - ``near_positive``: the teacher scores it within the margin of the positives (below);
  - ``range_min``: the first ``range_min`` candidates left after the filters above (sentence-transformers'
    ``range_min``, applied as there after the margin: util/hard_negatives.py, "remove the first range_min");
* ``negatives`` of the rest: ``top`` = highest ranked first, ``random`` = a seeded sample (written in rank order);
* ``random_negatives`` more drawn uniformly from the corpus (never judged for the query, not a positive's text,
  not already chosen), subject to the same margin when there is a teacher.

The margin (NV-Retriever's TopK-PercPos; NeMo AutoModel's ``hard_neg_margin`` / ``hard_neg_margin_type``) compares a
candidate's score with ``s_ref``, the *lowest* positive score of the query: with several positives a negative
must score below every one of them, the conservative choice that NeMo AutoModel and sentence-transformers also make
(``min_pos_scores``; "we will use the _minimum_ positive score"). A cross-encoder's raw logits can be negative, and
``s_neg < 0.95 * s_ref`` turns around when ``s_ref < 0`` (sentence-transformers issue #3819), so:

* ``perc``: keep iff ``sigmoid(s_neg) < margin * sigmoid(s_ref)`` (0 < margin <= 1; default 0.95);
* ``abs``:  keep iff ``s_neg < s_ref - margin`` on raw logits (margin >= 0; no default: a logit gap depends on
  the teacher's scale).

The comparison is strict (NeMo and sentence-transformers keep a tie): a candidate scoring exactly like the
positive is not a safe negative, even at ``--margin 1`` / ``--margin 0``.

Randomness is seeded by strings (``random.Random("megarank-mine:{seed}:{qid}")``, hashed with SHA-512), so the output
is the same, byte for byte, on every run, machine and Python version with the same inputs and seed.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from .errors import DataError
from .readers import BeirData, Run

log = logging.getLogger(__name__)

MARGIN_TYPES = ("perc", "abs")
SAMPLINGS = ("top", "random")
DEFAULT_PERC_MARGIN = 0.95
QUANTILES = (("min", 0.0), ("p05", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p95", 0.95), ("max", 1.0))
REASONS = ("judged", "empty_text", "duplicate_text", "duplicate_negative", "near_positive", "range_min")

RANDOM_WITH_RUN = ("--random-negatives cannot be used with --teacher-run: documents drawn from the corpus have no "
                   "score in the run, so the margin cannot be checked (use --teacher, or no teacher)")

TeacherScores = Union[Mapping, Callable[[str, str], float], Any]  # a ScoredRun, {(qid, docid): score} or a callable


@dataclass(frozen=True)
class MiningParams:
    """The knobs of one mining run; each name is the ``megarank mine`` flag with dashes (``random_negatives`` is
    ``--random-negatives``). ``margin`` None means the default of ``margin_type`` (0.95 for perc; abs has none).
    Invalid values raise ValueError naming the flag."""

    negatives: int = 8
    depth: int = 100
    margin_type: str = "perc"
    margin: Optional[float] = None
    range_min: int = 0
    sampling: str = "top"
    random_negatives: int = 0
    seed: int = 0
    max_queries: Optional[int] = None
    allow_short: bool = False

    def __post_init__(self):
        problems = param_problems(self)
        if problems:
            raise ValueError(problems[0])

    def effective_margin(self) -> float:
        """The margin the rule uses (the perc default filled in)."""
        if self.margin is None:
            if self.margin_type == "abs":
                raise ValueError("--margin-type abs needs an explicit --margin (a logit gap, e.g. 1.0)")
            return DEFAULT_PERC_MARGIN
        return float(self.margin)


def param_problems(p: MiningParams, teacher: Optional[str] = "any") -> list[str]:
    """One sentence per invalid setting, naming its flag. ``teacher``: None (no teacher), "model", "run" or "any"
    (not known yet: only the rules that do not depend on it)."""
    problems = []

    def integer(value, flag, minimum):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{flag} must be an integer, got {value!r}")
        elif value < minimum:
            problems.append(f"{flag} must be >= {minimum}, got {value}")

    integer(p.negatives, "--negatives", 1)
    integer(p.depth, "--depth", 1)
    integer(p.range_min, "--range-min", 0)
    integer(p.random_negatives, "--random-negatives", 0)
    if isinstance(p.seed, bool) or not isinstance(p.seed, int):
        problems.append(f"--seed must be an integer, got {p.seed!r}")
    if p.max_queries is not None:
        integer(p.max_queries, "--max-queries", 1)
    if p.margin_type not in MARGIN_TYPES:
        problems.append(f"--margin-type must be one of {', '.join(MARGIN_TYPES)}, got {p.margin_type!r}")
    if p.sampling not in SAMPLINGS:
        problems.append(f"--sampling must be one of {', '.join(SAMPLINGS)}, got {p.sampling!r}")
    if p.margin is not None:
        m = p.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            problems.append(f"--margin must be a finite number, got {m!r}")
        elif p.margin_type == "perc" and not 0 < m <= 1:
            problems.append(f"--margin {m} is out of range for --margin-type perc: a negative is kept when "
                            f"sigmoid(its score) < margin x sigmoid(the positive's), so 0 < margin <= 1 (default 0.95)")
        elif p.margin_type == "abs" and m < 0:
            problems.append(f"--margin {m} is out of range for --margin-type abs: a negative is kept when its logit "
                            "is below the positive's minus margin, so margin >= 0")
    elif p.margin_type == "abs" and teacher not in (None, "any"):
        problems.append("--margin-type abs needs an explicit --margin (a logit gap, e.g. 1.0): the scale of a "
                        "teacher's logits is its own")
    if (not problems and isinstance(p.depth, int) and isinstance(p.range_min, int)
            and isinstance(p.negatives, int) and p.depth - p.range_min < p.negatives):
        problems.append(f"--range-min {p.range_min} leaves {max(p.depth - p.range_min, 0)} of the --depth "
                        f"{p.depth} candidates, fewer than --negatives {p.negatives}")
    if teacher is None and p.margin is not None:
        problems.append("--margin needs a teacher (--teacher or --teacher-run): without one nothing is scored")
    if teacher == "run" and isinstance(p.random_negatives, int) and p.random_negatives > 0:
        problems.append(RANDOM_WITH_RUN)
    return problems


# ------------------------------------------------------------------------------------------------ small helpers


def sigmoid(x: float) -> float:
    """The logistic function without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _norm(text: str) -> str:
    """Text compared for duplicates: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())


def margin_rule(params: MiningParams) -> Callable[[float, float], bool]:
    """``keeps(s_neg, s_ref)``: whether a candidate scored ``s_neg`` is a safe negative for a query whose lowest
    positive scored ``s_ref`` (the module docstring has the rule and why)."""
    margin = params.effective_margin()
    if params.margin_type == "perc":
        return lambda s_neg, s_ref: sigmoid(s_neg) < margin * sigmoid(s_ref)
    return lambda s_neg, s_ref: s_neg < s_ref - margin


def keeps(params: MiningParams, s_neg: float, s_ref: float) -> bool:
    """``margin_rule(params)(s_neg, s_ref)``."""
    return margin_rule(params)(s_neg, s_ref)


def quantiles(values: Sequence[float]) -> Optional[dict]:
    """count, mean and the QUANTILES (linear interpolation) of ``values``; None when empty."""
    if not values:
        return None
    v = sorted(values)
    out: dict[str, float] = {"count": len(v), "mean": math.fsum(v) / len(v)}
    for name, q in QUANTILES:
        pos = q * (len(v) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(v) - 1)
        out[name] = v[lo] + (v[hi] - v[lo]) * (pos - lo)
    return out


def teacher_lookup(teacher: TeacherScores) -> Optional[Callable[[str, str], float]]:
    """``(qid, docid) -> score`` for any accepted kind of teacher scores; a missing score raises DataError naming
    the query and document (and the run file for a ScoredRun)."""
    if teacher is None:
        return None
    if hasattr(teacher, "score") and callable(teacher.score):  # ScoredRun: its own error names the file
        return teacher.score
    if isinstance(teacher, Mapping):
        def get(qid: str, docid: str) -> float:
            try:
                return teacher[(qid, docid)]
            except KeyError:
                raise DataError(f"the teacher scores have no score for document '{docid}' of query '{qid}'") from None
        return get
    if callable(teacher):
        return teacher
    raise TypeError(f"teacher scores must be a ScoredRun, a {{(qid, docid): score}} mapping or a callable, "
                    f"got {type(teacher).__name__}")


def _where(teacher: TeacherScores) -> str:
    path = getattr(teacher, "path", None)
    return f"{path}: " if path else ""


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class MinedGroup:
    """One output line: a query, its positives (best grade first) and its negatives (hard ones in rank order, then
    random ones), with the teacher's scores when there is a teacher."""

    qid: str
    pos_ids: list[str]
    pos_labels: list[int]
    neg_ids: list[str]
    pos_scores: Optional[list[float]] = None
    neg_scores: Optional[list[float]] = None

    def record(self, data: BeirData) -> dict:
        """The JSONL object, FlagEmbedding's field names: ``read_jsonl_groups`` reads query, pos_doc, neg_doc,
        pos_scores, neg_scores (teacher logits) and pos_labels (qrels grades), and ignores qid, pos_ids, neg_ids."""
        obj: dict[str, Any] = {"query": data.queries[self.qid],
                               "pos_doc": [data.corpus[d] for d in self.pos_ids],
                               "neg_doc": [data.corpus[d] for d in self.neg_ids]}
        if self.pos_scores is not None:
            obj["pos_scores"] = self.pos_scores
            obj["neg_scores"] = self.neg_scores
        obj.update(qid=self.qid, pos_ids=self.pos_ids, neg_ids=self.neg_ids, pos_labels=self.pos_labels)
        return obj


@dataclass
class MiningResult:
    """Groups (one per query, in qrels order) and the audit; ``short`` = [(qid, hard kept, random kept)] of the
    queries below ``negatives`` / ``random_negatives``; ``message`` says why and what settings would work."""

    params: MiningParams
    groups: list[MinedGroup]
    audit: dict
    short: list[tuple[str, int, int]]
    message: Optional[str]
    needs_more_random: list[str] = field(default_factory=list)  # queries whose scored random pool ran out
    plot: dict = field(default_factory=dict, repr=False)

    def check(self) -> "MiningResult":
        """Raise DataError (nothing is written) when queries fell short, unless ``allow_short``."""
        if self.short and not self.params.allow_short:
            raise DataError(self.message)
        return self

    def summary(self, out: Optional[str] = None) -> str:
        t = self.audit["totals"]
        per = t["negatives_per_query"]
        spread = f"{per['min']}" if per["min"] == per["max"] else f"{per['min']}-{per['max']}"
        short = f", {t['queries_short']} short (--allow-short)" if t["queries_short"] else ""
        dest = f" -> {out}" if out else ""
        return (f"mined {t['queries_written']} queries{dest}: {spread} negatives per query{short}; dropped "
                f"{t['dropped_judged']} judged-relevant, {t['dropped_duplicate_text']} duplicates of a positive's text, "
                f"{t['dropped_near_positive']} near the positive, {t['dropped_duplicate_negative']} repeated negatives, "
                f"{t['dropped_range_min']} by --range-min")


# ------------------------------------------------------------------------------------------------ the miner


@dataclass
class _Query:
    qid: str
    positives: list[str]
    labels: list[int]
    ranked: list[str]  # the whole run of the query (the advice looks beyond depth)
    judged: dict[str, int]
    pos_texts: set[str]


class _RandomStream:
    """Distinct eligible corpus documents for one query in a seeded order; every prefix is stable, so a larger
    pool extends a smaller one."""

    def __init__(self, rng: random.Random, ids: Sequence[str], eligible: Callable[[str], bool]):
        self.rng, self.ids, self.eligible = rng, ids, eligible
        self.drawn: list[str] = []
        self.seen: set[str] = set()
        self.exhausted = False

    def get(self, i: int) -> Optional[str]:
        """The i-th document of the stream, or None when the corpus has no more."""
        while len(self.drawn) <= i and not self.exhausted:
            self._draw()
        return self.drawn[i] if i < len(self.drawn) else None

    def _draw(self) -> None:
        n = len(self.ids)
        while len(self.seen) < n:
            if n - len(self.seen) <= 64 and 2 * len(self.seen) >= n:  # nearly all seen: shuffle the rest instead
                rest = [d for d in self.ids if d not in self.seen]
                self.rng.shuffle(rest)
                self.seen.update(rest)
                self.drawn.extend(d for d in rest if self.eligible(d))
                break
            d = self.ids[self.rng.randrange(n)]
            if d in self.seen:
                continue
            self.seen.add(d)
            if self.eligible(d):
                self.drawn.append(d)
                return
        self.exhausted = True


class NegativeMiner:
    """Mines one BEIR split. Build it (reads nothing, checks the run's candidate ids), ask ``pairs_by_query`` which
    (query, document) pairs a teacher must score, then ``mine(teacher_scores)``."""

    def __init__(self, data: BeirData, run: Run, params: MiningParams):
        self.data, self.run, self.params = data, run, params
        self.run_path = getattr(run, "path", "<run>")
        self.no_positive = self.no_candidates = 0
        self.queries: list[_Query] = []
        for qid, judged in data.qrels.items():
            if params.max_queries is not None and len(self.queries) >= params.max_queries:
                break
            positives = sorted((d for d, s in judged.items() if s > 0 and _norm(data.corpus.get(d, ""))),
                               key=lambda d: (-judged[d], d))
            if not positives:
                self.no_positive += 1
                continue
            ranked = run.get(qid)
            if not ranked:
                self.no_candidates += 1
                continue
            missing = next((d for d in ranked[:params.depth] if d not in data.corpus), None)
            if missing is not None:
                where = run.where(qid, missing) if hasattr(run, "where") else self.run_path
                raise DataError(f"{where}: candidate document '{missing}' of query '{qid}' is not in the corpus")
            self.queries.append(_Query(qid, positives, [judged[d] for d in positives], list(ranked), judged,
                                       {_norm(data.corpus[d]) for d in positives}))
        if not self.queries:
            raise DataError(f"{self.run_path}: no query has both a relevant document in {data.qrels_path} and "
                            "candidates in the run")
        self._ids: Optional[list[str]] = None
        self._streams: dict[str, _RandomStream] = {}

    # ------------------------------------------------------------------------------------------- what to score

    def _stream(self, q: _Query) -> _RandomStream:
        if q.qid not in self._streams:
            if self._ids is None:
                self._ids = sorted(self.data.corpus)

            def eligible(d: str) -> bool:
                text = _norm(self.data.corpus[d])
                return d not in q.judged and bool(text) and text not in q.pos_texts

            rng = random.Random(f"megarank-mine-random:{self.params.seed}:{q.qid}")
            self._streams[q.qid] = _RandomStream(rng, self._ids, eligible)
        return self._streams[q.qid]

    def pairs_by_query(self, random_pool: int = 0, qids: Optional[Iterable[str]] = None) -> list[tuple[str, list[str]]]:
        """[(qid, [docid, ...])] a teacher must score: the positives, every candidate in ``depth`` that is not
        judged relevant, and the first ``random_pool`` documents of the query's random stream (when
        ``random_negatives`` > 0). ``qids``: only these queries."""
        wanted = None if qids is None else set(qids)
        out = []
        for q in self.queries:
            if wanted is not None and q.qid not in wanted:
                continue
            docs = list(q.positives)
            docs += [d for d in q.ranked[:self.params.depth]
                     if q.judged.get(d, 0) <= 0 and _norm(self.data.corpus[d])]
            if self.params.random_negatives:
                stream = self._stream(q)
                docs += [d for d in (stream.get(i) for i in range(random_pool)) if d is not None]
            out.append((q.qid, list(dict.fromkeys(docs))))
        return out

    # ------------------------------------------------------------------------------------------------ mining

    def mine(self, teacher: TeacherScores = None, random_pool: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> MiningResult:
        """Mine every query. ``teacher``: the scores (None: no margin, no score fields). ``random_pool``: look at
        no more than this many random documents per query (the ones a model teacher scored; None = as many as
        needed). Never raises for short queries: call ``result.check()``."""
        p = self.params
        lookup = teacher_lookup(teacher)
        if lookup is not None:
            if problems := param_problems(p, "model"):
                raise ValueError(problems[0])
            keep = margin_rule(p)
        where = _where(teacher)
        groups, rows, short = [], [], []
        needs_more: list[str] = []
        kept_ratio, kept_gap, drop_ratio, drop_gap, rand_ratio, rand_gap = [], [], [], [], [], []
        plot = {"positive": [], "kept": [], "dropped": [], "kept_ranks": [], "dropped_ranks": []}

        def score_of(qid: str, docid: str, role: str) -> float:
            try:
                s = lookup(qid, docid)
            except (DataError, KeyError):
                raise DataError(f"{where}has no teacher score for {role} '{docid}' of query '{qid}' (a teacher run must "
                                f"score every positive and every candidate in --depth {p.depth})") from None
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise DataError(f"{where}the teacher's score {s!r} of {role} '{docid}' of query '{qid}' is not a finite number")
            return float(s)

        for n_done, q in enumerate(self.queries, start=1):
            corpus = self.data.corpus
            counts = dict.fromkeys(REASONS, 0)
            dropped: list[dict] = []
            pos_scores = s_ref = None
            if lookup is not None:
                pos_scores = [score_of(q.qid, d, "positive document") for d in q.positives]
                s_ref = min(pos_scores)
                plot["positive"] += pos_scores
            survivors: list[tuple[int, str, Optional[float]]] = []
            neg_texts: set[str] = set()
            candidates = q.ranked[:p.depth]
            for rank, d in enumerate(candidates, start=1):
                if q.judged.get(d, 0) > 0:
                    counts["judged"] += 1
                    continue
                text = _norm(corpus[d])
                if not text:
                    counts["empty_text"] += 1
                    continue
                s = score_of(q.qid, d, "candidate document") if lookup is not None else None
                if text in q.pos_texts:
                    counts["duplicate_text"] += 1
                    dropped.append({"docid": d, "rank": rank, "reason": "duplicate_text", "score": s})
                    continue
                if text in neg_texts:
                    counts["duplicate_negative"] += 1
                    continue
                if s is not None and not keep(s, s_ref):
                    counts["near_positive"] += 1
                    dropped.append({"docid": d, "rank": rank, "reason": "near_positive", "score": s})
                    drop_ratio.append(sigmoid(s) / sigmoid(s_ref))
                    drop_gap.append(s_ref - s)
                    plot["dropped"].append(s)
                    plot["dropped_ranks"].append(rank)
                    continue
                neg_texts.add(text)
                survivors.append((rank, d, s))
            counts["range_min"] = min(p.range_min, len(survivors))
            pool = survivors[p.range_min:]
            if p.sampling == "top" or len(pool) <= p.negatives:
                chosen = pool[:p.negatives]
            else:
                rng = random.Random(f"megarank-mine:{p.seed}:{q.qid}")
                chosen = sorted(rng.sample(pool, p.negatives))
            for rank, d, s in chosen:
                plot["kept_ranks"].append(rank)
                if s is not None:
                    kept_ratio.append(sigmoid(s) / sigmoid(s_ref))
                    kept_gap.append(s_ref - s)
                    plot["kept"].append(s)
            neg_ids = [d for _, d, _ in chosen]
            neg_scores = [s for _, _, s in chosen]

            random_kept = random_near = 0
            if p.random_negatives:
                taken_ids = set(neg_ids)
                taken_texts = {_norm(corpus[d]) for d in neg_ids}
                stream = self._stream(q)
                i = 0
                while random_kept < p.random_negatives:
                    if random_pool is not None and i >= random_pool:
                        if stream.get(i) is not None:
                            needs_more.append(q.qid)
                        break
                    d = stream.get(i)
                    i += 1
                    if d is None:
                        break
                    text = _norm(corpus[d])
                    if d in taken_ids or text in taken_texts:
                        continue
                    s = score_of(q.qid, d, "random document") if lookup is not None else None
                    if s is not None and not keep(s, s_ref):
                        random_near += 1
                        drop_ratio.append(sigmoid(s) / sigmoid(s_ref))
                        drop_gap.append(s_ref - s)
                        plot["dropped"].append(s)
                        continue
                    if s is not None:
                        rand_ratio.append(sigmoid(s) / sigmoid(s_ref))
                        rand_gap.append(s_ref - s)
                        plot["kept"].append(s)
                    taken_ids.add(d)
                    taken_texts.add(text)
                    neg_ids.append(d)
                    neg_scores.append(s)
                    random_kept += 1

            hard_short = max(p.negatives - len(chosen), 0)
            random_short = max(p.random_negatives - random_kept, 0)
            if hard_short or random_short:
                short.append((q.qid, len(chosen), random_kept))
            groups.append(MinedGroup(q.qid, list(q.positives), list(q.labels), neg_ids,
                                     pos_scores, neg_scores if lookup is not None else None))
            rows.append({"qid": q.qid, "candidates": len(candidates), "kept": len(chosen), "random_kept": random_kept,
                         **{f"dropped_{r}": counts[r] for r in REASONS},
                         "random_dropped_near_positive": random_near,
                         "unused": len(pool) - len(chosen), "short_by": hard_short + random_short,
                         "s_pos_ref": s_ref, "dropped": dropped})
            if progress is not None:
                progress(n_done, len(self.queries))

        message = self._shortfall_message(short, lookup) if short else None
        audit = self._audit(rows, short, lookup is not None,
                            {"kept": (kept_ratio, kept_gap), "random_kept": (rand_ratio, rand_gap),
                             "dropped_near_positive": (drop_ratio, drop_gap)}, plot)
        return MiningResult(p, groups, audit, short, message, needs_more, plot)

    # ------------------------------------------------------------------------------------------------ advice

    def _depth_needed(self, q: _Query, lookup) -> tuple[Optional[int], bool]:
        """(the smallest --depth that gives q ``range_min + negatives`` survivors, whether that is a lower bound
        because documents beyond the scored depth have no teacher score); (None, _) when the whole run is short."""
        p = self.params
        need = p.range_min + p.negatives
        found, bound = 0, False
        texts: set[str] = set()
        s_ref = keep = None
        if lookup is not None:
            s_ref = min(lookup(q.qid, d) for d in q.positives)
            keep = margin_rule(p)
        for rank, d in enumerate(q.ranked, start=1):
            if q.judged.get(d, 0) > 0 or d not in self.data.corpus:
                continue
            text = _norm(self.data.corpus[d])
            if not text or text in q.pos_texts or text in texts:
                continue
            if lookup is not None:
                try:
                    s = lookup(q.qid, d)
                except (DataError, KeyError):
                    bound = True  # not scored: counted as if it passed, so the depth is a lower bound
                else:
                    if not (isinstance(s, (int, float)) and math.isfinite(s) and keep(s, s_ref)):
                        continue
            texts.add(text)
            found += 1
            if found >= need:
                return rank, bound
        return None, bound

    def _shortfall_message(self, short: list[tuple[str, int, int]], lookup) -> str:
        p = self.params
        total = len(self.queries)
        parts = []
        hard = [(qid, k) for qid, k, _ in short if k < p.negatives]
        if hard:
            qid, k = hard[0]
            fewest = min(k for _, k in hard)
            first = (f"{len(hard)} of {total} queries keep fewer than --negatives {p.negatives} hard negatives "
                     f"(e.g. query '{qid}' keeps {k})")
            options = [f"--negatives {fewest} (the most every query keeps)" if fewest >= 1 else
                       "no --negatives serves every query (some keep none)"]
            by_qid = {q.qid: q for q in self.queries}
            depths = [(qid, *self._depth_needed(by_qid[qid], lookup)) for qid, _ in hard]
            unserved = [qid for qid, d, _ in depths if d is None]
            if unserved:
                options.append(f"no --depth serves query '{unserved[0]}' ({len(unserved)} such queries: their whole "
                               "run is too short after the filters)")
            else:
                deepest = max(d for _, d, _ in depths)
                if any(b for _, _, b in depths):
                    options.append(f"--depth {deepest} or more (documents beyond --depth {p.depth} have no teacher "
                                   "score, so it may take more)")
                else:
                    options.append(f"--depth {deepest}")
            if lookup is not None:
                options.append(f"a looser margin (it is --margin-type {p.margin_type} --margin "
                               f"{DEFAULT_PERC_MARGIN if p.margin is None else p.margin}: candidates "
                               "the teacher scores near or above the weakest positive are dropped)")
            if p.range_min:
                options.append(f"a smaller --range-min (it is {p.range_min})")
            parts.append(f"{first}; settings that work: {' or '.join(options)}")
        rand = [(qid, r) for qid, _, r in short if r < p.random_negatives]
        if rand:
            qid, r = rand[0]
            fewest = min(r for _, r in rand)
            parts.append(f"{len(rand)} of {total} queries keep fewer than --random-negatives {p.random_negatives} "
                         f"random negatives (e.g. query '{qid}' keeps {r}): use --random-negatives {fewest}")
        return "; ".join(parts) + "; or pass --allow-short to write them with fewer (nothing was written)"

    # ------------------------------------------------------------------------------------------------- audit

    def _audit(self, rows: list[dict], short, scored: bool, margins: dict, plot: dict) -> dict:
        p = self.params
        per_query = [r["kept"] + r["random_kept"] for r in rows]
        totals = {"queries_judged": len(self.data.qrels), "queries_without_positive": self.no_positive,
                  "queries_without_candidates": self.no_candidates, "queries_written": len(rows),
                  "queries_short": len(short),
                  "negatives_per_query": {"min": min(per_query), "max": max(per_query),
                                          "mean": math.fsum(per_query) / len(per_query)},
                  "candidates": sum(r["candidates"] for r in rows)}
        for key in ("kept", "random_kept", *(f"dropped_{r}" for r in REASONS), "random_dropped_near_positive", "unused"):
            totals[key] = sum(r[key] for r in rows)
        if scored:
            margin_stats = {name: {"ratio": quantiles(ratio), "gap": quantiles(gap)}
                            for name, (ratio, gap) in margins.items()}
            margin_stats["scores"] = {"positive": quantiles(plot["positive"]), "kept": quantiles(plot["kept"]),
                                      "dropped_near_positive": quantiles(plot["dropped"])}
        else:
            margin_stats = None
        params = asdict(p)
        params["margin"] = p.effective_margin() if scored else None
        return {"parameters": params,
                "rule": (None if not scored else
                         "keep iff sigmoid(s_neg) < margin * sigmoid(s_pos_ref)" if p.margin_type == "perc" else
                         "keep iff s_neg < s_pos_ref - margin"),
                "s_pos_ref": "the lowest teacher score of the query's positives",
                "totals": totals,
                "margins": margin_stats,  # ratio = sigmoid(s_neg) / sigmoid(s_pos_ref); gap = s_pos_ref - s_neg
                "queries": rows}


def mine_negatives(data: BeirData, run: Run, teacher: TeacherScores, params: MiningParams) -> MiningResult:
    """Mine every query and check the shortfall (DataError unless ``params.allow_short``): the whole library call
    for a teacher run or no teacher (a model teacher scores ``NegativeMiner.pairs_by_query`` first)."""
    if teacher is not None and params.random_negatives:
        raise ValueError(RANDOM_WITH_RUN)
    return NegativeMiner(data, run, params).mine(teacher).check()


# ------------------------------------------------------------------------------------------------ writing


def audit_paths(out: Union[str, os.PathLike]) -> tuple[Path, Path]:
    """(<out>.audit.json, <out>.audit.png)."""
    out = Path(out)
    return out.with_name(out.name + ".audit.json"), out.with_name(out.name + ".audit.png")


def plot_png(result: MiningResult) -> bytes:
    """The audit plot: teacher-score histograms of positives, kept and dropped negatives (with a teacher), and
    the first-stage ranks of kept and dropped candidates. Rendered with the Agg canvas (no display, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plot = result.plot
    scored = bool(plot.get("positive"))
    fig = Figure(figsize=(11 if scored else 6, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if scored else 1, squeeze=False)[0]
    if scored:
        ax = axes[0]
        values = plot["positive"] + plot["kept"] + plot["dropped"]
        lo, hi = min(values), max(values)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        for name, color in (("positive", "tab:green"), ("kept", "tab:blue"), ("dropped", "tab:red")):
            if plot[name]:
                label = {"positive": "positives", "kept": "kept negatives",
                         "dropped": "dropped (near positive)"}[name]
                ax.hist(plot[name], bins=bins, alpha=0.5, color=color, label=f"{label} ({len(plot[name])})")
        ax.set_xlabel("teacher score (logit)")
        ax.set_ylabel("count")
        ax.set_title(f"teacher scores, margin {result.params.margin_type} {result.params.effective_margin()}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    ranks = plot["kept_ranks"] + plot["dropped_ranks"]
    if ranks:
        bins = list(range(1, max(ranks) + 2)) if max(ranks) <= 50 else 50
        if plot["kept_ranks"]:
            ax.hist(plot["kept_ranks"], bins=bins, alpha=0.5, color="tab:blue", label="kept negatives")
        if plot["dropped_ranks"]:
            ax.hist(plot["dropped_ranks"], bins=bins, alpha=0.5, color="tab:red", label="dropped (near positive)")
        ax.legend(fontsize=8)
    ax.set_xlabel("first-stage rank")
    ax.set_ylabel("count")
    ax.set_title("first-stage ranks: kept vs dropped candidates")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _audit_text(audit: dict) -> str:
    """The audit as JSON: indented, except one line per query (an audit of a million queries stays greppable)."""
    head = {k: v for k, v in audit.items() if k != "queries"}
    rows = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in audit.get("queries", []))
    return json.dumps(head, indent=1, ensure_ascii=False)[:-2] + ',\n "queries": [\n' + rows + "\n ]\n}\n"


def write_mined(out: Union[str, os.PathLike], result: MiningResult, data: BeirData,
                sources: Optional[dict] = None) -> tuple[Path, Path, Path]:
    """Write ``out`` (JSONL, one group per line), ``<out>.audit.json`` and ``<out>.audit.png``, each through a
    temporary sibling renamed into place only once all three are complete (megarank.files.atomic_write), so an
    error leaves the old files, never half-written ones. ``sources``: the inputs to record in the audit."""
    from megarank.files import atomic_write

    audit_json, audit_png = audit_paths(out)
    audit = dict(result.audit)
    if sources:
        audit = {"sources": sources, **audit}
    png = plot_png(result)
    with atomic_write(out) as f_out, atomic_write(audit_json) as f_json, atomic_write(audit_png) as f_png:
        for group in result.groups:
            f_out.write(json.dumps(group.record(data), ensure_ascii=False) + "\n")
        f_json.write(_audit_text(audit))
        f_png.flush()
        f_png.buffer.write(png)  # the one atomic writer is a text file: its binary buffer takes the PNG's bytes
    return Path(out), audit_json, audit_png
