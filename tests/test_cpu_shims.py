"""megarank.parallel.cpu: the megatron-core shims for machines without CUDA (docs/megatron-on-cpu.md)."""
import importlib
import subprocess
import sys

import pytest
import torch

from megarank.parallel import cpu

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the shims are only applied without CUDA")


@needs_cpu_only
def test_applied_once_without_cuda():
    assert cpu.apply_cpu_shims() is True
    proxies = {name: importlib.import_module(name).torch for name in cpu.patched_modules()}
    assert cpu.apply_cpu_shims() is True  # idempotent: nothing is re-wrapped
    assert all(importlib.import_module(name).torch is proxy for name, proxy in proxies.items())
    assert len({id(p) for p in proxies.values()}) == 1
    from megatron.core.optimizer import clip_grads

    assert not hasattr(clip_grads.clip_grad_by_total_norm_fp32.__wrapped__, "__wrapped__")


def test_not_applied_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.apply_cpu_shims() is False


def test_a_cuda_process_keeps_megatron_untouched():
    """In a fresh interpreter that believes it has CUDA, no megatron module gets the proxy."""
    code = (
        "import torch; torch.cuda.is_available = lambda: True\n"
        "import importlib; from megarank.parallel import cpu\n"
        "assert cpu.apply_cpu_shims() is False\n"
        "for name in cpu.patched_modules():\n"
        "    assert importlib.import_module(name).torch is torch, name\n"
        "from megatron.core.optimizer import clip_grads\n"
        "assert not hasattr(clip_grads.clip_grad_by_total_norm_fp32, '__wrapped__')\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "untouched" in out.stdout


@needs_cpu_only
def test_each_patched_module_sees_the_proxy():
    cpu.apply_cpu_shims()
    modules = cpu.patched_modules()
    assert "megatron.core.utils" in modules and "megatron.core.pipeline_parallel.schedules" in modules
    assert "megatron.core.tensor_parallel.mappings" in modules  # sequence-parallel gather/scatter buffers
    for name, description in modules.items():
        assert isinstance(description, str) and description.strip(), name
        assert isinstance(importlib.import_module(name).torch, cpu._CpuTorch), name
    modules.clear()  # a copy: the registry itself is unchanged
    assert cpu.patched_modules()


def test_proxy_maps_cuda_devices_of_factories_to_cpu():
    proxy = cpu._CpuTorch()
    for device in ("cuda", "cuda:1", 0, torch.device("cuda", 0)):
        assert proxy.zeros(2, device=device).device.type == "cpu"
        assert proxy.empty((2, 3), dtype=torch.int, device=device).device.type == "cpu"
    assert proxy.tensor([1.0], device="cuda").device.type == "cpu"
    assert proxy.full((2,), 3.0, device="cuda").tolist() == [3.0, 3.0]
    assert proxy.arange(3, device="cuda").tolist() == [0, 1, 2]
    assert proxy.empty_like(torch.ones(2), device="cuda").device.type == "cpu"
    assert proxy.ones(1, device="cpu").device.type == "cpu" and proxy.ones(1).device.type == "cpu"
    # everything else is the real torch
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor and proxy.distributed is torch.distributed
    assert proxy.cuda.current_device() == "cpu" and proxy.cuda.synchronize() is None
    assert proxy.cuda.is_available is torch.cuda.is_available


@needs_cpu_only
def test_shimmed_megatron_calls_run_on_cpu():
    cpu.apply_cpu_shims()
    from megatron.core.optimizer import clip_grads
    from megatron.core.utils import GlobalMemoryBuffer

    assert GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "scores").device.type == "cpu"

    # clip_grad_by_total_norm_fp32 asserts `param.grad.type() == 'torch.cuda.FloatTensor'` upstream
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    assert torch.ones(1).type() == "torch.FloatTensor"  # the CUDA type names are reported only inside the call
