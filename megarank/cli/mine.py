"""`megarank mine`: hard negatives for training groups from a BEIR split and a first-stage run, filtered by a
teacher (a megarank checkpoint / HF reranker scored here, or a scored run) so that likely false negatives are left
out. The rules live in megarank/data/negatives.py (its docstring says what is dropped and why); this module checks
the command line, scores the pairs with ``Reranker`` when the teacher is a model, and writes the outputs.

    megarank mine --data BEIR_DIR --split train --run RUN [--teacher CKPT | --teacher-run SCORED_RUN] --out groups.jsonl

Every argument is checked before torch is imported (paths exist, outputs can be written and are not inputs,
numbers in range) so a typo fails in a second; nothing is written when mining fails (too few negatives, a
missing teacher score): the three outputs (JSONL, ``.audit.json``, ``.audit.png``) are renamed into place together
at the end.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from megarank.cli.preflight import UsageError, beir_problem, check_input, check_output_file

log = logging.getLogger("megarank.mine")

SCORE_CHUNK_PAIRS = 4096  # pairs per Reranker.score call (whole queries: a chunk ends at a query boundary)
RANDOM_POOL_ROUNDS = 4  # a model teacher scores 2K+8 random documents per query, then x4 for queries still short
PROGRESS_SECONDS = 10.0


def add_mine_args(p: argparse.ArgumentParser) -> None:
    from megarank.config import DEFAULT_EVAL_BATCH_TOKENS  # yaml only: no torch here

    p.description = ("Mine hard negatives: for each query with a judged-relevant document, the first-stage run's top "
                     "--depth minus judged-relevant documents, duplicates of a positive's text and (with a teacher) "
                     "candidates scored within the margin of the lowest-scored positive; writes JSONL training groups "
                     "(FlagEmbedding fields), <out>.audit.json and <out>.audit.png.")
    p.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)")
    p.add_argument("--split", default="train", help="qrels split (default: train)")
    p.add_argument("--run", required=True, help="first-stage run (TREC, BEIR TSV or MS MARCO) whose top --depth are "
                                                "the candidates")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", default=None,
                         help="teacher reranker: a megarank checkpoint / run folder or a Hugging Face folder; scores "
                              "every positive and candidate in --depth")
    teacher.add_argument("--teacher-run", default=None,
                         help="teacher scores as a scored run (qid Q0 docid rank score tag, e.g. `megarank rerank` "
                              "output) holding every positive and candidate in --depth")
    p.add_argument("--out", required=True, help="output JSONL; <out>.audit.json and <out>.audit.png are written beside it")
    p.add_argument("--negatives", type=int, default=8, help="hard negatives per query (default 8)")
    p.add_argument("--depth", type=int, default=100, help="run candidates considered per query (default 100)")
    p.add_argument("--margin-type", choices=("perc", "abs"), default="perc",
                   help="perc: keep a negative iff sigmoid(s_neg) < margin x sigmoid(s_pos); abs: iff s_neg < s_pos - "
                        "margin on raw logits; s_pos = the query's lowest positive score (default perc)")
    p.add_argument("--margin", type=float, default=None,
                   help="perc: 0 < margin <= 1 (default 0.95, NV-Retriever's TopK-PercPos); abs: a logit gap >= 0, "
                        "required (no default: the scale is the teacher's); needs a teacher")
    p.add_argument("--range-min", type=int, default=0,
                   help="skip the first R candidates left after the filters (sentence-transformers' range_min; default 0)")
    p.add_argument("--sampling", choices=("top", "random"), default="top",
                   help="which survivors become negatives: top = highest ranked, random = seeded sample (default top)")
    p.add_argument("--random-negatives", type=int, default=0,
                   help="K more negatives drawn uniformly from the corpus (not judged for the query), under the same "
                        "margin with --teacher; not with --teacher-run (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random and --random-negatives (default 0)")
    p.add_argument("--max-queries", type=int, default=None, help="only the first N minable queries (quick checks)")
    p.add_argument("--allow-short", action="store_true",
                   help="write queries that keep fewer negatives than asked (the audit counts them) instead of failing")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="--teacher compute dtype (as `megarank evaluate`; default auto)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_EVAL_BATCH_TOKENS,
                   help=f"--teacher token budget per scoring batch (default {DEFAULT_EVAL_BATCH_TOKENS}; 0 = fixed "
                        "--batch-size)")
    p.add_argument("--batch-size", type=int, default=None, help="--teacher pairs per scoring batch (upper bound)")


def audit_paths(out: str) -> tuple[Path, Path]:
    """(<out>.audit.json, <out>.audit.png): the same names as megarank.data.negatives.audit_paths."""
    out = Path(out)
    return out.with_name(out.name + ".audit.json"), out.with_name(out.name + ".audit.png")


def _number_problems(args) -> list[str]:
    """The range rules of megarank.data.negatives.param_problems, checked here without importing torch (the data
    package imports it); tests/test_mine.py checks both reject the same settings."""
    problems = []
    for flag, value, minimum in (("--negatives", args.negatives, 1), ("--depth", args.depth, 1),
                                 ("--range-min", args.range_min, 0), ("--random-negatives", args.random_negatives, 0)):
        if value < minimum:
            problems.append(f"{flag} must be >= {minimum}, got {value}")
    if args.max_queries is not None and args.max_queries < 1:
        problems.append(f"--max-queries must be >= 1, got {args.max_queries}")
    m = args.margin
    if m is not None:
        if not math.isfinite(m):
            problems.append(f"--margin must be a finite number, got {m!r}")
        elif args.margin_type == "perc" and not 0 < m <= 1:
            problems.append(f"--margin {m} is out of range for --margin-type perc: a negative is kept when "
                            f"sigmoid(its score) < margin x sigmoid(the positive's), so 0 < margin <= 1 (default 0.95)")
        elif args.margin_type == "abs" and m < 0:
            problems.append(f"--margin {m} is out of range for --margin-type abs: a negative is kept when its logit "
                            "is below the positive's minus margin, so margin >= 0")
    elif args.margin_type == "abs" and (args.teacher or args.teacher_run):
        problems.append("--margin-type abs needs an explicit --margin (a logit gap, e.g. 1.0): the scale of a "
                        "teacher's logits is its own")
    if not problems and args.depth - args.range_min < args.negatives:
        problems.append(f"--range-min {args.range_min} leaves {max(args.depth - args.range_min, 0)} of the --depth "
                        f"{args.depth} candidates, fewer than --negatives {args.negatives}")
    if m is not None and not (args.teacher or args.teacher_run):
        problems.append("--margin needs a teacher (--teacher or --teacher-run): without one nothing is scored")
    if args.teacher_run and args.random_negatives > 0:
        problems.append("--random-negatives cannot be used with --teacher-run: documents drawn from the corpus have no "
                        "score in the run, so the margin cannot be checked (use --teacher, or no teacher)")
    if args.batch_tokens < 0:
        problems.append(f"--batch-tokens must be >= 0 (0 = fixed --batch-size), got {args.batch_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1, got {args.batch_size}")
    return problems


def check_mine_args(args) -> None:
    """Everything about the command line that can be checked without torch or the data; raises UsageError."""
    if problems := _number_problems(args):
        raise UsageError(problems[0])
    if problem := beir_problem(args.data, args.split):
        raise UsageError(f"--data {args.data} {problem}")
    check_input(args.run, "--run", "file")
    check_input(args.teacher, "--teacher", "folder")
    check_input(args.teacher_run, "--teacher-run", "file")
    audit_json, audit_png = audit_paths(args.out)
    check_output_file(args.out, "--out")
    check_output_file(str(audit_json), "--out's audit")
    check_output_file(str(audit_png), "--out's audit plot")
    data = Path(args.data)
    inputs = {"--run": args.run, "--teacher-run": args.teacher_run, "--data corpus": data / "corpus.jsonl",
              "--data queries": data / "queries.jsonl", "--data qrels": data / "qrels" / f"{args.split}.tsv"}
    for name, output in (("--out", Path(args.out)), ("--out's audit", audit_json), ("--out's audit plot", audit_png)):
        for flag, path in inputs.items():
            if path is not None and output.resolve() == Path(path).resolve():
                raise UsageError(f"{name} {output} is the {flag} input file; write the groups elsewhere")
        if args.teacher and Path(args.teacher).resolve() in output.resolve().parents:
            raise UsageError(f"{name} {output} is inside the --teacher folder {args.teacher}; write it elsewhere")


class _Progress:
    """A log line every PROGRESS_SECONDS (and at the end): what is done, of how many, how fast."""

    def __init__(self, what: str, unit: str):
        self.what, self.unit = what, unit
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS or done == total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d %s (%.0f %s/s)", self.what, done, total, self.unit, rate, self.unit)


def _score_pairs(reranker, data, by_query: list, scores: dict) -> None:
    """Fill ``scores[(qid, docid)]`` for ``by_query`` = [(qid, [docid...])]: one ``Reranker.score`` call per chunk of
    whole queries (about SCORE_CHUNK_PAIRS pairs), each distinct (query text, passage text) scored once, so a
    document duplicated under another id gets exactly its twin's score."""
    todo = [(qid, [d for d in docs if (qid, d) not in scores]) for qid, docs in by_query]
    total = sum(len(docs) for _, docs in todo)
    progress = _Progress("teacher", "pairs")
    done, chunk = 0, []

    def flush():
        nonlocal done
        keys = [(qid, d) for qid, docs in chunk for d in docs]
        texts = list(dict.fromkeys((data.queries[qid], data.corpus[d]) for qid, d in keys))
        values = reranker.score(texts).tolist() if texts else []
        by_text = dict(zip(texts, values))
        for qid, d in keys:
            scores[(qid, d)] = by_text[(data.queries[qid], data.corpus[d])]
        done += len(keys)
        chunk.clear()
        progress(done, total)

    pending = 0
    for qid, docs in todo:
        if docs:
            chunk.append((qid, docs))
            pending += len(docs)
        if pending >= SCORE_CHUNK_PAIRS:
            flush()
            pending = 0
    if chunk:
        flush()


