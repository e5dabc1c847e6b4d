"""megatron-core DDP, the (distributed) AdamW optimizer and the LR schedule, built from megarank's config.

Without apex/TE megatron-core's optimizer is ``torch.optim.AdamW`` under its wrappers (fp32 master weights
for bf16, ZeRO-1 sharding with the distributed optimizer). Weight decay skips 1-D parameters (the norms),
megatron-core's default.
"""
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megarank.config import Config


def wrap_ddp(model, cfg: Config, *, cuda: bool | None = None, syncs_params_before_reads: bool = False) -> DistributedDataParallel:
    """Gradient buffers + data-parallel all-reduce (or reduce-scatter for the distributed optimizer).

    The two overlaps are the communication settings of Megatron-LM's Llama recipes; they change no numbers
    and need CUDA streams, so they are on only with CUDA (``cuda`` defaults to torch.cuda.is_available()).

    With ``parallel.overlap_param_gather`` the distributed optimizer's step leaves the parameters owned by
    other data-parallel ranks stale; forward pre-hooks all-gather them at the next forward, training or
    evaluation (distributed_data_parallel.py:384-419; finish_grad_sync re-arms them,
    param_and_grad_buffer.py:516). Code that reads weights without a forward -- a checkpoint save right
    after a step, an export -- must first call ``ddp.start_param_sync(force_sync=True)`` (what
    Megatron-LM's ``disable_forward_pre_hook`` does before saving). The overlap is therefore used only when
    the caller says it does that (``syncs_params_before_reads=True``).
    """
    p = cfg.parallel
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=on_gpu and p.overlap_grad_reduce,
        # The all-gather of updated parameters only exists with the distributed optimizer.
        overlap_param_gather=(on_gpu and p.use_distributed_optimizer and p.overlap_param_gather
                              and syncs_params_before_reads),
        use_distributed_optimizer=p.use_distributed_optimizer,
        average_in_collective=True,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return ddp


def build_optimizer(ddp_model, cfg: Config):
    t = cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        params_dtype=cfg.model.torch_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    patch_torch_adamw_loading()
    optimizer = get_megatron_optimizer(opt_config, [ddp_model])
    if opt_config.fp16:
        ddp_model.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, cfg: Config) -> OptimizerParamScheduler:
    """Linear warm-up over W = train.lr_warmup_steps steps, then decay to min_lr. Step k (1-based) trains at

        lr * k / W                                          for 1 <= k <= W,
        decay from lr at ratio (k - V) / (steps + 1 - V)    for k >= V = max(W, 1)

    (cosine or linear; "constant" stays at lr). The scheduler is stepped after each applied update, so step k
    runs at ``get_lr()`` with num_steps = k - 1 (optimizer_param_scheduler.py:227-230). Megatron-LM steps it
    the same way, after ``optimizer.step()``, so with init_lr 0 its first update runs at lr 0 (its
    --lr-warmup-init default); here init_lr = lr / W and a warm-up of W - 1 scheduler steps give exactly
    lr * k / W, while ``num_steps`` still counts applied updates (what checkpoints store). W = 0 and W = 1
    give the same schedule: step 1 at the full lr.
    """
    t = cfg.train
    warmup = min(t.lr_warmup_steps, t.steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=t.lr / warmup if warmup > 1 else 0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=max(warmup - 1, 0),
        lr_decay_steps=t.steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        # The config, not the checkpoint, defines the schedule (so a run can be extended); only the step
        # count is restored on resume.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def inner_optimizers(optimizer) -> list:
    """The megatron optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def patch_torch_adamw_loading() -> None:
    """megatron-core 0.16.1 without apex/TE (torch AdamW): ``DistributedOptimizer.load_state_dict`` puts a
    ``step`` entry in every param state, then ``_set_main_param_and_optimizer_states`` copies every state key
    from the 'fully_reshardable' tensors, which never contain ``step`` -> KeyError. Copy the keys that are
    there; ``step`` was already restored from the param groups. No-op with apex/TE (FusedAdam has no
    per-param ``step``)."""
    from megatron.core.optimizer import distrib_optimizer as do

    if getattr(do, "HAVE_APEX_OR_TE", True) or getattr(do.DistributedOptimizer, "_megarank_patched", False):
        return
    original = do.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **self.optimizer.state[main_param]}
            for key, value in tensors.items():
                dst[key].copy_(value)
            return
        original(self, model_param, tensors)

    do.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    do.DistributedOptimizer._megarank_patched = True
