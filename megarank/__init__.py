"""megarank: Megatron-style training of bidirectional Llama cross-encoder rerankers (README.md).

``from megarank import Reranker`` is the Python API (``megarank.scoring``); it is imported on first use, so that
``import megarank`` (and every command that fails on its arguments) stays free of torch and megatron-core.
"""

__all__ = ["Reranker"]


def __getattr__(name: str):
    if name == "Reranker":
        from megarank.scoring import Reranker

        return Reranker
    raise AttributeError(f"module 'megarank' has no attribute {name!r}")
