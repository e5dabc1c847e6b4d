"""Full fine-tuning vs LoRA on CPU (issue 18): step time and peak RSS of `megarank train` on SmolLM2-135M (its real
weights, converted), and the dry-run estimate (megarank/training/memory.py) against the measured difference.

Each arm is one `megarank train` process (one rank, fp32) from the same converted base, on the same groups; the
arms alternate over ``--runs`` rounds so machine load hits both alike. Step time = the median of the per-step
wall-clock deltas of the log lines after the first ``--warmup`` steps; peak RSS = the child's ``ru_maxrss``
(``os.wait4``). The estimate counts weights + gradient buffer + Adam state only; RSS also holds the libraries,
the activations and allocator slack, which are the same in both arms up to the adapters' activations, so the
comparison is of the *difference* full - LoRA.

    python benchmarks/lora_bench.py --steps 12 --runs 1 --json /tmp/lora_bench.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, child_env, header, smollm2_cache, write_json  # noqa: E402

STEP = re.compile(r"^(?:\[rank0\]:)?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO megarank\.train: step (\d+)/\d+ \|",
                  re.M)
LORA = ["model.lora_rank=16", "model.lora_alpha=32", "train.lr=1e-4"]


def run_arm(cmd: list, log_path: Path) -> tuple[int, float]:
    """Run ``cmd`` to completion; -> (exit code, peak RSS in GiB of that process)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(OMP_NUM_THREADS="2"),
                                cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 2**20  # KiB on Linux


def step_seconds(log: str, warmup: int) -> list:
    stamps = [(int(step), datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f")) for t, step in STEP.findall(log)]
    return [(b - a).total_seconds() for (s, a), (_, b) in zip(stamps, stamps[1:]) if s >= warmup]


def estimate_gb(base_config: Path, lora: bool) -> float:
    from megarank.config import load_config
    from megarank.training.memory import estimate

    cfg = load_config(str(base_config), LORA if lora else [])
    return estimate(cfg, data_parallel=1, lora=lora).states / 2**30  # weights + gradients + Adam, no activations


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="step deltas before this step are not counted")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="lora_bench."))
    base = work / "base"
    if not (base / "config.yaml").is_file():
        done = subprocess.run([sys.executable, "-m", "checkpoint_tools", "hf-to-megatron", str(smollm2_cache()),
                               str(base), "--quiet"], cwd=REPO)
        if done.returncode:
            return done.returncode
    common = [f"checkpoint.load={base}", f"data.train_path={REPO / 'megarank/resources/sample'}",
              f"train.steps={args.steps}", "train.log_interval=1", "train.lr_warmup_steps=0", "model.dtype=fp32",
              "train.global_batch_size=2", "train.micro_batch_size=1", "data.max_length=256",
              "checkpoint.save_interval=0"]
    print(header())
    report = {"steps": args.steps, "warmup": args.warmup, "arms": {"full": {}, "lora": {}}}
    for i in range(args.runs):
        for arm in ("full", "lora"):
            out = work / f"{arm}-{i}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resume of an earlier benchmark's
            cmd = [sys.executable, "-m", "megarank", "train", str(base / "config.yaml"), *common,
                   *(LORA if arm == "lora" else []), f"checkpoint.dir={out}"]
            rc, rss = run_arm(cmd, work / f"{arm}-{i}.log")
            log = (work / f"{arm}-{i}.log").read_text()
            if rc:
                print(log[-3000:])
                return rc
            deltas = step_seconds(log, args.warmup)
            if not deltas:
                raise SystemExit(f"{arm}: no step times in {work / f'{arm}-{i}.log'} (fewer than --warmup + 2 steps?)")
            r = report["arms"][arm]
            r.setdefault("peak_rss_gib", []).append(round(rss, 3))
            r.setdefault("median_step_s", []).append(round(statistics.median(deltas), 3))
            print(f"round {i + 1} {arm}: median step {statistics.median(deltas):.2f} s over {len(deltas)} steps, "
                  f"peak RSS {rss:.2f} GiB")
    for arm, lora in (("full", False), ("lora", True)):
        report["arms"][arm]["estimate_gib"] = round(estimate_gb(base / "config.yaml", lora), 3)
    full, lora = report["arms"]["full"], report["arms"]["lora"]
    measured = statistics.median(full["peak_rss_gib"]) - statistics.median(lora["peak_rss_gib"])
    estimated = full["estimate_gib"] - lora["estimate_gib"]
    report.update(rss_difference_gib=round(measured, 3), estimate_difference_gib=round(estimated, 3),
                  step_time_ratio_lora_over_full=round(statistics.median(lora["median_step_s"])
                                                       / statistics.median(full["median_step_s"]), 3))
    print(f"peak RSS full - LoRA: measured {measured:.2f} GiB, estimated (weights + gradients + Adam) "
          f"{estimated:.2f} GiB; step time LoRA / full {report['step_time_ratio_lora_over_full']:.2f}")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
