"""Fault soak on CPU (a benchmark, not CI): tiny-config training under torchrun, interrupted at random moments by
SIGUSR1, SIGTERM or SIGKILL to the torchrun agent and restarted each time, must end bit-identical to the same run
trained without interruption.

    .venv/bin/python benchmarks/soak.py [--minutes 30] [--nproc 2] [--steps 3000] [--save-interval 25]
                                        [--interval-min 60] [--interval-max 180] [--seed 0] [--work /tmp/soak/run]

- Faults are sent for --minutes of wall time (the soak window), one every uniform(--interval-min, --interval-max)
  seconds of a run's life; each restart resumes from ``<dir>/latest``. After the window the run is left to finish.
- SIGUSR1 / SIGTERM: the agent forwards them to the workers (SIGUSR1 because torchrun is started with
  ``--signals-to-handle`` naming it); the workers save the next step and exit.
- SIGKILL: the agent dies at once; the soak waits until every worker it had is gone (the workers' agent
  watchdog ends them unsaved) before restarting, so the next run's lock on the folder is free.
- The uninterrupted reference (same config, fresh folder) runs concurrently from the start, so the comparison
  is ready when the soak ends; concurrency changes timing only, not numerics (fp32, gloo, one thread a rank).
- Compared bit-for-bit: every tensor of the final step's ``model/`` and ``optimizer/`` (Adam moments and fp32
  main params of the distributed optimizer).

Prints the CPU, one line per fault, and a summary line. Nothing is estimated: every number is measured here.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from common import TINY_CONFIG, child_env, header, plain_tensors, torchrun_cmd

SIGNALS = {"SIGUSR1": signal.SIGUSR1, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
GRACE_S = 30  # torchrun's shutdown timeout (its default), set explicitly


def torchrun(nproc: int, overrides: list[str]) -> list[str]:
    # SIGUSR1 is forwarded only when named (torch/distributed/run.py --signals-to-handle); keep the defaults too.
    return torchrun_cmd(nproc, "-m", "megarank", "train", TINY_CONFIG, *overrides,
                        launcher_args=["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"])


def start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    env = child_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT=str(GRACE_S))
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def latest(run_dir: Path) -> str:
    try:
        return (run_dir / "latest").read_text().strip()
    except FileNotFoundError:
        return ""


def finished(run_dir: Path, steps: int) -> bool:
    marker = run_dir / f"step-{steps}" / "megarank_checkpoint.json"
    return marker.is_file() and json.loads(marker.read_text()).get("step") == steps


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(procs: list[psutil.Process]) -> list[int]:
    out = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def compare(a: dict, b: dict) -> tuple[bool, float, str]:
    """(bit-identical, largest element difference, the tensor it is in) of two {key: tensor} sets."""
    if sorted(a) != sorted(b):
        return False, float("inf"), f"key mismatch: {sorted(set(a) ^ set(b))[:3]}"
    same = all(torch.equal(a[k], b[k]) for k in a)
    diff, key = max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)
    return same, diff, key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="the fault window, wall minutes")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--save-interval", type=int, default=25)
    ap.add_argument("--interval-min", type=float, default=60.0)
    ap.add_argument("--interval-max", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/soak/run"))
    args = ap.parse_args()

    rng = random.Random(args.seed)
    if args.work.exists():
        shutil.rmtree(args.work)
    soak_dir, ref_dir, logs = args.work / "soak", args.work / "reference", args.work / "logs"
    logs.mkdir(parents=True)
    common = [f"train.steps={args.steps}", f"checkpoint.save_interval={args.save_interval}", "checkpoint.keep_last=2",
              "train.log_interval=50"]
    if args.nproc > 1:
        common.append("parallel.use_distributed_optimizer=true")
    print(header(), flush=True)
    print(f"config: {TINY_CONFIG} nproc={args.nproc} {' '.join(common)}; faults every "
          f"{args.interval_min:g}-{args.interval_max:g} s for {args.minutes:g} min, seed {args.seed}", flush=True)

    t0 = time.monotonic()
    reference = start(torchrun(args.nproc, [*common, f"checkpoint.dir={ref_dir}"]), logs / "reference.log")
    faults = {name: 0 for name in SIGNALS}
    problems: list[str] = []
    attempt = 0
    while not finished(soak_dir, args.steps):
        attempt += 1
        if attempt > 500:
            problems.append("gave up after 500 attempts")
            break
        log_path = logs / f"attempt-{attempt:03d}.log"
        proc = start(torchrun(args.nproc, [*common, f"checkpoint.dir={soak_dir}"]), log_path)
        born = time.monotonic()
        delay = rng.uniform(args.interval_min, args.interval_max)
        kind = rng.choice(list(SIGNALS))
        while proc.poll() is None and (time.monotonic() - born < delay or time.monotonic() - t0 > args.minutes * 60):
            time.sleep(0.2)
        if proc.poll() is not None:  # finished (or failed) by itself
            if not finished(soak_dir, args.steps):
                problems.append(f"attempt {attempt} exited {proc.returncode} unasked (log {log_path})")
            continue
        before = latest(soak_dir)
        family = workers_of(proc)
        sent = time.monotonic()
        proc.send_signal(SIGNALS[kind])
        faults[kind] += 1
        if kind == "SIGKILL":
            proc.wait()
            while alive(family) and time.monotonic() - sent < 120:
                time.sleep(0.05)
            left = alive(family)
            if time.monotonic() - sent > 15:  # the bound: no worker alive 15 s after kill -9 of the agent
                problems.append(f"attempt {attempt}: workers alive {time.monotonic() - sent:.0f} s after SIGKILL "
                                f"of the agent {delay:.0f} s after its start ({len(left)} still alive)")
                for p in family:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
        else:
            try:
                proc.wait(timeout=GRACE_S + 60)
            except subprocess.TimeoutExpired:
                problems.append(f"attempt {attempt}: agent still running {GRACE_S + 60} s after {kind}")
                proc.kill()
                proc.wait()
        took = time.monotonic() - sent
        out = log_path.read_text(errors="replace")
        saved = out.split("preempted: saved step ", 1)[1].split()[0] if "preempted: saved step " in out else "-"
        print(f"[{(time.monotonic() - t0) / 60:6.2f} min] attempt {attempt}: {kind} after {delay:5.1f} s; latest "
              f"{before or '-'} -> {latest(soak_dir) or '-'}; preempted save {saved}; exit {proc.returncode}, "
              f"{'workers gone' if kind == 'SIGKILL' else 'agent gone'} {took:.1f} s after the signal", flush=True)
    soak_end = time.monotonic()
    soak_min = (soak_end - t0) / 60
    print(f"soak run finished step {args.steps} after {soak_min:.2f} min, {attempt} attempts", flush=True)

    rc = reference.wait()
    ref_min = (time.monotonic() - t0) / 60
    if rc != 0 or not finished(ref_dir, args.steps):
        print(f"reference run failed (exit {rc}, log {logs / 'reference.log'})")
        return 1
    identical, worst = True, (0.0, "")
    for part in ("model", "optimizer"):
        a = plain_tensors(ref_dir / f"step-{args.steps}" / part)
        b = plain_tensors(soak_dir / f"step-{args.steps}" / part)
        same, *diff = compare(a, b)
        print(f"{part}: {len(a)} tensors, {sum(t.numel() for t in a.values())} elements, bit-identical "
              f"{'yes' if same else 'no'}, max abs diff {diff[0]:g} ({diff[1]})", flush=True)
        identical &= same
        worst = max(worst, tuple(diff))
    for p in problems:
        print(f"problem: {p}")
    print(f"SUMMARY: soak {soak_min:.1f} min (fault window {args.minutes:g} min), faults "
          f"{', '.join(f'{k} {v}' for k, v in faults.items())}, restarts {attempt - 1}, final step {args.steps}, "
          f"reference done at {ref_min:.1f} min, bit-identical {'yes' if identical else 'no'}, "
          f"max abs diff {worst[0]:g}, problems {len(problems)}", flush=True)
    return 0 if identical and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
