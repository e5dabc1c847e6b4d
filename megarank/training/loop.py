"""The training loop: build everything from the config, resume, step, log, evaluate, checkpoint, stop."""
import logging
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megarank.checkpoint import RunCheckpoints
from megarank.config import Config, validate
from megarank.data import BlendedGroupSource
from megarank.hardware import peak_flops
from megarank.model import build_model
from megarank.parallel.init import device, init_distributed
from megarank.training.data import (
    make_group_source, make_loss, make_micro_batcher, make_pair_tokenizer, make_sampler, make_valid_source,
    resolve_tokenizer_dir,
)
from megarank.training.flops import mfu, micro_batches_flops, peak_dtype
from megarank.training.logger import MetricsLogger
from megarank.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megarank.training.optimizer_state import MegatronOptimizerState
from megarank.training.preemption import PreemptionWatcher
from megarank.training.prefetch import BatchPrefetcher
from megarank.training.watchdog import start_agent_watchdog
from megarank.training.step import train_step
from megarank.training.validation import Validator, per_source_loss, tag_sources, validation_sets

log = logging.getLogger("megarank.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/Inf loss or gradients."""


def _is_logging_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_context_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _step_work(micro: list, model_cfg) -> tuple[float, float]:
    """Collective over data parallel: (real tokens, model FLOPs) of this step's micro-batches summed over the
    data-parallel replicas (each trains different groups; token budgets give them different micro-batches). Every
    TP/PP rank of a replica holds the same micro-batches, so each counts its whole replica (megarank/training/flops.py)."""
    local = [float(sum(int(b["attention_mask"].sum()) for b in micro)), float(micro_batches_flops(model_cfg, micro))]
    if parallel_state.get_data_parallel_world_size() == 1:
        return local[0], local[1]
    totals = torch.tensor(local, dtype=torch.float64, device=device())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals[0].item(), totals[1].item()


def _log_truncation(pair_tokenizer) -> None:
    """Collective over data parallel, once per run (the first log step): how many of the training pairs encoded so
    far, on every data-parallel replica, had their query / their passage cut (docs/data.md#truncation)."""
    from megarank.data.truncation import TruncationCounts

    t = pair_tokenizer.truncation
    counts = [t.pairs, t.query_cut, t.passage_cut]
    if parallel_state.get_data_parallel_world_size() > 1:
        totals = torch.tensor(counts, dtype=torch.long, device=device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        counts = totals.tolist()
    message = TruncationCounts(*counts).message("training pairs so far", pair_tokenizer.max_query_length,
                                                pair_tokenizer.max_length)
    if message is not None and _is_logging_rank():
        log.warning("%s", message)


def _mfu_peak(cfg: Config) -> float:
    """The MFU denominator's per-device peak (FLOP/s), logged once with where it comes from. On a CPU it is a
    GEMM rate measured now with this rank's threads (megarank/hardware.py); ranks sharing one CPU each count as
    a device with the threads they have."""
    dtype = peak_dtype(cfg.model)
    peak, source = peak_flops(dtype, device())
    log.info("MFU = model FLOPs of the real (non-padding) tokens / step time / (%.3g TFLOP/s per device, %s, x %d "
             "devices)", peak / 1e12, source, dist.get_world_size())
    return peak


def _wandb_run(cfg, run_dir):
    """A W&B run on the logging rank when logging.wandb_project is set, else None."""
    if cfg.logging.wandb_project is None or not _is_logging_rank():
        return None
    from megarank.config import config_to_dict
    from megarank.training.wandb_run import WandbRun

    return WandbRun(cfg.logging, run_dir, config_to_dict(cfg))


def _evaluate(cfg, model, pair_tokenizer, metrics_logger, step) -> None:
    """Evaluate on data.eval_* through the public scorer (batching from data.eval_batch_tokens / eval_batch_size /
    packing); NaN scores rank their candidates last (megarank/scoring/beir.py) with a warning, so a diverging
    model shows up in the metrics instead of ending the run."""
    from megarank.scoring import Reranker
    from megarank.scoring.beir import count_nan

    d = cfg.data
    training_counts = pair_tokenizer.truncation.copy()
    ours, first_stage, scores = Reranker(model, pair_tokenizer, cfg).evaluate_beir(
        d.eval_path, d.eval_split, run=d.eval_run, top_k=d.eval_top_k, max_queries=d.eval_max_queries, nan_last=True)
    pair_tokenizer.truncation = training_counts  # the evaluation logged its own (first time); these are training's
    nan = count_nan(scores)
    if nan and _is_logging_rank():
        log.warning("eval step %d: %d of %d candidate scores are NaN; they rank last in the metrics", step, nan,
                    sum(len(docs) for docs in scores.values()))
    if _is_logging_rank():
        log.info("eval step %d | %s | first stage: %s", step,
                 " ".join(f"{k} {v:.4f}" for k, v in ours.items()), " ".join(f"{k} {v:.4f}" for k, v in first_stage.items()))
    metrics_logger.scalars("eval", step, ours)


def _validate(validator, model, metrics_logger, step) -> Optional[dict]:
    """Collective: the held-out validation pass (megarank/training/validation.py), logged on the logging rank."""
    metrics = validator.run(model)
    if metrics is not None and _is_logging_rank():
        metrics_logger.validation(step, metrics)
    return metrics


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured. Returns the last step's metrics on the logging rank."""
    p, t = cfg.parallel, cfg.train
    start_agent_watchdog()  # a torchrun worker ends (unsaved) if its agent is killed, from here on
    init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.backend, seed=t.seed,
                     cp=p.context_parallel_size)
    validate(cfg, world_size=dist.get_world_size())
    checkpoints = RunCheckpoints(cfg)  # the run lock, `latest` resolved once, architecture checked
    tokenizer_dir = resolve_tokenizer_dir(cfg, checkpoints.resume_from)  # a resumed step's own tokenizer first
    pair_tokenizer = make_pair_tokenizer(cfg, tokenizer_dir)
    source = make_group_source(cfg)
    micro_batches = make_micro_batcher(cfg, pair_tokenizer)
    loss = make_loss(cfg)
    sampler = make_sampler(cfg, len(source), parallel_state.get_data_parallel_rank(),
                           parallel_state.get_data_parallel_world_size())
    valid_sets = validation_sets(cfg, source, make_valid_source(cfg))  # held-out groups, data.valid_path's
    training_counts = pair_tokenizer.truncation.copy()
    validator = Validator(valid_sets, micro_batches, loss) if valid_sets else None
    pair_tokenizer.truncation = training_counts  # the truncation counts are the training pairs'
    # A resume or checkpoint.load overwrites every weight right after: skip megatron's random init.
    model = build_model(cfg.model, cfg.parallel, init_weights=not checkpoints.loads_weights, ddp_training=True)
    ddp = wrap_ddp(model, cfg, syncs_params_before_reads=True)  # saves sync before reading weights (below)
    optimizer = build_optimizer(ddp, cfg)
    scheduler = build_scheduler(optimizer, cfg)

    def sync_params():
        if ddp.use_forward_hook:  # overlap_param_gather: other DP ranks' shards are stale until the next forward
            ddp.start_param_sync(force_sync=True)

    progress = checkpoints.restore(model, MegatronOptimizerState(optimizer, model),
                                   {"scheduler": scheduler, "sampler": sampler}, tokenizer_dir, before_save=sync_params)
    step, nonfinite = progress["step"], progress["nonfinite"]
    run_dir = checkpoints.dir
    tb_dir = cfg.logging.tensorboard_dir or (str(run_dir / "tensorboard") if run_dir else None)
    logger = MetricsLogger(_is_logging_rank(), t.steps, tb_dir, _wandb_run(cfg, run_dir))
    watcher = PreemptionWatcher(str(run_dir) if run_dir else None, reports=_is_logging_rank())
    peak = _mfu_peak(cfg) if _is_logging_rank() else float("nan")
    is_blend = isinstance(source, BlendedGroupSource)
    counts_blend = is_blend and _is_logging_rank()  # only the logging rank reports
    if counts_blend:
        log.info("blend: %s", source.describe())
    if validator is not None and _is_logging_rank():
        log.info("validation groups: %s", validator.describe())
    valid = None
    metrics, start_step, saved_step, interrupted = {}, step, None, None
    truncation_logged = False
    # Step N+1's groups and micro-batches are built on a worker thread while step N trains (data_wait: how long
    # the step still waited for them); the run's sampler moves one step per step, so checkpoints are unchanged.
    batches = BatchPrefetcher(source, sampler, micro_batches, t.steps - step)
    while step < t.steps:
        tic = time.time()
        groups, micro, data_wait = batches.next()
        if is_blend:  # each group's source travels with its micro-batch: the loss per source
            tag_sources(micro, source, sampler.last_global_batch())
        blend_counts = source.source_counts(sampler.last_global_batch()) if counts_blend else None
        result = train_step(ddp, optimizer, scheduler, micro, loss)
        per_group = {k: result.pop(k) for k in ("group_losses", "group_sources") if k in result}
        step += 1
        nonfinite = nonfinite + 1 if result["skipped"] else 0
        if nonfinite >= t.max_nonfinite_steps:
            raise NonFiniteError(f"{nonfinite} consecutive steps had NaN/Inf loss or gradients (train.max_nonfinite_steps); stopping at step {step}")
        seconds = max(time.time() - tic, 1e-9)
        tokens, flops = _step_work(micro, cfg.model)
        metrics = {**result, "tokens_per_s": tokens / seconds, "mfu": mfu(flops, seconds, peak, dist.get_world_size()),
                   "nonfinite_skips": nonfinite, "data_wait": data_wait}
        if blend_counts is not None:
            metrics["groups"] = blend_counts  # per source, of the whole global batch
        if result["skipped"] and _is_logging_rank():  # every skipped step, not only those on a log step
            log.warning("step %d skipped: non-finite loss or gradients (%d in a row)", step, nonfinite)
        if step % t.log_interval == 0 or step == t.steps:
            if per_group:  # a blend, on the last pipeline stage: collective over data parallel
                metrics["source_loss"] = per_source_loss(per_group, source.names)
            logger.step(step, metrics, step - start_step)
            if not truncation_logged:  # once per run
                batches.pause()  # the counts, with the worker's step complete (not half of it)
                _log_truncation(pair_tokenizer)
                truncation_logged = True
        if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:
            batches.pause()  # validation and evaluation tokenize with the same tokenizer: not while the worker does
            if validator is not None:
                valid = _validate(validator, ddp, logger, step)
            if cfg.data.eval_path:
                _evaluate(cfg, ddp, pair_tokenizer, logger, step)
        if watcher.should_stop():
            saved = checkpoints.save(step, {"nonfinite": nonfinite})
            if saved is not None:
                watcher.clear()
            if watcher.interrupted:  # Ctrl-C: one line and exit 130 once everything is closed (below)
                interrupted = watcher.interruption(step, saved)
            elif _is_logging_rank():
                if saved is not None:
                    log.info("preempted: saved step %d", step)
                else:
                    log.warning("preempted at step %d; nothing saved (checkpoint.dir is not set)", step)
            break
        if checkpoints.maybe_save(step, t.steps, {"nonfinite": nonfinite}) is not None:
            saved_step = step
    batches.close()
    if step >= t.steps and validator is not None and interrupted is None:
        valid = _validate(validator, ddp, logger, step)
    if step >= t.steps and cfg.data.eval_path and interrupted is None:
        _evaluate(cfg, ddp, pair_tokenizer, logger, step)
    watcher.restore()
    logger.close()
    checkpoints.close()
    if interrupted is not None:
        raise interrupted
    metrics.update(step=step, saved_step=saved_step)
    if valid is not None:
        metrics["valid"] = valid
    return metrics
