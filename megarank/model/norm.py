"""RMSNorm for the local (CPU) spec that works under sequence parallelism.

megatron-core's local spec falls back to ``torch.nn.RMSNorm`` without apex, which refuses sequence parallel
("not supported by torch LayerNorm"). Under sequence parallelism each TP rank normalises its own slice of
the sequence, so the weight's gradient is partial per rank; marking the parameter ``sequence_parallel`` makes
megatron-core's ``finalize_model_grads`` all-reduce it over the TP group.
"""
import torch
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
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
