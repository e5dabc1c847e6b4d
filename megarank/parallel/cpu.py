"""Shims that let megatron-core run on a machine without CUDA (CPU + gloo).

Written against megatron-core==0.16.1 (pinned in setup.py). Applied by :func:`apply_cpu_shims` only when
``torch.cuda.is_available()`` is False; on GPU nothing here is touched and megatron-core runs unmodified.

One mechanism does most of the work: inside each listed megatron module, the module-global name ``torch`` is
replaced by :class:`_CpuTorch`, a thin proxy that forwards everything to the real ``torch`` except
  * ``torch.cuda.current_device()``  -> ``"cpu"``,
  * ``torch.cuda.synchronize()``     -> no-op,
  * ``device="cuda"`` / an int device passed to tensor factories -> ``"cpu"``.
So only the modules named in ``_PATCHED_MODULES`` see the CPU stand-ins, and each entry says which upstream
calls it replaces. Tensor *methods* (``.cuda()``, ``.type()`` strings) cannot be reached that way; the few
that matter get their own targeted patch below, each with its upstream location.
"""
from __future__ import annotations

import importlib
import types

import torch

_FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like", "ones_like"}


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return "cpu"
    return device


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside a patched module."""

    def current_device(self):
        return "cpu"

    def synchronize(self, *args, **kwargs):
        return None

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """Stands in for ``torch`` inside a patched module (see the module docstring)."""

    cuda = _CpuCuda()

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args, _fn=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return _fn(*args, **kwargs)

            return factory
        return attr


# module -> the upstream calls (megatron-core 0.16.1) that the torch proxy replaces there
_PATCHED_MODULES = {
    # RotaryEmbedding.get_emb: `self.inv_freq.to(device=torch.cuda.current_device())`
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.get_emb",
    # GlobalMemoryBuffer.get_tensor: `torch.empty(..., device=torch.cuda.current_device())` (attention scores)
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor",
    # sequence parallel: _gather_along_first_dim / _reduce_scatter_along_first_dim / _gather_along_last_dim
    # allocate their outputs with `torch.empty(..., device=torch.cuda.current_device())`
    "megatron.core.tensor_parallel.mappings": "_gather_along_*_dim, _reduce_scatter_along_first_dim",
    # LinearWithGradAccumulationAndAsyncCommunication.backward under sequence parallel: the reduce-scatter
    # buffer `sub_grad_input = torch.empty(..., device=torch.cuda.current_device())`
    "megatron.core.tensor_parallel.layers": "LinearWithGradAccumulationAndAsyncCommunication.forward/backward",
    # forward_backward_*: `total_num_tokens = torch.zeros([], dtype=torch.int, device="cuda")`
    "megatron.core.pipeline_parallel.schedules": "forward_backward_no_pipelining / _pipelining_without_interleaving",
    # _communicate_shapes / _communicate: recv buffers on `torch.cuda.current_device()`, `torch.cuda.synchronize()`
    "megatron.core.pipeline_parallel.p2p_communication": "_communicate, _communicate_shapes",
    # torch_dist save: `torch.tensor([...], device='cuda')` in the reuse check and the failure all-reduce
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "verify_global_md_reuse, save_state_dict_async_finalize",
    # FileSystemWriterAsync.preload_tensors: `torch.cuda.synchronize()` before writing the shards
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "FileSystemWriterAsync.preload_tensors",
    # FullyParallelSaveStrategyWrapper: `torch.cuda.synchronize()` around the exchange
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "FullyParallel*StrategyWrapper",
    # exchange of loaded shards between ranks: `torch.empty_like(..., device="cuda")`
    "megatron.core.dist_checkpointing.exchange_utils": "exchange_loaded_tensors_*",
    # _ParamAndGradBuffer: grad/param buffers `torch.zeros(..., device=torch.cuda.current_device())`
    "megatron.core.distributed.param_and_grad_buffer": "_ParamAndGradBuffer.__init__",
    # DistributedDataParallel.{free,allocate}_overlap_param_buffers: `torch.cuda.synchronize()`
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel buffer helpers",
    # MegatronOptimizer / FP32Optimizer: found_inf, _scale and _dummy_overflow_buf `torch.tensor(..., device='cuda')`
    "megatron.core.optimizer.optimizer": "MixedPrecisionOptimizer.__init__, FP32Optimizer.__init__, get_loss_scale",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 / count_zeros_fp32: `torch.zeros(..., device='cuda')`
    "megatron.core.optimizer.clip_grads": "get_grad_norm_fp32, clip_grad_by_total_norm_fp32, count_zeros_fp32",
    # DistributedOptimizer state gather/scatter buffers on `torch.cuda.current_device()`
    "megatron.core.optimizer.distrib_optimizer": "DistributedOptimizer.get_parameter_state_dp_zero et al.",
}

_applied = False


def _patch_type_strings() -> None:
    """Parameter-type checks that compare ``param.type()`` with ``'torch.cuda.*Tensor'`` strings.

    Upstream: ``clip_grads.clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() ==
    'torch.cuda.FloatTensor'``; ``DistributedOptimizer._build_model_and_main_param_groups`` and
    ``Float16OptimizerWithFloat16Params.__init__`` raise TypeError for any other string. On CPU the
    strings lack ``.cuda``, so ``param.type()`` is made to report the CUDA name for CPU float tensors
    while the calls run.
    """
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    cpu_to_cuda = {
        "torch.FloatTensor": "torch.cuda.FloatTensor",
        "torch.HalfTensor": "torch.cuda.HalfTensor",
        "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    }
    real_type = torch.Tensor.type

    def with_cuda_type_names(fn):
        def wrapper(*args, **kwargs):
            def fake_type(self, *a, **k):
                out = real_type(self, *a, **k)
                return cpu_to_cuda.get(out, out) if not a and not k else out

            torch.Tensor.type = fake_type
            try:
                return fn(*args, **kwargs)
            finally:
                torch.Tensor.type = real_type

        wrapper.__wrapped__ = fn
        return wrapper

    clip_grads.clip_grad_by_total_norm_fp32 = with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    # optimizer.py imports clip_grad_by_total_norm_fp32 by name: patch that reference too.
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    dopt = distrib_optimizer.DistributedOptimizer
    dopt._build_model_and_main_param_groups = classmethod(
        with_cuda_type_names(dopt._build_model_and_main_param_groups.__func__)
    )
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = with_cuda_type_names(f16.__init__)


def _patch_dp_zero_gather() -> None:
    """``DistributedOptimizer.get_parameter_state_dp_zero(use_gloo_comm=False)`` (called by the
    'fully_reshardable' checkpoint format) moves shards to CUDA with ``send_tensor.cuda()``. Without CUDA the
    data-parallel group is gloo anyway, so take megatron's own gloo branch (CPU tensors, gloo DP group)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.get_parameter_state_dp_zero

    def get_parameter_state_dp_zero(self, use_gloo_comm=True, *args, **kwargs):
        return original(self, True, *args, **kwargs)

    get_parameter_state_dp_zero.__wrapped__ = original
    DistributedOptimizer.get_parameter_state_dp_zero = get_parameter_state_dp_zero


def apply_cpu_shims() -> bool:
    """Install the shims once if CUDA is absent. Returns True when they are (now or already) in place."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    proxy = _CpuTorch()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy
    _patch_type_strings()
    _patch_dp_zero_gather()
    _applied = True
    return True


def patched_modules() -> dict[str, str]:
    """The modules whose ``torch`` is proxied, with the upstream calls each covers (for docs and tests)."""
    return dict(_PATCHED_MODULES)
