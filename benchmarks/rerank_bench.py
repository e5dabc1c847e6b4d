"""Reranking throughput: megarank's scorer (what `megarank rerank` runs) vs `sentence_transformers.CrossEncoder`
on the same exported model and the same candidates, at fp32 and bf16 side by side in one process (issue 11).

    python benchmarks/rerank_bench.py                                  # SciFact-train BM25 top-100, SmolLM2-135M
    python benchmarks/rerank_bench.py --max-queries 10 --top-k 100 --dtypes fp32,bf16 --json /tmp/rerank.json
    python benchmarks/rerank_bench.py --checkpoint runs/q/train --hf runs/q/hf --data ../shared/data/cranfield --split test

Model: by default SmolLM2-135M from the converter cache (scripts/build_smollm2_cache.py), converted with
``checkpoint_tools hf-to-megatron`` (a new, random score head: speed and score agreement do not depend on it) and
exported back with ``megatron-to-hf``; or ``--checkpoint`` (a megarank checkpoint) and ``--hf`` (its export).
Candidates: the first ``--max-queries`` judged queries of the split's first-stage run (BM25 top-100 for
SciFact-train), ``--top-k`` each; ``max_length`` is the checkpoint's (512 for the converted SmolLM2).

Variants, same process, same threads, same pairs:
  megarank-<dtype>   megarank.Reranker.from_checkpoint(...).score(pairs) with `megarank rerank`'s defaults
                     (length-sorted, --batch-tokens budget, the checkpoint's data.packing unless --packing)
  megarank-<dtype>-fixed  (--compare-fixed) the same with the old default: fixed batches of 32 pairs
  ce-<dtype>         CrossEncoder(export, trust_remote_code=True, max_length, dtype).predict(pairs, batch_size=32,
                     activation_fn=Identity) — ≥ 5.7 renders the pairs through the export's chat template, which is
                     megarank's input string, so the scores are comparable
Each variant is warmed up, then the queries are taken ``--chunk`` at a time and every chunk is scored by every
variant in a rotating order (chunk k starts with variant k mod n), so machine load hits all alike. Reported:
pairs/s per variant, megarank / CrossEncoder per dtype, max |score difference| megarank vs CrossEncoder per dtype
(and bf16 vs fp32), wall and CPU seconds per variant, the environment (benchmarks/common.py: CPU and matmul ISA,
versions, threads, load average at the start, commit, date) and the load average after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SMOLLM2_CACHE, environment, find_beir, header, load_average, stopwatch, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="megarank checkpoint (default: SmolLM2-135M converted from the cache)")
    p.add_argument("--hf", default=None, help="its HF export (default: exported to a temp dir)")
    p.add_argument("--data", default=None, help="BEIR folder (default: SciFact-train under ../shared/data)")
    p.add_argument("--split", default=None, help="qrels split (default: test if the folder has one, else train)")
    p.add_argument("--max-queries", type=int, default=10)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--chunk", type=int, default=1, help="queries per interleaving round")
    p.add_argument("--dtypes", "--dtype", dest="dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--batch-tokens", type=int, default=None, help="megarank's budget (default: `megarank rerank`'s)")
    p.add_argument("--batch-size", type=int, default=None, help="megarank's pair bound (default: `megarank rerank`'s)")
    p.add_argument("--ce-batch-size", type=int, default=None,
                   help="CrossEncoder.predict batch_size (default: --batch-size if given, else CrossEncoder's 32)")
    p.add_argument("--packing", choices=("checkpoint", "true", "false"), default="checkpoint",
                   help="megarank's data.packing (default: the checkpoint's config, as `megarank rerank`)")
    p.add_argument("--compare-fixed", action="store_true",
                   help="also megarank-<dtype>-fixed: fixed batches of 32 pairs (--batch-tokens 0), the old default")
    p.add_argument("--no-ce", action="store_true", help="leave CrossEncoder out (e.g. budget vs fixed only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


def _cli(*argv):
    subprocess.run([sys.executable, "-m", "checkpoint_tools", *map(str, argv), "--quiet"], check=True)


def prepare_models(args) -> tuple[Path, Path]:
    """(megarank checkpoint, HF export): given, or converted from the SmolLM2 cache into a temp dir."""
    work = Path(tempfile.mkdtemp(prefix="rerank_bench."))
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        if not (SMOLLM2_CACHE / "config.json").is_file():
            sys.exit(f"no --checkpoint and no SmolLM2 cache at {SMOLLM2_CACHE} "
                     "(build it: python scripts/build_smollm2_cache.py)")
        ckpt = work / "mg"
        _cli("hf-to-megatron", SMOLLM2_CACHE, ckpt)
    hf = Path(args.hf) if args.hf else None
    if hf is None:
        hf = work / "hf"
        _cli("megatron-to-hf", ckpt, hf)
    return ckpt, hf


def load_megarank(step_dir, dtype, device, batch_tokens, batch_size, packing):
    """megarank's scorer in ``dtype`` with the batching `megarank rerank` uses: ``megarank.Reranker``."""
    from megarank import Reranker

    overrides = [f"model.transformer_impl={'local' if device == 'cpu' else 'auto'}"]
    if packing != "checkpoint":
        overrides.append(f"data.packing={packing}")
    return Reranker.from_checkpoint(step_dir, dtype=dtype, batch_tokens=batch_tokens, batch_size=batch_size,
                                    overrides=overrides)


