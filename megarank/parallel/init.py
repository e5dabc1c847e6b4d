"""Process groups for TP x CP x PP x DP (nccl with CUDA, gloo without), seeding, and teardown."""
import datetime
import logging
import os

from typing import Optional

import torch
import torch.distributed as dist

from megarank.parallel.cpu import apply_cpu_shims

log = logging.getLogger(__name__)


def device() -> torch.device:
    """This rank's compute device: its GPU under CUDA, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def any_rank(value: bool) -> bool:
    """Collective: True on every rank if ``value`` is True on any rank."""
    flag = torch.tensor([1.0 if value else 0.0], device=device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


def init_distributed(tp: int = 1, pp: int = 1, backend: str = "auto", seed: int = 1234, timeout_minutes: int = 30,
                     cp: int = 1):
    """Initialise torch.distributed (from torchrun's env, or a single in-process rank) and megatron's groups.

    Returns (rank, world_size). World size must be divisible by tp * pp * cp; data-parallel size is the rest.
    megatron orders the ranks tp-cp-dp-pp (``initialize_model_parallel``'s ``order``): the CP ranks of
    a sequence are adjacent after the TP ranks ("tp-cp-ep-dp-pp", parallel_state.py:562), so CP traffic stays
    within a node while TP x CP fits in it.
    """
    from megatron.core import parallel_state

    if not torch.cuda.is_available():
        apply_cpu_shims()
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if world == 1 and "MASTER_ADDR" not in os.environ:
            # One process without torchrun: an in-memory store needs no port.
            dist.init_process_group(_backend(backend), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(_backend(backend), rank=rank, world_size=world, timeout=timeout)
    world = dist.get_world_size()
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline x context parallel size "
                         f"({tp} x {pp} x {cp})")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    set_seed(seed)
    return dist.get_rank(), world


def set_seed(seed: int) -> None:
    """Same seed on every rank for weights (megatron initialises the full master weight, then slices it);
    megatron's model-parallel RNG tracker for dropout on GPU, the CPU RNG on CPU."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        # The CUDA RNG tracker cannot exist without CUDA; the inference tracker's fork() uses the CPU RNG.
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def cuda_max_connections_problem(tensor_parallel_size: int, environ=None) -> Optional[str]:
    """A warning when TP communication overlap cannot work because CUDA_DEVICE_MAX_CONNECTIONS is not 1."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if tensor_parallel_size > 1 and value != "1":
        return (
            f"CUDA_DEVICE_MAX_CONNECTIONS is {value!r}, not '1': with tensor parallelism ({tensor_parallel_size}) "
            "megatron's communication overlap may run collectives after the GEMMs they should overlap "
            "(start workers with `megarank launch`, which sets it, or export CUDA_DEVICE_MAX_CONNECTIONS=1)"
        )
    return None
