"""Weights & Biases beside TensorBoard (``logging.wandb_*``, off by default), on the logging rank only.

As Megatron-LM does (``megatron/training/global_vars.py`` ``_set_wandb_writer``: ``wandb.init(dir=..., name=...,
project=..., config=vars(args))``, then ``writer.log({key: value}, iteration)``), with what a SLURM user expects on
top: the run is named after the SLURM job and grouped by its name, and a resumed or requeued run continues the same
W&B run (its id is derived from the checkpoint folder; ``resume="allow"``). W&B drops history steps at or below the
last step it has for a run, so after a crash the steps between the last checkpoint and the crash keep their first
values there (TensorBoard keeps both).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional


def run_id(run_dir: Optional[Path]) -> Optional[str]:
    """A stable W&B run id for a checkpoint folder (None without one: a new run each time)."""
    if run_dir is None:
        return None
    return "megarank-" + hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def init_kwargs(lg, run_dir: Optional[Path], config: dict, env: Mapping[str, str] = os.environ) -> dict:
    """The arguments of ``wandb.init`` for logging config ``lg`` (megarank.config.LoggingConfig)."""
    slurm_name, slurm_id = env.get("SLURM_JOB_NAME"), env.get("SLURM_JOB_ID")
    name = lg.wandb_name or (f"{slurm_name}-{slurm_id}" if slurm_name and slurm_id else None)
    if name is None and run_dir is not None:
        name = Path(run_dir).resolve().name
    directory = lg.wandb_dir or (str(Path(run_dir) / "wandb") if run_dir is not None else "wandb")
    rid = run_id(run_dir)
    return {"project": lg.wandb_project, "entity": lg.wandb_entity, "name": name,
            "group": lg.wandb_group or slurm_name, "mode": lg.wandb_mode, "dir": directory, "config": config,
            "id": rid, "resume": "allow" if rid else None}


class WandbRun:
    """One W&B run: ``log(prefix, step, values)`` as TensorBoard's scalars, ``close()`` at the end."""

    def __init__(self, lg, run_dir: Optional[Path], config: dict):
        import wandb  # validate() checked it is installed

        kwargs = init_kwargs(lg, run_dir, config)
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)
        # console="off": megarank's own log lines already reach the job log; W&B would wrap stdout/stderr.
        self.run = wandb.init(**kwargs, settings=wandb.Settings(console="off"))

    def log(self, prefix: str, step: int, values: dict) -> None:
        self.run.log({f"{prefix}/{k}": float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()
