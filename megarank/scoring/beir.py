"""Rerank a BEIR split's first-stage candidates with the model and measure it (and the first stage itself)."""
import logging
import math
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megarank.data import Run, candidate_pairs, find_run_file, read_beir, read_run
from megarank.scoring.batched import score_batches, scores_by_query, scoring_batcher
from megarank.scoring.metrics import evaluate_run, metrics_for_depth
from megarank.scoring.parts import ScoringParts, pairs_digest
from megarank.scoring.progress import ScoringProgress

log = logging.getLogger(__name__)


def first_stage_scores(run: dict, top_k: int) -> dict:
    """The first stage's own ranking at the same depth, as scores (higher = better)."""
    return {qid: {d: float(top_k - i) for i, d in enumerate(docs[:top_k])} for qid, docs in run.items()}


def count_nan(scores: dict) -> int:
    """Number of NaN scores in {qid: {docid: score}}."""
    return sum(math.isnan(s) for docs in scores.values() for s in docs.values())


def nan_ranked_last(scores: dict) -> dict:
    """NaN scores replaced by -inf: such candidates rank below every scored one (ties by docid, as for any
    equal scores), so a query whose scores all went NaN counts as a ranking by docid, not as an error."""
    return {qid: {d: -math.inf if math.isnan(s) else s for d, s in docs.items()} for qid, docs in scores.items()}


def evaluate_beir(
    model, pair_tokenizer, folder: str, split: str, *, run_path: Optional[str] = None, top_k: int = 100,
    batch_size: Optional[int] = 32, max_queries: Optional[int] = None, nan_last: bool = False, packing: bool = False,
    batch_tokens: int = 0, parts_dir=None, queries_per_part: int = 1000, model_id: Optional[dict] = None,
    progress: bool = True,
):
    """Returns (model_metrics, first_stage_metrics, model_scores {qid: {docid: score}}) on every rank; the metrics
    are ``metrics_for_depth(top_k)`` (nDCG@10, MRR@10, R@10 and R@100 with recall cut-offs capped at ``top_k``).

    Scoring batches hold ``batch_size`` pairs, or with ``batch_tokens`` > 0 as many pairs as keep the tokens the
    model runs (padding included; the stream length when ``packing``) within it, at most ``batch_size`` (if set):
    see ``megarank.data.batcher.Batcher.scoring_batches``. The scores do not depend on the split (fp32 rounding aside).

    ``parts_dir``: score the queries in parts of ``queries_per_part`` (run order) and save each part's scores there
    as soon as it is scored (megarank/scoring/parts.py); a call with the same arguments (``model_id`` names the
    model: checkpoint, dtype) scores only the parts not saved yet. ``progress``: rank 0 logs pairs done, pairs/s
    and ETA every few seconds.

    A NaN score is an error in the metrics unless ``nan_last``, which ranks such candidates last
    (`nan_ranked_last`); the returned scores keep the NaNs either way.
    """
    beir = read_beir(folder, split)
    run_path = run_path or find_run_file(folder, split)
    run = read_run(run_path)
    qids = [q for q in run if q in beir.qrels]
    if max_queries is not None:
        qids = qids[:max_queries]
    run = Run({q: run[q] for q in qids}, path=run_path)
    qrels = {q: beir.qrels[q] for q in qids}
    pairs = candidate_pairs(beir.queries, beir.corpus, run, top_k)  # ids checked here, before any scoring
    truncated_before = pair_tokenizer.truncation.copy()
    batcher = scoring_batcher(pair_tokenizer, packing)  # packing: one stream of whole pairs
    if parts_dir is None:
        part_pairs, parts, done = [pairs], None, []
    else:
        if queries_per_part < 1:
            raise ValueError(f"queries_per_part must be >= 1, got {queries_per_part}")
        part_pairs = [candidate_pairs(beir.queries, beir.corpus, {q: run[q] for q in qids[i : i + queries_per_part]}, top_k)
                      for i in range(0, len(qids), queries_per_part)]
        job = {"data": str(Path(folder).resolve()), "split": split, "run": str(Path(run_path).resolve()),
               "top_k": top_k, "max_queries": max_queries, "queries_per_part": queries_per_part,
               "pairs": len(pairs), "pairs_sha256": pairs_digest(pairs), **(model_id or {})}
        parts = ScoringParts(parts_dir, job)
        done = parts.open(len(part_pairs))
        if done:
            log.info("%s: %d of %d parts already scored; scoring the rest", parts_dir, len(done), len(part_pairs))
    scores = parts.load(done) if parts is not None else {}
    reporter = ScoringProgress(len(pairs), done=sum(len(part_pairs[i]) for i in done),
                               enabled=progress and dist.get_rank() == 0)
    for index, chunk in enumerate(part_pairs):
        if index in done or not chunk:
            continue
        batches = batcher.scoring_batches(chunk, beir.queries, beir.corpus, batch_size=batch_size,
                                          batch_tokens=batch_tokens)
        part = scores_by_query(score_batches(model, reporter.track(batches)))
        if parts is not None:
            parts.save(index, part)
        scores.update(part)
    reporter.finish()
    # every rank encodes every batch, so the counts are the job's; one line per command (or per training run)
    pair_tokenizer.log_truncation_once("evaluation", f"{split} pairs scored", since=truncated_before,
                                       enabled=dist.get_rank() == 0)
    scores = {q: scores[q] for q in qids if q in scores}  # run order
    names = metrics_for_depth(top_k)  # recall cut-offs capped at top_k: named after what was measured
    ours = evaluate_run(qrels, nan_ranked_last(scores) if nan_last else scores, names)
    return ours, evaluate_run(qrels, first_stage_scores(run, top_k), names), scores
