"""Shared helpers for the training, resume and evaluation tests: start `megarank` runs as real processes
(one process, or torchrun with gloo), read what they leave behind (log lines, TensorBoard scalars, the global
tensors of a torch_dist checkpoint) and build a random initial checkpoint that every layout loads.

Every run is a subprocess with ``cwd`` in a temporary folder and the repo's config path absolute, so nothing
is written into the work tree; each costs a few seconds of imports, so tests group their checks per run.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
SHARED_DATA = REPO.parent / "shared" / "data"
CRANFIELD = SHARED_DATA / "cranfield"

LOG_LINE = re.compile(
    r"step (?P<step>\d+)/(?P<total>\d+) \| loss (?P<loss>\S+) \| acc (?P<acc>\S+) \| mrr (?P<mrr>\S+) \| "
    r"lr (?P<lr>\S+) \| grad norm (?P<grad_norm>\S+) \| (?P<tps>\S+) tokens/s \| MFU (?P<mfu>[\d.]+%|n/a) \| "
    r"elapsed (?P<elapsed>\S+) \| ETA (?P<eta>\S+)"
)


def run_env(**extra) -> dict:
    env = dict(os.environ)
    # Two cores shared by up to two ranks: one thread each (numerics are the same with any thread count).
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def megarank_cmd(nproc: int, *args: str) -> list[str]:
    """``python -m megarank ARGS`` in one process, or under torchrun (own rendezvous port) with nproc ranks."""
    if nproc == 1:
        return [sys.executable, "-m", "megarank", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "megarank", *args]


def script_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """``python SCRIPT ARGS`` in one process, or under torchrun with nproc ranks."""
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *args]


def train_cmd(nproc: int, *overrides: str) -> list[str]:
    return megarank_cmd(nproc, "train", TINY, *overrides)


def run(cmd: list[str], cwd, timeout: float = 300, check: bool = True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to completion; stdout and stderr together in ``.stdout``. With check, a failure shows the output.

    Output goes through a file, not a pipe (a checkpoint writer's helper process may outlive a killed run and
    hold a pipe open); on timeout the whole process tree is killed (torchrun's ranks included).
    """
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or run_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out.seek(0)
            raise AssertionError(f"{' '.join(map(str, cmd))} ran past {timeout:.0f}s:\n{out.read()[-6000:]}") from None
        out.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def run_many(jobs: dict, cwd, max_procs: int = 2, timeout: float = 600) -> dict:
    """Run independent commands concurrently, at most ``max_procs`` processes at a time.

    ``jobs``: {name: (nproc, cmd)}. Returns {name: output}; any failure raises with that job's output.
    """
    pending = list(jobs.items())
    running: dict = {}
    outputs: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while pending or running:
            while pending and (not running or sum(n for n, _, _ in running.values()) + pending[0][1][0] <= max_procs):
                name, (nproc, cmd) = pending.pop(0)
                log = open(Path(cwd) / f"{name}.log", "w+")
                running[name] = (nproc, subprocess.Popen(cmd, cwd=cwd, env=run_env(), stdout=log,
                                                         stderr=subprocess.STDOUT, text=True), log)
            for name, (nproc, proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.seek(0)
                outputs[name] = log.read()
                log.close()
                del running[name]
                if proc.returncode != 0:
                    raise AssertionError(f"job {name} ({' '.join(proc.args)}) exited {proc.returncode}:\n"
                                         f"{outputs[name][-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {sorted(running)} still running after {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        for _, proc, log in running.values():
            kill_tree(proc)
            log.close()
    return outputs


def log_lines(output: str) -> dict[int, dict]:
    """{step: fields} of the ``step k/N | loss ...`` lines in a run's output (values as printed)."""
    return {int(m["step"]): m.groupdict() for m in LOG_LINE.finditer(output)}


def tb_scalars(tb_dir, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard scalar (float32, i.e. exactly what the run computed) over the
    event files in ``tb_dir``, later files winning."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for path in sorted(glob.glob(str(Path(tb_dir) / "events.out.tfevents.*")), key=os.path.getmtime):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def read_plain_tensors(directory) -> dict[str, torch.Tensor]:
    """The global tensors of a torch_dist checkpoint folder (a megarank ``model/`` or ``optimizer/``).

    What megatron's ``dist_checkpointing.load_plain_tensors`` returns, read with torch.distributed.checkpoint
    directly so the test process needs no process group.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(directory)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def max_abs_diff(a: dict, b: dict) -> tuple[float, str]:
    """Largest element difference over tensors with the same keys (asserts the keys match)."""
    assert sorted(a) == sorted(b), f"different tensors: {sorted(set(a) ^ set(b))}"
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different tensors: {sorted(set(a) ^ set(b))}"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[0]} by {max_abs_diff(a, b)}"


INIT_SCRIPT = '''
import sys

if __name__ == "__main__":  # the torch_dist writer starts a spawn Manager: guard the main module
    from megarank import Reranker
    from megarank import checkpoint as ckpt
    from megarank.config import save_config

    out = sys.argv[2]
    reranker = Reranker.from_config(sys.argv[1], overrides=sys.argv[3:])  # random init, seeded by train.seed
    ckpt.save_model_weights(reranker.model, out + "/model")
    ckpt.write_marker(out, kind="converted")
    save_config(reranker.cfg, out + "/config.yaml")
    reranker.close()
'''


def make_init_checkpoint(work: Path) -> Path:
    """A random tiny model saved as a 'converted' checkpoint (built at TP=1/PP=1, seed 7) in ``work/init``.

    Training from it with ``checkpoint.load`` starts every layout from the same weights.
    """
    (work / "make_init.py").write_text(INIT_SCRIPT)
    out = work / "init"
    run([sys.executable, "make_init.py", TINY, str(out), "train.seed=7"], cwd=work)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant at once, like a node going away. torchrun starts each rank in
    a session of its own, so killing torchrun's process group would leave the ranks running."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    proc.kill()
    for p in descendants:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()  # reap our child here, so its return code stays -SIGKILL
    psutil.wait_procs(descendants, timeout=30)


def all_stopped(proc: subprocess.Popen, nproc: int, script: str) -> bool:
    """True once the job's ranks running ``script`` (the process itself, or torchrun's nproc workers) are all
    stopped (SIGSTOP)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        ranks = [root] if nproc == 1 else [c for c in root.children() if script in c.cmdline()]
        return len(ranks) == nproc and all(p.status() == psutil.STATUS_STOPPED for p in ranks)
    except psutil.NoSuchProcess:
        return False


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, interval: float = 0.005):
    """Poll until predicate() is truthy; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        time.sleep(interval)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")
