"""What the machine can do: the CPU's instruction set, whether bf16 pays, and the peak FLOP/s for MFU.

* bf16 on a CPU only pays with native bf16 dot products: AMX-BF16 (Sapphire Rapids and later; oneDNN's AMX
  kernels, measured ≈ 6-7x the fp32 GEMM rate) or AVX512-BF16 (Zen 4 / Cooper Lake ``vdpbf16ps``; measured 4x
  on this project's AMD EPYC development machine). On AVX2-only CPUs oneDNN emulates bf16 by converting to fp32
  and bf16 GEMMs run ≈ 45x *slower* than fp32, so ``auto`` keeps fp32 there.
* The peak used for MFU is, on a GPU, the datasheet's dense tensor-core rate for the dtype; on a CPU there is no
  datasheet figure torch could know (clock, cores and vector width vary per machine and per cloud instance), so
  it is the GEMM rate measured once per process on a large square matmul with the current threads. CPU MFU
  therefore reads as "share of what this CPU's GEMMs reach", which is what tells whether a step is bound by its
  matmuls or by everything around them.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from megarank.config import TORCH_DTYPE_NAMES, torch_dtype


# Dense (no 2:4 sparsity) peaks from NVIDIA's datasheets, FLOP/s: tensor cores for bf16/fp16/fp8/tf32, CUDA cores
# for fp32. An fp32 matmul runs on the CUDA cores unless TF32 is allowed (torch's default since 1.12 is off:
# torch.backends.cuda.matmul.allow_tf32 False, float32 matmul precision "highest"); then it gets the TF32 rate.
_GPU_PEAKS = {
    # name fragment: {dtype: FLOP/s}; the first fragment found in torch.cuda.get_device_name() wins, so the
    # H100 PCIe and NVL rows come before the SXM one ("NVIDIA H100 80GB HBM3").
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "GH200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.5e12, "fp16": 756.5e12, "fp8": 1513e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "fp8": 1670.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362.1e12, "fp16": 362.1e12, "fp8": 733e12, "tf32": 183e12, "fp32": 91.6e12},
    "B200": {"bf16": 2250e12, "fp16": 2250e12, "fp8": 4500e12, "tf32": 1100e12},
}


def _tf32_matmuls() -> bool:
    """Whether fp32 matmuls may run on TF32 tensor cores (``allow_tf32``, ``set_float32_matmul_precision``, or NGC's
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which overrides both)."""
    return (bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
            or os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that file is absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_isa(flags: frozenset | None = None) -> str:
    """The best matmul ISA: 'amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'baseline'."""
    flags = cpu_flags() if flags is None else flags
    for isa, flag in (("amx_bf16", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return isa
    return "baseline"


def describe_cpu() -> str:
    """One line for benchmark reports and logs: model name, ISA, threads."""
    return f"{cpu_name()}; matmul ISA {cpu_isa()}; {torch.get_num_threads()} threads"


def native_bf16(device: str | torch.device = "cpu", flags: frozenset | None = None) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cpu_isa(flags) in ("amx_bf16", "avx512_bf16")


def resolve_inference_dtype(requested: str, model_dtype: str, device: str | torch.device = "cpu",
                            flags: frozenset | None = None) -> tuple[str, str]:
    """``--dtype`` of `megarank rerank` / `evaluate` -> (dtype to run, why).

    ``auto``: bf16 where bf16 matmuls are native (a GPU with bf16, a CPU with AMX-BF16 or AVX512-BF16), else the
    checkpoint's own dtype. An explicit dtype is used as given.
    """
    if requested != "auto":
        if requested not in TORCH_DTYPE_NAMES:
            raise ValueError(f"--dtype must be auto, fp32, bf16 or fp16, got {requested!r}")
        return requested, "requested"
    device = torch.device(device)
    if model_dtype == "bf16":
        return "bf16", "the checkpoint's dtype"
    if native_bf16(device, flags):
        where = "the GPU" if device.type == "cuda" else f"this CPU ({cpu_isa(flags)})"
        return "bf16", f"auto: {where} has native bf16 matmuls"
    where = "the GPU has no bf16" if device.type == "cuda" else f"this CPU ({cpu_isa(flags)}) has no native bf16 matmuls"
    return model_dtype, f"auto: {where}"


@functools.lru_cache(maxsize=8)
def measured_gemm_flops(dtype: str, threads: int, size: int = 2048, seconds: float = 0.7, repeats: int = 7) -> float:
    """The sustained FLOP/s of ``size``³ matmuls in ``dtype`` on the CPU with torch's current threads: the best of
    ``repeats`` rounds of back-to-back matmuls timed by the wall clock (each round about ``seconds`` / ``repeats``
    long, at least one matmul, after a warm-up that also sizes the rounds).

    ``threads`` is part of the cache key (the rate scales with torch's intra-op threads). Only the wall clock
    counts: a rate from CPU time (``process_time`` / threads) assumes every thread ran, and a call that ran on
    one thread then counts double (it logged a bf16 peak of 1960 GFLOP/s where a sustained matmul gives 942, so
    MFU read 2x low). A wall-clock round can only be slowed (by other processes, a cold thread pool), never sped
    up, so the best round is the estimate of what the CPU sustains: a median read 143 instead of 218 GFLOP/s fp32
    when the process started under load, and MFU then read over 100%.
    """
    del threads  # the key of the cache only: torch runs with its current intra-op threads
    a = torch.randn(size, size, dtype=torch_dtype(dtype))
    b = torch.randn(size, size, dtype=torch_dtype(dtype))
    flops = 2 * size**3
    tic = time.perf_counter()
    a @ b
    a @ b  # warm-up (allocations, thread pool), and the time of one call
    per_call = max((time.perf_counter() - tic) / 2, 1e-6)
    calls = max(1, int(seconds / repeats / per_call))
    best = 0.0
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            a @ b
        best = max(best, flops * calls / (time.perf_counter() - tic))
    return best


def peak_flops(dtype: str, device: str | torch.device = "cpu") -> tuple[float, str]:
    """(peak FLOP/s for ``dtype`` on ``device``, where the number comes from) — the MFU denominator.

    GPU: the datasheet rate of the first known name fragment (None if the GPU is not in the table). CPU: the
    measured GEMM rate (``measured_gemm_flops``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        rate = "tf32" if dtype == "fp32" and _tf32_matmuls() else dtype
        for fragment, peaks in _GPU_PEAKS.items():
            if fragment in name:
                if rate in peaks:
                    return peaks[rate], f"{fragment} datasheet ({rate}, dense)"
                break
        return float("nan"), f"GPU {name!r}: no datasheet peak for {rate}"
    return measured_gemm_flops(dtype, torch.get_num_threads()), f"measured {dtype} GEMM on {cpu_isa()}"
