"""megarank: Megatron-style training of bidirectional Llama cross-encoder rerankers (README.md).

``from megarank import Reranker`` is the Python API (``megarank.scoring``); it is imported on first use, so that
``import megarank`` (and every command that fails on its arguments) stays free of torch and megatron-core.
"""

import os as _os

__all__ = ["Reranker"]

# This process's parent when Python first imported megarank (before torch and megatron-core, which take ~15 s to
# import): a torchrun worker's agent, for the watchdog (megarank/training/watchdog.py), so that an agent killed
# while its workers still import is noticed.
_PARENT_PID_AT_START = _os.getppid()


def __getattr__(name: str):
    if name == "Reranker":
        from megarank.scoring import Reranker

        return Reranker
    raise AttributeError(f"module 'megarank' has no attribute {name!r}")