def _mine_with_model(args, data, miner):
    """(result, whether this is rank 0): score with the --teacher model, then mine; random negatives are scored in
    rounds (a larger pool for the queries whose pool ran out before K passed the margin)."""
    import torch.distributed as dist

    from megarank.scoring import Reranker

    reranker = Reranker.from_checkpoint(args.teacher, dtype=args.dtype, batch_tokens=args.batch_tokens,
                                        batch_size=args.batch_size)
    try:
        rank0 = dist.get_rank() == 0
        k = args.random_negatives
        pool = 2 * k + 8 if k else None
        scores: dict = {}
        _score_pairs(reranker, data, miner.pairs_by_query(pool or 0), scores)
        result = miner.mine(scores, random_pool=pool, progress=_Progress("mining", "queries"))
        for _ in range(RANDOM_POOL_ROUNDS):
            if not result.needs_more_random:
                break
            pool *= 4
            _score_pairs(reranker, data, miner.pairs_by_query(pool, result.needs_more_random), scores)
            result = miner.mine(scores, random_pool=pool, progress=_Progress("mining", "queries"))
    finally:
        reranker.close()
    return result, rank0


def run_mine(args) -> int:
    check_mine_args(args)
    from megarank.data import read_beir, read_run, read_scored_run
    from megarank.data.negatives import MiningParams, NegativeMiner, write_mined

    params = MiningParams(negatives=args.negatives, depth=args.depth, margin_type=args.margin_type, margin=args.margin,
                          range_min=args.range_min, sampling=args.sampling, random_negatives=args.random_negatives,
                          seed=args.seed, max_queries=args.max_queries, allow_short=args.allow_short)
    data = read_beir(args.data, args.split)
    run = read_run(args.run)
    miner = NegativeMiner(data, run, params)
    log.info("mining %d queries (%d without a positive, %d without candidates skipped)", len(miner.queries),
             miner.no_positive, miner.no_candidates)
    rank0 = True
    if args.teacher:
        result, rank0 = _mine_with_model(args, data, miner)
    else:
        teacher = read_scored_run(args.teacher_run) if args.teacher_run else None
        result = miner.mine(teacher, progress=_Progress("mining", "queries"))
    result.check()
    if rank0:
        sources = {"data": str(args.data), "split": args.split, "run": str(args.run),
                   "teacher": None if args.teacher is None else str(args.teacher),
                   "teacher_run": None if args.teacher_run is None else str(args.teacher_run)}
        out, audit_json, audit_png = write_mined(args.out, result, data, sources)
        print(result.summary(str(out)) + f" (audit: {audit_json.name}, {audit_png.name})", flush=True)
    return 0
