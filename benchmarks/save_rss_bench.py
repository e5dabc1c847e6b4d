"""Peak host RSS per rank while saving the distributed optimizer: megatron's 'fully_reshardable' vs megarank's.

    .venv/bin/python benchmarks/save_rss_bench.py [--layers 6 --hidden 768 --ffn 2048 --vocab 32000] [--dp 2]

For each format a fresh group of DP ranks (torchrun running this file with ``--worker``; gloo, CPU with CUDA
hidden, one thread a rank, fp32, distributed optimizer) builds the same model, takes
one optimizer step on fixed gradients (so Adam's moments exist), then saves the optimizer state into a temp
folder. Each rank resets its peak-RSS counter just before the save (``echo 5 > /proc/self/clear_refs`` resets
``VmHWM`` to the current RSS, Linux >= 4.0) and reads ``VmHWM`` right after it, so "peak" is the highest
resident set of that rank's process during the save and "added" is peak minus the RSS before the save. The
torch_dist writer forks helper processes that write the files (copy-on-write views of the trainer's tensors);
they are not counted. Prints one table; numbers are measured, nothing is estimated.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import TINY_CONFIG, child_env, environment, header, load_average, torchrun_cmd

MIB = 1 << 20
FORMATS = ("fully_reshardable", "megarank")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _rank_work(fmt: str, dims: dict, out: str) -> dict:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megarank.checkpoint.writer import keep_writer_in_process
    from megarank.config import load_config
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import build_optimizer, wrap_ddp
    from megarank.training.optimizer_state import optimizer_sharded_state_dict

    init_distributed(1, 1, seed=5)
    cfg = load_config(str(TINY_CONFIG),
                      [f"model.num_layers={dims['layers']}", f"model.hidden_size={dims['hidden']}",
                       f"model.ffn_hidden_size={dims['ffn']}", f"model.num_attention_heads={dims['heads']}",
                       f"model.num_query_groups={dims['heads'] // 2}", f"model.vocab_size={dims['vocab']}",
                       "parallel.use_distributed_optimizer=true"])
    model = build_model(cfg.model, cfg.parallel)
    optimizer = build_optimizer(wrap_ddp(model, cfg), cfg)
    torch.manual_seed(0)
    for p in model.parameters():
        p.main_grad.copy_(torch.randn_like(p) * 1e-3)
    optimizer.step()
    n_params = sum(p.numel() for p in model.parameters())
    local_state = sum(t.numel() * t.element_size() for o in getattr(optimizer, "chained_optimizers", [optimizer])
                      for s in o.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    os.makedirs(out, exist_ok=True)
    keep_writer_in_process()
    gc.collect()
    dist.barrier()
    before = _status("VmRSS")
    _reset_peak()
    tic = time.perf_counter()
    if fmt == "fully_reshardable":
        sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False,
                                          metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    else:
        sd = optimizer_sharded_state_dict(optimizer, model, is_loading=False)
    dist_checkpointing.save(sd, out)
    seconds = time.perf_counter() - tic
    peak = _status("VmHWM")
    dist.barrier()
    written = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {"rank": dist.get_rank(), "before": before, "peak": peak, "seconds": seconds, "params": n_params,
            "local_state": local_state, "written": written}


def run_group(fmt: str, args, folder: str) -> list:
    """One fresh group of ``args.dp`` ranks under torchrun saving in ``fmt``; the ranks' results in rank order."""
    dims = [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "ffn", "heads", "vocab")]
    cmd = torchrun_cmd(args.dp, __file__, "--worker", fmt, "--out", folder, *dims)
    done = subprocess.run(cmd, env=child_env(CUDA_VISIBLE_DEVICES=""), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-6000:]}")
    return [json.loads(Path(f"{folder}.rank{r}.json").read_text()) for r in range(args.dp)]


def worker(args) -> int:
    """One rank of a group (torchrun's environment): save, and leave this rank's numbers beside the folder."""
    from megarank.parallel.init import destroy_distributed

    dims = {k: getattr(args, k) for k in ("layers", "hidden", "ffn", "heads", "vocab")}
    try:
        result = _rank_work(args.worker, dims, args.out)
        Path(f"{args.out}.rank{result['rank']}.json").write_text(json.dumps(result))
    finally:
        destroy_distributed()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--worker", choices=FORMATS, default=None, help=argparse.SUPPRESS)  # a rank (run by main)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="save-rss-") as tmp:
        for fmt in FORMATS:
            rows += [(fmt, r) for r in run_group(fmt, args, f"{tmp}/{fmt}")]
    first = rows[0][1]
    print(header(env))
    print(f"model {first['params'] / 1e6:.1f}M params fp32, DP={args.dp}, distributed optimizer "
          f"(Adam state per rank {first['local_state'] / MIB:.0f} MiB); load average at the end {load_average()}")
    print("| format | rank | RSS before save (MiB) | peak RSS during save (MiB) | added by the save (MiB) | save s | checkpoint folder (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for fmt, r in rows:
        print(f"| {fmt} | {r['rank']} | {r['before'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
              f"{(r['peak'] - r['before']) / MIB:.0f} | {r['seconds']:.2f} | {r['written'] / MIB:.0f} |")
    return 0

if __name__ == "__main__":
    sys.exit(main())