class CE:
    def __init__(self, hf_dir, dtype, device, max_length, batch_size):
        import torch
        from sentence_transformers import CrossEncoder

        self.model = CrossEncoder(str(hf_dir), trust_remote_code=True, device=device, max_length=max_length,
                                  model_kwargs={"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]})
        self.batch_size = batch_size

    def score(self, texts) -> list:
        import torch

        out = self.model.predict(texts, batch_size=self.batch_size, show_progress_bar=False,
                                 activation_fn=torch.nn.Identity(), convert_to_numpy=True)
        return [float(s) for s in out]


def main(argv=None) -> int:
    args = parse_args(argv)
    data = find_beir(args.data, names=("scifact-train",))
    if args.split is None:
        args.split = "test" if (data / "qrels" / "test.tsv").is_file() else "train"
    args.ce_batch_size = args.ce_batch_size or args.batch_size or 32
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from megarank import Reranker
    from megarank.checkpoint import resolve_checkpoint
    from megarank.config import DEFAULT_EVAL_BATCH_TOKENS as DEFAULT_BATCH_TOKENS
    from megarank.data import candidate_pairs, find_run_file, read_beir, read_run

    env = environment()
    print(header(env), flush=True)
    step_dir, hf_dir = prepare_models(args)
    step_dir = resolve_checkpoint(str(step_dir))
    beir = read_beir(str(data), args.split)
    run = read_run(find_run_file(str(data), args.split))
    qids = [q for q in run if q in beir.qrels][: args.max_queries]
    batch_tokens = DEFAULT_BATCH_TOKENS if args.batch_tokens is None else args.batch_tokens
    batch_size = args.batch_size or (None if batch_tokens else 32)  # as megarank/cli/evaluate.py
    dtypes = args.dtypes.split(",")
    variants = {}
    for dtype in dtypes:
        variants[f"megarank-{dtype}"] = load_megarank(step_dir, dtype, args.device, batch_tokens, batch_size, args.packing)
        max_length = variants[f"megarank-{dtype}"].cfg.data.max_length
        if args.compare_fixed:
            variants[f"megarank-{dtype}-fixed"] = load_megarank(step_dir, dtype, args.device, 0, 32, args.packing)
        if not args.no_ce:
            variants[f"ce-{dtype}"] = CE(hf_dir, dtype, args.device, max_length, args.ce_batch_size)
    chunks = [candidate_pairs(beir.queries, beir.corpus, {q: run[q] for q in qids[i : i + args.chunk]}, args.top_k)
              for i in range(0, len(qids), args.chunk)]

    def texts(pairs):
        return [(beir.queries[q], beir.corpus[d]) for q, d in pairs]

    for v in variants.values():  # warm-up: a few pairs of the longest and a short one
        v.score(texts(chunks[0][:8]))
    for v in variants.values():
        if isinstance(v, Reranker):
            v.model_tokens = 0
    names = list(variants)
    seconds = dict.fromkeys(names, 0.0)
    cpu_seconds = dict.fromkeys(names, 0.0)  # this process's CPU time (other processes' load does not count)
    per_chunk = {n: [] for n in names}  # seconds of each round, for per-round ratios (load varies between rounds)
    scores = {n: [] for n in names}
    for k, pairs in enumerate(chunks):
        for j in range(len(names)):
            name = names[(k + j) % len(names)]
            with stopwatch() as t:
                got = [float(s) for s in variants[name].score(texts(pairs))]  # Reranker: a tensor, CE: a list
            per_chunk[name].append(t.wall)
            seconds[name] += t.wall
            cpu_seconds[name] += t.cpu
            scores[name].extend(got)
        print(f"chunk {k + 1}/{len(chunks)}: " + ", ".join(f"{n} {len(scores[n]) / seconds[n]:.2f}" for n in names)
              + " pairs/s so far", flush=True)
    n_pairs = sum(len(c) for c in chunks)
    real_tokens = 0
    tok = variants[f"megarank-{dtypes[0]}"].pair_tokenizer
    for pairs in chunks:
        real_tokens += sum(tok.lengths([beir.queries[q] for q, _ in pairs], [beir.corpus[d] for _, d in pairs]))
    report = {
        "threads": torch.get_num_threads(), "device": args.device,
        "data": str(data), "split": args.split, "queries": len(qids), "top_k": args.top_k, "pairs": n_pairs,
        "max_length": max_length, "real_tokens": real_tokens, "chunk_queries": args.chunk,
        "megarank": {"batch_tokens": batch_tokens, "batch_size": batch_size,
                     "packing": variants[f"megarank-{dtypes[0]}"].packing},
        "ce_batch_size": args.ce_batch_size,
        "load_average_after": load_average(),
        "pairs_per_s": {n: n_pairs / seconds[n] for n in names},
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "megarank_padding_share": {n: 1 - real_tokens / v.model_tokens for n, v in variants.items()
                                   if isinstance(v, Reranker)},
    }
    for dtype in dtypes:
        ours, theirs, fixed = f"megarank-{dtype}", f"ce-{dtype}", f"megarank-{dtype}-fixed"
        if theirs in variants:
            report[f"ratio_megarank_over_ce_{dtype}"] = seconds[theirs] / seconds[ours]
            report[f"median_round_ratio_megarank_over_ce_{dtype}"] = statistics.median(
                t / o for t, o in zip(per_chunk[theirs], per_chunk[ours]))
            report[f"max_abs_diff_megarank_vs_ce_{dtype}"] = max(abs(a - b) for a, b in zip(scores[ours], scores[theirs]))
        if fixed in variants:
            report[f"ratio_budget_over_fixed_{dtype}"] = seconds[fixed] / seconds[ours]
            report[f"max_abs_diff_budget_vs_fixed_{dtype}"] = max(abs(a - b) for a, b in zip(scores[ours], scores[fixed]))
    if "fp32" in dtypes and "bf16" in dtypes:
        report["max_abs_diff_megarank_bf16_vs_fp32"] = max(
            abs(a - b) for a, b in zip(scores["megarank-bf16"], scores["megarank-fp32"]))
        report["ratio_megarank_bf16_over_fp32"] = seconds["megarank-fp32"] / seconds["megarank-bf16"]
    spread = max(scores[names[0]]) - min(scores[names[0]])
    report["score_spread"] = spread  # what the differences above are small against
    print(json.dumps(report, indent=1))
    if args.json:
        write_json(args.json, report, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
