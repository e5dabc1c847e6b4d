"""RMSNorm for the local (CPU) spec that works under sequence parallelism.

megatron-core's local spec falls back to ``torch.nn.RMSNorm`` without apex, which refuses sequence parallel
("not supported by torch LayerNorm"). Under sequence parallelism each TP rank normalises its own slice of
the sequence, so the weight's gradient is partial per rank; marking the parameter ``sequence_parallel`` makes
megatron-core's ``finalize_model_grads`` all-reduce it over the TP group.
"""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 like HF ``LlamaRMSNorm``."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused rms_norm kernel: x * rsqrt(mean(x^2) + eps) * weight with one output tensor instead of
        # pow, mean, add, rsqrt and two multiplies, each a new tensor (SmolLM2's [448, 8, 576], one CPU thread:
        # 1.6 vs 9.0 ms under glibc's default allocator, which page-faults each new large tensor in; the same
        # 2.7 ms when freed memory is kept: benchmarks/RESULTS.md, issue 11), with the same roundings: outputs
        # and gradients equal the formula below bit for bit in fp32 and bf16 (tests/test_model_speedpaths.py). Below fp32 the normalised value is rounded to x's dtype
        # before the weight multiplies it, as HF LlamaRMSNorm does (``weight * x32.to(dtype)``).
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The formula (HF ``LlamaRMSNorm``): what ``RMSNorm.forward`` must equal; used by the tests."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
