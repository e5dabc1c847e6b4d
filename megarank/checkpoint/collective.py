"""The few collectives checkpointing needs (each one a no-op without a process group)."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return rank() == 0


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when ``flag`` is True on any."""
    if world_size() == 1:
        return flag
    from megarank.parallel.init import any_rank as _any_rank

    return _any_rank(flag)


def first_error(message: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error message (or None), the same on every rank."""
    if world_size() == 1:
        return message
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)
