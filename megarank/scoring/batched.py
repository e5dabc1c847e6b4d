"""Batched, no-grad scoring and reranking of query-candidate pairs on any TP/PP/DP layout.

Batches come length-sorted from ``scoring_batcher(...).scoring_batches`` (megarank/data/batcher.py): padded to
their own longest pair (pipeline stages exchange every activation's shape: ``variable_seq_lengths`` in
model/transformer_config.py) or, with ``data.packing``, packed into one stream whose length is a multiple of the TP
size too; either ``batch_size`` pairs each or, with a token budget (``--batch-tokens``, ``data.eval_batch_tokens``),
as many pairs as fit the budget: short pairs then go in larger batches. Every rank builds the same list of batches
(the split depends only on the pairs' lengths), so the rounds below are the same on every rank either way. They are
dealt to data-parallel ranks in rounds of dp: in each round rank r scores the round's r-th batch. Every rank
makes the same number of forward calls: in a last, short round the ranks without a batch of their own score
the round's last batch again and drop the result, because collectives inside the forward must match across
ranks (Transformer Engine's FP8 delayed scaling all-reduces amax at the end of every autocast). Each batch
runs through megatron-core's schedule in forward-only mode (so pipeline stages work), and the scores from
every last-stage, first-TP rank are gathered on all ranks.
"""
from itertools import islice

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data.batcher import Batcher
from megarank.model.inputs import model_inputs
from megarank.parallel.init import device


def _collect(scores):
    return scores.new_zeros(()), {"scores": scores.detach().float()[:, 0].cpu()}


def _forward(data_iterator, model):
    batch = next(data_iterator)
    args, kwargs = model_inputs(batch, device())  # padded, or packed (megarank.model.inputs)
    return model(*args, **kwargs), _collect


def _score(model, batch) -> list:
    """Scores of one batch on the ranks that hold them (last stage, TP rank 0), else []."""
    out = get_forward_backward_func()(
        forward_step_func=_forward,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch["input_ids"].shape[1],
        micro_batch_size=batch["input_ids"].shape[0],
        forward_only=True,
    )
    return out[0]["scores"].tolist() if out else []


def dp_rounds(batches, dp_size: int):
    """Yield lists of up to dp_size consecutive items of ``batches`` (the last list may be shorter)."""
    it = iter(batches)
    while chunk := list(islice(it, dp_size)):
        yield chunk


def scoring_batcher(pair_tokenizer, packed: bool) -> Batcher:
    """The scoring ``Batcher`` of this process's layout: packed streams (``data.packing``) are a multiple of the
    tensor-parallel size too, so that sequence parallelism can split them, and batches split over context-parallel
    ranks as megarank/parallel/context.py needs; token budgets cost batches the same way.
    Use ``.scoring_batches(pairs, queries, corpus, batch_size, batch_tokens)`` for ``score_batches``."""
    return Batcher(pair_tokenizer, packed=packed,
                   tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                   context_parallel_size=parallel_state.get_context_parallel_world_size())


@torch.no_grad()
def score_batches(model, batches) -> dict:
    """Score ``(pairs, batch)`` items (padded or packed batches); returns {(qid, docid): score} on every rank.
    Collective over the world."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    holds_scores = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_context_parallel_rank() == 0)
    was_training = model.training
    model.eval()
    local = []
    try:
        for chunk in dp_rounds(batches, dp_size):
            pairs, batch = chunk[dp_rank] if dp_rank < len(chunk) else (None, chunk[-1][1])
            scores = _score(model, batch)
            if holds_scores and pairs is not None:  # pairs is None: the padding forward, result dropped
                local.extend(zip(pairs, scores))
    finally:
        model.train(was_training)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {pair: score for part in gathered for pair, score in part}


def scores_by_query(pair_scores: dict) -> dict:
    """{(qid, docid): s} -> {qid: {docid: s}}."""
    out: dict = {}
    for (qid, docid), s in pair_scores.items():
        out.setdefault(qid, {})[docid] = s
    return out
