"""megarank's Python API: a reranker from a checkpoint (or a live model) that scores pairs, reranks passages and
evaluates on a BEIR split. ``from megarank import Reranker`` is the same class."""
from megarank.scoring.reranker import EvaluationResult, Ranked, Reranker

__all__ = ["EvaluationResult", "Ranked", "Reranker"]
