"""Context parallelism on CPU (issue 19): peak activation memory per rank and step time, CP=1 vs CP=2, at 2K / 4K /
8K tokens on a tiny-but-wide model (the local spec's SDPA attention, fp32).

Each (CP, length) runs in fresh processes (CP=1: one rank; CP=2: two ranks under torchrun, gloo, one thread each):
build the model (``--hidden`` wide, ``--layers`` layers, GQA), then steps of forward + backward on one sequence of
exactly ``length`` real tokens (a padded [1, L] batch, the split of megarank/parallel/context.py), score summed as
the loss. Measured per rank on the second and later steps:

- saved: bytes of the distinct storages the autograd graph keeps for backward (benchmarks/memory_bench.py
  ``saved_bytes``: walked from the score, parameters excluded) -- the stored activations;
- peak: peak RSS growth during forward + backward over the RSS before it (VmHWM reset through /proc/self/clear_refs;
  glibc serves allocations >= 64 KiB with mmap, ``MALLOC_MMAP_THRESHOLD_=65536``, so RSS follows live tensors);
- step: seconds per forward + backward (median of ``--steps``; each rank one thread, so CP=2 uses 2 cores).

Under CP each rank keeps its own tokens' activations plus, per layer, the all-gathered keys and values
(2 x L x groups x head dim), so memory per rank falls roughly by CP when the per-token terms dominate.

    python benchmarks/cp_bench.py --lengths 2048 4096 8192 --json /tmp/cp_bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import child_env, environment, header, torchrun_cmd, write_json

REPO = Path(__file__).resolve().parents[1]


def model_overrides(args) -> list[str]:
    return [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            f"model.ffn_hidden_size={3 * args.hidden}", f"model.num_attention_heads={args.heads}",
            f"model.num_query_groups={args.groups}", "model.dtype=fp32", "model.transformer_impl=local",
            "data.packing=false"]


def child(cp: int, length: int, steps: int, overrides: list[str]) -> dict:
    import time

    import torch

    from memory_bench import _status, reset_peak, rss, saved_bytes
    from megarank.config import load_config
    from megarank.model import build_model
    from megarank.model.inputs import model_inputs
    from megarank.parallel.init import destroy_distributed, init_distributed

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), overrides + [f"parallel.context_parallel_size={cp}"])
    init_distributed(cp=cp, seed=0)
    model = build_model(cfg.model, cfg.parallel)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 256, (1, length), generator=g),
             "attention_mask": torch.ones(1, length, dtype=torch.bool)}
    times, saved, peaks = [], [], []
    for step in range(steps + 1):
        model.zero_grad(set_to_none=True)
        before = rss()
        reset_peak()
        start = time.perf_counter()
        args, kwargs = model_inputs(batch, torch.device("cpu"))
        score = model(*args, **kwargs)
        if step:
            saved.append(saved_bytes(score, params))
        score.sum().backward()
        elapsed = time.perf_counter() - start
        if step:  # the first step is a warm-up (allocator, RoPE tables)
            times.append(elapsed)
            peaks.append(_status("VmHWM:") - before)
    out = {"cp": cp, "length": length, "tokens_per_rank": length // cp, "step_s": statistics.median(times),
           "saved_bytes": max(saved), "peak_bytes": max(peaks), "score": float(score.detach().sum())}
    destroy_distributed()
    return out


def run_case(cp: int, length: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        script = [str(Path(__file__).resolve()), "--child", str(cp), str(length), "--steps", str(args.steps),
                  "--out", str(out), "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads",
                  str(args.heads), "--groups", str(args.groups)]
        cmd = torchrun_cmd(cp, *script) if cp > 1 else [sys.executable, *script]
        env = child_env(MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=f"{REPO}:{REPO / 'benchmarks'}")
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("out.rank*.json"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--child", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import os

        result = child(args.child[0], args.child[1], args.steps, model_overrides(args))
        Path(f"{args.out}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        return 0
    env = environment()
    print(header(env))
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.groups} KV groups, "
          f"ffn {3 * args.hidden}, fp32, local spec (SDPA); one sequence per step; one thread per rank")
    print(f"{'length':>7} {'CP':>3} {'tokens/rank':>11} {'saved MiB/rank':>15} {'peak MiB/rank':>14} {'step s':>8} "
          f"{'saved vs CP=1':>14} {'peak vs CP=1':>13}")
    rows, base = [], {}
    for length in args.lengths:
        for cp in args.cps:
            ranks = run_case(cp, length, args)
            worst = max(ranks, key=lambda r: r["peak_bytes"])
            row = {**worst, "saved_bytes": max(r["saved_bytes"] for r in ranks),
                   "step_s": max(r["step_s"] for r in ranks), "scores_equal_on_ranks":
                   len({r["score"] for r in ranks}) == 1}
            if cp == args.cps[0]:
                base[length] = row
            b = base[length]
            print(f"{length:>7} {cp:>3} {length // cp:>11} {row['saved_bytes'] / 2**20:>15.1f} "
                  f"{row['peak_bytes'] / 2**20:>14.1f} {row['step_s']:>8.3f} "
                  f"{row['saved_bytes'] / b['saved_bytes']:>14.2f} {row['peak_bytes'] / b['peak_bytes']:>13.2f}",
                  flush=True)
            rows.append(row)
    if args.json:
        write_json(args.json, {"rows": rows, "args": vars(args)}, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
