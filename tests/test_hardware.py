"""megarank.hardware: ISA detection, the inference dtype choice and the MFU peak (CPU parts)."""
import pytest
import torch

from megarank import hardware


@pytest.mark.parametrize("flags, isa", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "amx_bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "avx512_bf16"),
    ({"avx2", "avx512f"}, "avx512"),
    ({"avx2", "fma"}, "avx2"),
    (set(), "baseline"),
])
def test_isa_from_flags(flags, isa):
    assert hardware.cpu_isa(frozenset(flags)) == isa


def test_auto_dtype_is_bf16_only_with_native_bf16_matmuls():
    amx = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    zen4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
    avx2 = frozenset({"avx2"})
    assert hardware.resolve_inference_dtype("auto", "fp32", "cpu", amx)[0] == "bf16"
    assert hardware.resolve_inference_dtype("auto", "fp32", "cpu", zen4)[0] == "bf16"
    dtype, why = hardware.resolve_inference_dtype("auto", "fp32", "cpu", avx2)
    assert dtype == "fp32" and "avx2" in why
    assert hardware.resolve_inference_dtype("auto", "bf16", "cpu", avx2)[0] == "bf16"  # the checkpoint's own
    assert hardware.resolve_inference_dtype("fp32", "bf16", "cpu", amx) == ("fp32", "requested")
    with pytest.raises(ValueError, match="--dtype"):
        hardware.resolve_inference_dtype("int8", "fp32")


def test_this_machine_reports_its_cpu():
    line = hardware.describe_cpu()
    assert hardware.cpu_isa() in line and f"{torch.get_num_threads()} threads" in line


def test_cpu_peak_is_a_measured_gemm_rate():
    peak, source = hardware.peak_flops("fp32", "cpu")
    assert "measured fp32 GEMM" in source
    # A 1024^3 matmul is 2.1 GFLOP; any CPU torch runs on does between 1 GFLOP/s and 100 TFLOP/s.
    assert 1e9 < peak < 1e14
    assert hardware.peak_flops("fp32", "cpu")[0] == peak  # measured once per process and thread count


def test_gpu_peak_comes_from_the_datasheet_table(monkeypatch):
    """The CUDA branch, with the device name faked: no GPU is needed to pick the row."""
    import math

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.peak_flops("bf16", "cuda") == (989.4e12, "H200 datasheet (bf16, dense)")
    assert hardware.peak_flops("fp8", "cuda")[0] == 1978.9e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert hardware.peak_flops("bf16", "cuda")[0] == 312e12
    assert math.isnan(hardware.peak_flops("fp8", "cuda")[0])  # A100 has no FP8
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, source = hardware.peak_flops("bf16", "cuda")
    assert math.isnan(peak) and "no datasheet peak" in source
    # H100 PCIe / NVL are their own rows, not the SXM one; fp32 is the CUDA-core rate unless TF32 is allowed
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert hardware.peak_flops("bf16", "cuda")[0] == 756.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert hardware.peak_flops("bf16", "cuda")[0] == 835.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", raising=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"  # defaults
    assert hardware.peak_flops("fp32", "cuda") == (66.9e12, "H100 datasheet (fp32, dense)")
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")  # NGC containers export it
    assert hardware.peak_flops("fp32", "cuda") == (494.7e12, "H100 datasheet (tf32, dense)")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_measured_gemm_peak_is_what_a_directly_timed_sustained_matmul_reaches(dtype):
    """The MFU denominator against a 2048³ matmul timed here by the wall clock (best of 3): within 0.5-1.6x (a
    loaded machine slows either), so a peak counted twice (a one-thread call credited with every thread's rate, as CPU-time rates did) fails."""
    import time

    import torch

    from megarank.hardware import measured_gemm_flops, native_bf16

    if dtype == "bf16" and not native_bf16("cpu"):
        pytest.skip("bf16 matmuls are emulated on this CPU (no AMX-BF16 / AVX512-BF16): its peak is not used for MFU")
    measured_gemm_flops.cache_clear()
    peak = measured_gemm_flops(dtype, torch.get_num_threads())
    t = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b = torch.randn(2048, 2048, dtype=t), torch.randn(2048, 2048, dtype=t)
    a @ b
    times = []
    for _ in range(3):
        tic = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - tic)
    direct = 2 * 2048**3 / min(times)
    assert 0.5 <= peak / direct <= 1.6, (peak / 1e9, direct / 1e9)
