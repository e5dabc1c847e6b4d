"""One log line per log step (on the last pipeline stage's first rank) and TensorBoard event files.

``MFU`` in the line is model FLOPs utilisation of the step (megarank/training/flops.py): the model FLOPs of the
real, non-padding tokens of all data-parallel replicas per second over the peak of all devices; ``n/a`` where
the device's peak is unknown. TensorBoard gets it as ``train/mfu`` (a fraction, 0-1). ``data wait`` (TensorBoard
``train/data_wait``, seconds): how long the step waited for its groups and micro-batches, built on a worker
thread during the step before (megarank/training/prefetch.py); near 0 when the data keeps up.
"""
import logging
import math
import time
from typing import Optional

log = logging.getLogger("megarank.train")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _fmt_mfu(value) -> str:
    return f"{100 * value:.1f}%" if _finite(value) else "n/a"


class MetricsLogger:
    """The log line, TensorBoard and (when given) a W&B run (megarank/training/wandb_run.py); all only where
    ``enabled`` (the logging rank)."""

    def __init__(self, enabled: bool, total_steps: int, tensorboard_dir: Optional[str] = None, wandb=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self.writer = None
        self.wandb = wandb if enabled else None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)

    def step(self, step: int, metrics: dict, steps_done_this_run: int) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        eta = elapsed / max(steps_done_this_run, 1) * (self.total_steps - step)
        groups = metrics.get("groups") or {}  # a blend's groups per source in this step's global batch
        source_loss = metrics.get("source_loss") or {}  # and the mean loss of each source's groups
        log.info(
            "step %d/%d | loss %.4f | acc %.3f | mrr %.3f | lr %.3e | grad norm %.3f | %.0f tokens/s | MFU %s | "
            "elapsed %s | ETA %s%s%s%s",
            step, self.total_steps, metrics["loss"], metrics["acc"], metrics["mrr"], metrics["lr"],
            metrics["grad_norm"], metrics["tokens_per_s"], _fmt_mfu(metrics.get("mfu")), _fmt_duration(elapsed),
            _fmt_duration(eta), f" | groups {', '.join(f'{name} {n}' for name, n in groups.items())}" if groups else "",
            f" | loss by source {', '.join(f'{name} {v:.4f}' for name, v in source_loss.items())}" if source_loss else "",
            f" | data wait {1000 * metrics['data_wait']:.1f} ms" if "data_wait" in metrics else "",
        )
        values = {k: v for k, v in metrics.items() if k not in ("groups", "source_loss") and (k != "mfu" or _finite(v))}
        values.update({f"groups/{name}": n for name, n in groups.items()})
        values.update({f"{name}/loss": v for name, v in source_loss.items()})
        self.scalars("train", step, values)

    def validation(self, step: int, metrics: dict) -> None:
        """The held-out validation line (megarank/training/validation.py): loss, acc@1 and MRR over all validation
        groups, then per set when there are several; TensorBoard ``valid/loss`` ... and ``valid/<set>/loss`` ..."""
        if not self.enabled:
            return
        names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in metrics if "/" in k))
        log.info("valid step %d | loss %.4f | acc %.3f | mrr %.3f | groups %d%s", step, metrics["loss"],
                 metrics["acc"], metrics["mrr"], metrics["groups"],
                 "".join(f" | {n}: loss {metrics[n + '/loss']:.4f} acc {metrics[n + '/acc']:.3f} "
                         f"mrr {metrics[n + '/mrr']:.3f} groups {metrics[n + '/groups']}" for n in names))
        self.scalars("valid", step, metrics)

    def scalars(self, prefix: str, step: int, values: dict) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", float(v), step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(prefix, step, values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
