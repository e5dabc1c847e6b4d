"""Fixtures shared by the test modules."""
import pytest


@pytest.fixture(scope="module")
def one_rank():
    """One in-process rank (gloo on CPU, nccl on GPU) with TP=PP=1 for the whole module."""
    from megarank.parallel.init import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    yield
    destroy_distributed()
