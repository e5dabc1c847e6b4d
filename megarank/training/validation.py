"""Held-out validation during training, and a blend's training loss per source.

Validation groups (docs/data.md#validation) are named sets: the held-out part of each training source
(``data.valid_fraction``: megarank/data/holdout.py; a blend source's groups with its query prefix) and the groups of
``data.valid_path``, each at most ``data.valid_max_groups``, built once (epoch 0's negatives) and tokenized once
into micro-batches by the run's own micro-batcher (``train.micro_batch_size`` or ``micro_batch_tokens``, padded or
packed). The groups of all sets are cut into ``dp`` contiguous slices, one per data-parallel rank; every rank runs
the same number of forward calls (a rank with fewer micro-batches runs its last one again, or, with no group of its
own, the first group, and drops the result), because collectives inside a forward (FP8 delayed scaling's amax)
must match across ranks. The pass is megatron's schedule in forward-only mode (so TP, PP and CP work as in training,
through the same model inputs), the model in eval mode (no dropout), no gradient, no random numbers drawn: the
training that follows is the same as without it.

Each group gives its loss (``train.loss`` on the group alone: every loss is a mean over groups of a per-group
value), whether its best positive ranks first (acc@1) and 1 / that rank (MRR). Sums and counts per set are reduced
over data-parallel ranks in float64, so the reported values are exact means over all validation groups (not means of
per-rank means); with more than one set each set is reported too (``valid/<set>/loss`` ...).

A blend's per-source training loss: each step's micro-batches carry their groups' source numbers (``source``), the
step (megarank/training/step.py) returns each group's own loss beside the trained loss, and `per_source_loss`
averages them per source over the data-parallel replicas: the count-weighted mean of the sources' losses is the
step's loss (up to rounding).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.data import BlendedGroupSource
from megarank.data.holdout import TrainingPart
from megarank.model.inputs import model_inputs
from megarank.parallel.init import device
from megarank.training.loss import per_group_losses, positive_ranks
from megarank.training.step import check_pipeline_shapes

log = logging.getLogger("megarank.train")

_SUMS = ("groups", "loss", "acc", "mrr")  # per set: groups counted, then the sums of each metric


def validation_sets(cfg, source, valid_source) -> list[tuple[str, list]]:
    """``[(name, groups)]``: each training source's held-out groups (named as the blend names its sources; a single
    source by its path's last part), then ``data.valid_path``'s (named by its last part, ``#valid`` added when a
    source has that name); at most ``data.valid_max_groups`` each. Empty when there is nothing to validate."""
    d, cap = cfg.data, cfg.data.valid_max_groups
    sets = []
    if isinstance(source, BlendedGroupSource):
        for name, part, prefix in zip(source.names, source.sources, source.query_prefixes):
            if isinstance(part, TrainingPart):
                groups = part.held_out_groups(cap)
                sets.append((name, [g._replace(query=prefix + g.query) for g in groups] if prefix else groups))
    elif isinstance(source, TrainingPart):
        sets.append((Path(d.train_path).name if d.train_path else "sample", source.held_out_groups(cap)))
    if valid_source is not None:
        name = Path(d.valid_path).name or str(d.valid_path)
        name = f"{name}#valid" if name in {n for n, _ in sets} else name
        sets.append((name, [valid_source.get(i, 0) for i in range(min(cap, len(valid_source)))]))
    return [(name, groups) for name, groups in sets if groups]  # a source of one group holds none out


def _sums(loss_fn: Callable, relevance, teacher, set_ids, num_sets: int, scores):
    """The loss_func of one validation micro-batch: per set, [groups, loss, acc, mrr] summed over its groups
    (zeros for a forward whose result is dropped: ``set_ids`` None)."""
    sums = torch.zeros(num_sets, len(_SUMS), dtype=torch.float64, device=scores.device)
    if set_ids is not None:
        ranks = positive_ranks(scores, relevance).double()
        per_group = torch.stack([torch.ones_like(ranks), per_group_losses(loss_fn, scores, relevance, teacher),
                                 (ranks == 1).double(), 1.0 / ranks], dim=1)
        sums.index_add_(0, set_ids.to(sums.device), per_group.to(sums.device))
    return scores.new_zeros(()), {"sums": sums}


def _forward(data_iterator, model, loss_fn: Callable, num_sets: int):
    batch = next(data_iterator)
    args, kwargs = model_inputs(batch, device())  # padded, or packed; split over CP ranks there
    scores = model(*args, **kwargs)
    relevance = batch["relevance"].to(scores.device)
    teacher = batch.get("teacher")
    teacher = teacher.to(scores.device) if teacher is not None else None
    return scores, partial(_sums, loss_fn, relevance, teacher, batch.get("valid_set"), num_sets)


class Validator:
    """The validation pass of a run: ``sets`` from `validation_sets`, ``micro_batches`` the run's micro-batcher,
    ``loss_fn`` the run's loss (``make_loss``). Built on every rank (collective over data parallel: the forward
    count). ``run(model)`` -> metrics on the last pipeline stage, None elsewhere."""

    def __init__(self, sets: list[tuple[str, list]], micro_batches: Callable[[list], list], loss_fn: Callable):
        self.names = [name for name, _ in sets]
        self.sizes = [len(groups) for _, groups in sets]
        self.loss_fn = loss_fn
        groups = [g for _, gs in sets for g in gs]
        ids = [i for i, (_, gs) in enumerate(sets) for _ in gs]
        rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        lo, hi = rank * len(groups) // size, (rank + 1) * len(groups) // size
        batches = []
        if lo < hi:
            batches = micro_batches(groups[lo:hi])
            at = lo
            for batch in batches:  # micro-batches hold whole groups, in order
                n = batch["relevance"].shape[0]
                batch["valid_set"] = torch.tensor(ids[at : at + n], dtype=torch.long)
                at += n
            spare = {k: v for k, v in batches[-1].items() if k != "valid_set"}  # run again, result dropped
        else:  # fewer groups than ranks: the first group's forward, result dropped
            spare = micro_batches(groups[:1])[0]
        forwards = torch.tensor([max(len(batches), 1)], dtype=torch.long, device=device())
        if size > 1:
            dist.all_reduce(forwards, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        self.batches = batches + [spare] * (int(forwards.item()) - len(batches))

    def describe(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in zip(self.names, self.sizes))

    @torch.no_grad()
    def run(self, model) -> Optional[dict]:
        """Collective over the world: the forward-only pass, model in eval mode (its mode restored), and the sums
        reduced over data parallel. -> {"loss", "acc", "mrr", "groups"} over all groups, plus "<set>/loss", ... per
        set when there are several, on the last pipeline stage; None elsewhere."""
        check_pipeline_shapes(model.config, self.batches)
        first = self.batches[0]["input_ids"]
        was_training = model.training
        model.eval()
        try:
            outputs = get_forward_backward_func()(
                forward_step_func=partial(_forward, loss_fn=self.loss_fn, num_sets=len(self.names)),
                data_iterator=iter(self.batches),
                model=[model],
                num_microbatches=len(self.batches),
                seq_length=first.shape[1],
                micro_batch_size=first.shape[0],
                forward_only=True,
            )
        finally:
            model.train(was_training)
        if not parallel_state.is_pipeline_last_stage():
            return None
        sums = torch.stack([o["sums"] for o in outputs]).sum(0)
        if parallel_state.get_data_parallel_world_size() > 1:
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        sums = sums.cpu()
        metrics = _means(sums.sum(0))
        if len(self.names) > 1:
            for name, row in zip(self.names, sums):
                metrics.update({f"{name}/{k}": v for k, v in _means(row).items()})
        return metrics


def _means(row: torch.Tensor) -> dict:
    count = row[0].item()
    means = {k: (row[i].item() / count if count else float("nan")) for i, k in enumerate(_SUMS) if i}
    return {**means, "groups": int(count)}


def tag_sources(micro_batches: list, blend: BlendedGroupSource, positions: list[int]) -> None:
    """Give each micro-batch of this rank's step its groups' source numbers (``source``, one per group):
    ``positions`` are the whole global batch's blend positions, this data-parallel rank's slice is its groups, in
    micro-batch order."""
    size = parallel_state.get_data_parallel_world_size()
    per_rank = len(positions) // size
    start = parallel_state.get_data_parallel_rank() * per_rank
    ids = [blend.source_of(i) for i in positions[start : start + per_rank]]
    at = 0
    for batch in micro_batches:
        n = batch["relevance"].shape[0]
        batch["source"] = torch.tensor(ids[at : at + n], dtype=torch.long)
        at += n


def per_source_loss(result: dict, names: list[str]) -> dict:
    """Collective over data parallel, on the last pipeline stage (where ``result`` has the step's
    ``group_losses`` / ``group_sources``): {source name: mean loss of its groups in the step's global batch},
    sources without a group in the step left out."""
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    sums.index_add_(0, result["group_sources"].long(),
                    torch.stack([torch.ones_like(result["group_losses"]), result["group_losses"].double()], dim=1))
    if parallel_state.get_data_parallel_world_size() > 1:
        sums = sums.to(device())
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        sums = sums.cpu()
    return {name: (total / count) for name, (count, total) in zip(names, sums.tolist()) if count}
