"""Batched, no-grad scoring and reranking of query-candidate pairs on any TP/PP/DP layout.

Batches come length-sorted from ``megarank.data.rerank_batches``; data-parallel ranks take every dp-th batch;
each batch runs through megatron-core's schedule in forward-only mode (so pipeline stages work), and the
scores from every last-stage, first-TP rank are gathered on all ranks.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.parallel.init import device


def _collect(scores):
    return scores.new_zeros(()), {"scores": scores.detach().float()[:, 0].cpu()}


def _forward(data_iterator, model):
    batch = next(data_iterator)
    dev = device()
    return model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev)), _collect


@torch.no_grad()
def score_batches(model, batches) -> dict:
    """Score ``(pairs, batch)`` items; returns {(qid, docid): score} on every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    holds_scores = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    was_training = model.training
    model.eval()
    local = []
    for i, (pairs, batch) in enumerate(batches):
        if i % dp_size != dp_rank:
            continue
        out = get_forward_backward_func()(
            forward_step_func=_forward,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=batch["input_ids"].shape[1],
            micro_batch_size=batch["input_ids"].shape[0],
            forward_only=True,
        )
        if holds_scores:
            local.extend(zip(pairs, out[0]["scores"].tolist()))
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
