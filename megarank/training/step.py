"""One optimizer step through megatron-core's pipeline schedule (micro-batches of whole query groups)."""
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.parallel.init import any_rank, device

from megarank.training.loss import LOSSES, group_metrics


def _loss_func(loss_name: str, group_size: int, scores: torch.Tensor):
    loss = LOSSES[loss_name](scores, group_size)
    stats = group_metrics(scores, group_size)
    # The schedule divides the returned loss in place: log a detached copy.
    return loss, {"loss": loss.detach().clone(), "acc": stats["acc"], "mrr": stats["mrr"]}


def forward_step(data_iterator, model, loss_name: str):
    """megatron-core forward_step contract: return (output, loss_func) for one micro-batch."""
    batch = next(data_iterator)
    dev = device()
    scores = model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    return scores, partial(_loss_func, loss_name, batch["group_size"])


def _grads_finite(model) -> bool:
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is not None and not torch.isfinite(g).all():
            return False
    return True


def _mean_over_dp(values: dict) -> dict:
    """Average the last stage's micro-batch metrics over data-parallel ranks (only called there)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    t /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


def train_step(ddp_model, optimizer, scheduler, micro_batches: list, loss_name: str, seq_length: int) -> dict:
    """Forward/backward over the micro-batches, NaN/Inf guard, optimizer and LR step.

    Returns {"skipped": bool, "grad_norm", "lr", and on the last stage "loss", "acc", "mrr"}.
    """
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    rows = micro_batches[0]["input_ids"].shape[0]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_name=loss_name),
        data_iterator=iter(micro_batches),
        model=[ddp_model],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=rows,
        forward_only=False,
    )
    last_stage = parallel_state.is_pipeline_last_stage()
    local = {}
    if last_stage:
        local = {k: torch.stack([o[k] for o in outputs]).mean().item() for k in ("loss", "acc", "mrr")}
    finite = (not last_stage or torch.isfinite(torch.tensor(local["loss"])).item()) and _grads_finite(ddp_model)
    result = {"skipped": any_rank(not finite), "lr": optimizer.param_groups[0]["lr"]}
    if result["skipped"]:
        result["grad_norm"] = float("nan")
    else:
        ok, grad_norm, _ = optimizer.step()
        result["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
        result["skipped"] = not ok
        if ok:
            scheduler.step(increment=1)
    if last_stage:
        result.update(_mean_over_dp(local))
    return result
