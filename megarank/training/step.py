"""One optimizer step through megatron-core's pipeline schedule (micro-batches of whole query groups).

The optimizer step is megatron's own ``ChainedOptimizer.step`` (megatron/core/optimizer/optimizer.py:1308-1338:
prepare_grads, get_grad_norm, clip_grad_by_total_norm_fp32, step_with_ready_grads) taken apart so that the
NaN/Inf guard can sit between the grad norm and the update. megatron itself only skips a step when fp16's
loss scaler finds an overflow (``prepare_grads`` returns found_inf, optimizer.py:596-598); with bf16/fp32 a NaN
grad norm gives a NaN clip coefficient, ``clip_coeff < 1.0`` is False (clip_grads.py:172-173), so the NaN
gradients are applied unclipped and every weight turns NaN. The guard reads the one global grad norm megatron
computes anyway (one all-reduce and one host sync per step, however many parameters), plus one flag all-reduce
for the loss.
"""
import math
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megarank.model.inputs import model_inputs
from megarank.parallel.init import any_rank, device
from megarank.training.loss import group_loss, group_metrics, per_group_losses
from megarank.training.optimizer import inner_optimizers

_LOGGED = ("loss", "acc", "mrr")


def loss_function(loss) -> Callable:
    """``loss``: a ``train.loss`` name (its defaults) or a callable ``(scores, relevance, teacher) -> mean loss over
    the groups`` (the loop builds one from the config: name, teacher temperature, distillation weight)."""
    return partial(group_loss, loss) if isinstance(loss, str) else loss


def _loss_func(loss_fn: Callable, relevance: torch.Tensor, teacher, weight: float, scores: torch.Tensor,
               sources=None):
    """The micro-batch's mean loss over its groups, times ``weight`` (its share of the step's groups x the
    number of micro-batches; 1.0 when every micro-batch holds as many groups, see
    megarank.data.batcher.Batcher.micro_batches), so the mean over micro-batches is the mean over groups.
    ``sources`` (a blend's micro-batch: each group's source number) adds each group's own loss, detached, beside
    the trained loss, which stays as it is (megarank/training/validation.py reports them per source)."""
    loss = loss_fn(scores, relevance, teacher)
    stats = group_metrics(scores, relevance)
    if weight != 1.0:
        loss, stats = loss * weight, {k: v * weight for k, v in stats.items()}
    # The schedule divides the returned loss in place: log a detached copy.
    logged = {"loss": loss.detach().clone(), "acc": stats["acc"], "mrr": stats["mrr"]}
    if sources is not None:
        logged.update(group_losses=per_group_losses(loss_fn, scores, relevance, teacher), group_sources=sources)
    return loss, logged


def forward_step(data_iterator, model, loss_fn: Callable):
    """megatron-core forward_step contract: return (output, loss_func) for one micro-batch. The targets (graded
    relevance, teacher logits) travel with the batch: every stage of a replica holds the same micro-batches, and
    only the last stage's loss_func reads them."""
    batch = next(data_iterator)
    args, kwargs = model_inputs(batch, device())  # padded, or packed (megarank.model.inputs)
    scores = model(*args, **kwargs)
    relevance = batch["relevance"].to(scores.device, non_blocking=True)
    teacher = batch.get("teacher")
    if teacher is not None:
        teacher = teacher.to(scores.device, non_blocking=True)
    return scores, partial(_loss_func, loss_fn, relevance, teacher, batch.get("loss_weight", 1.0),
                           sources=batch.get("source"))


def check_pipeline_shapes(model_config, micro_batches: list) -> None:
    """Pipeline stages size their receive buffers from one shape unless ``variable_seq_lengths`` makes them
    exchange each micro-batch's shape first (p2p_communication.py:301-307): fail clearly instead of in p2p."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1 or model_config.variable_seq_lengths:
        return
    shapes = {tuple(b["input_ids"].shape) for b in micro_batches}
    if len(shapes) > 1:
        raise ValueError(f"micro-batches of shapes {sorted(shapes)} under pipeline parallelism need "
                         "TransformerConfig.variable_seq_lengths=True (set by make_transformer_config)")


def _mean_over_dp(values: dict) -> dict:
    """Average the last stage's micro-batch metrics over data-parallel ranks (only called there)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    t /= parallel_state.get_data_parallel_world_size()
    return dict(zip(keys, t.tolist()))


def _clip(optimizer, grad_norm: float) -> None:
    """Clip by the global norm as megatron's step does (optimizer.py:1316-1330). ``clip_grads`` is read at
    call time: on CPU megarank.parallel.cpu replaces its function."""
    for opt in inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grads.clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


@torch.no_grad()
def guarded_optimizer_step(optimizer, loss_finite: bool) -> tuple[bool, float]:
    """Collective: megatron's optimizer step unless the loss (on any rank) or the global grad norm is not
    finite. -> (applied, grad_norm). The same on every rank: the grad norm is all-reduced over the
    optimizer's grad-stats group (model-parallel group, or the world with the distributed optimizer) after
    the gradients were reduced over data parallel, so a NaN anywhere reaches every rank's norm."""
    found_inf = optimizer.prepare_grads()  # fp16: unscale + overflow check, loss scaler updated
    grad_norm = float("inf") if found_inf else float(optimizer.get_grad_norm())
    if any_rank(not (loss_finite and math.isfinite(grad_norm))):
        return False, grad_norm  # weights, Adam state and the LR schedule stay as they were
    _clip(optimizer, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(ddp_model, optimizer, scheduler, micro_batches: list, loss) -> dict:
    """Forward/backward over the micro-batches, NaN/Inf guard, optimizer and LR step.

    Micro-batches may have different sequence lengths (each is padded to its own longest, or packed into one
    [1, t] stream): under pipeline parallelism the stages exchange every activation's shape
    (``variable_seq_lengths``), so ``seq_length`` and ``micro_batch_size`` below are ignored by the p2p code
    (schedules.py:104-107).

    Returns {"skipped": bool, "grad_norm", "lr", and on the last stage "loss", "acc", "mrr"; with micro-batches
    that carry a "source" tensor (a blend's) also this rank's "group_losses" and "group_sources", one per group}.
    """
    check_pipeline_shapes(ddp_model.config, micro_batches)
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    first = micro_batches[0]["input_ids"]
    outputs = get_forward_backward_func()(
        forward_step_func=partial(forward_step, loss_fn=loss_function(loss)),
        data_iterator=iter(micro_batches),
        model=[ddp_model],
        num_microbatches=len(micro_batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=False,
    )
    last_stage = parallel_state.is_pipeline_last_stage()
    local = {}
    if last_stage:  # one host copy for all metrics
        means = torch.stack([torch.stack([o[k].float() for k in _LOGGED]) for o in outputs]).mean(0).tolist()
        local = dict(zip(_LOGGED, means))
        per_group = {k: torch.cat([o[k].cpu() for o in outputs]) for k in ("group_losses", "group_sources")
                     if k in outputs[0]}
    lr = optimizer.param_groups[0]["lr"]
    applied, grad_norm = guarded_optimizer_step(optimizer, not last_stage or math.isfinite(local["loss"]))
    if applied:
        scheduler.step(increment=1)
    result = {"skipped": not applied, "lr": lr, "grad_norm": grad_norm}
    if last_stage:
        result.update(_mean_over_dp(local), **per_group)
    return result
