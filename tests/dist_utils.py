"""Run a function in N spawned processes that form a gloo process group (CPU distributed tests).

    def _work(tp):                      # module level, so spawn can pickle it
        init_distributed(tp=tp)         # reads MASTER_ADDR/PORT, RANK, WORLD_SIZE set here
        return dist.get_rank()

    assert run_distributed(_work, 2, 2) == [0, 1]

Each rank's return value comes back through a file (``torch.save``: tensors, dicts, lists all fine), in rank
order. An exception in any rank fails the call with that rank's traceback and stops the others; a hang is
killed after ``timeout`` seconds. Every rank tears its groups down with ``destroy_distributed`` on the way out.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

_PORT_IN_USE = ("address already in use", "EADDRINUSE", "errno: 98")


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, fn, world_size, port, out_dir, args, env, threads):
    os.environ.update(env)  # before anything initialises CUDA, so CUDA_VISIBLE_DEVICES="" takes effect
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    # N ranks share the machine's cores; one thread each avoids oversubscription (results are unaffected).
    torch.set_num_threads(threads)
    from megarank.parallel.init import destroy_distributed

    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy_distributed()


def run_distributed(
    fn, world_size: int, *args, timeout: float = 300.0, threads: int = 1, env: dict | None = None, cpu_only: bool = True
) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return the per-rank return values in rank order.

    ``fn`` must be picklable (a module-level function); it initialises the parallel state itself (e.g.
    ``megarank.parallel.init.init_distributed(tp, pp)``, which reads the env set here). ``env`` adds
    variables in every rank; ``cpu_only`` hides GPUs from the ranks (CUDA_VISIBLE_DEVICES=""), so the
    group is gloo on CPU even on a GPU machine. Retries once on a fresh port if the chosen one was taken.
    """
    env = {**({"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {}), **(env or {})}
    for attempt in range(2):
        try:
            return _spawn(fn, world_size, args, timeout, threads, env)
        except mp.ProcessRaisedException as e:
            if attempt == 0 and any(s in str(e) for s in _PORT_IN_USE):
                continue
            raise
    raise AssertionError("unreachable")


def _spawn(fn, world_size, args, timeout, threads, env) -> list:
    with tempfile.TemporaryDirectory(prefix="megarank-dist-") as out_dir:
        ctx = mp.start_processes(
            _rank_main,
            args=(fn, world_size, free_port(), out_dir, args, env, threads),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks ran past {timeout:.0f}s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
