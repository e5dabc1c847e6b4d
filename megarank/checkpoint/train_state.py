"""A training step's checkpoint: weights, optimizer state (handed in by the trainer), per-rank train state and
RNG, written through a hidden temp folder and published with ``latest``; and loading it back at any TP/PP/DP.

Optimizer state: the trainer hands in an :class:`OptimizerState` (megarank/training/optimizer_state.py holds
megatron-core's), which says what to save and puts what was loaded back; this package knows no optimizer
internals. Saves are synchronous: megatron-core 0.16.1's asynchronous path needs CUDA
(dist_checkpointing/strategies/async_utils.py:165, 212, 604 call ``torch.cuda``) and writes from helper
processes, which a SIGTERM to the worker's process group kills (megarank/checkpoint/writer.py keeps the
synchronous writer inside the trainer for that reason).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Protocol

import torch
import torch.distributed as dist

import megarank.checkpoint.safe_pickle as safe_pickle
from megarank.checkpoint.base_record import RECORD_KEY
from megarank.checkpoint.collective import barrier, is_rank0, rank
from megarank.checkpoint.integrity import verify_checkpoint_files, write_manifest
from megarank.checkpoint.layout import (
    CONFIG_FILE, EXTRA_DIR, MODEL_DIR, OPTIMIZER_DIR, STATE_DIR, TOKENIZER_DIR, CheckpointError, incomplete_dir_name,
    read_marker, step_dir_name, train_state_file, write_marker,
)
from megarank.checkpoint.run_folder import publish_latest, remove_incomplete
from megarank.checkpoint.weights import load_model_weights, model_sharded_state_dict, save_extra_state
from megarank.checkpoint.writer import keep_writer_in_process

log = logging.getLogger("megarank.checkpoint")


class OptimizerState(Protocol):
    """What a checkpoint needs from the trainer's optimizer (megatron-core's optimizers provide the first two as
    ``sharded_state_dict`` / ``load_state_dict``; megarank/training/optimizer_state.py adapts them)."""

    def sharded_state_dict(self, is_loading: bool, saved_keys: Optional[set] = None) -> dict:
        """What ``dist_checkpointing.save`` / ``.load`` take; ``saved_keys``: the keys of the checkpoint loaded."""

    def restore(self, loaded: dict) -> None:
        """Put what ``dist_checkpointing.load`` returned back into the optimizer."""

    def reload_model_params(self) -> None:
        """Copy freshly loaded model weights into the optimizer's main (fp32) parameters."""


def save_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        state["cuda"] = torch.cuda.get_rng_state()
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def load_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        from megatron.core import tensor_parallel

        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def current_layout() -> dict:
    """{"world_size", "tp", "pp", "cp", "dp"} of this process group (megatron's parallel state)."""
    from megatron.core import parallel_state

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not parallel_state.model_parallel_is_initialized():
        return {"world_size": world, "tp": 1, "pp": 1, "cp": 1, "dp": world}
    return {"world_size": world, "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def layout_change(step_dir) -> str:
    """'' when this run has the layout ``step_dir`` was saved at, else e.g.
    ' (saved at TP=2 PP=1 CP=1 DP=1, now TP=1 PP=1 CP=1 DP=2: weights and optimizer state resharded)'. Checkpoints
    written before context parallelism existed have no "cp": CP 1."""
    saved = read_marker(step_dir)
    now = current_layout()
    if not all(k in saved for k in ("tp", "pp", "dp")):
        return (f" (saved by {saved.get('world_size', '?')} ranks at an unrecorded TP/PP/DP; now TP={now['tp']} "
                f"PP={now['pp']} CP={now['cp']} DP={now['dp']})")
    saved = {"cp": 1, **saved}
    if all(saved[k] == now[k] for k in ("tp", "pp", "cp", "dp")):
        return ""
    fmt = lambda d: f"TP={d['tp']} PP={d['pp']} CP={d['cp']} DP={d['dp']}"  # noqa: E731
    return f" (saved at {fmt(saved)}, now {fmt(now)}: weights and optimizer state resharded)"


def save_training_checkpoint(run_dir, step: int, model, optimizer_state: Optional[OptimizerState], train_state: dict, cfg,
                             tokenizer_dir=None, lora_base: Optional[dict] = None) -> Path:
    """Collective. Write ``<run_dir>/step-N`` through a hidden temp folder, then publish ``latest``.

    ``model`` is the unwrapped LlamaReranker, ``optimizer_state`` the trainer's :class:`OptimizerState` (or None), ``train_state`` this rank's
    picklable-free dict of tensors/numbers (step, scheduler, sampler, RNG). ``lora_base``: a LoRA run's base
    record (megarank/checkpoint/base_record.py): ``model/`` then holds the trainable tensors only and the marker
    records the base they apply to. A kill at any point leaves
    ``latest`` on the previous complete checkpoint. Rank 0 writes the manifest after every rank's files are
    written, then renames the folder into place, publishes ``latest`` and removes older incomplete folders.
    """
    from megatron.core import dist_checkpointing

    from megarank.config import save_config

    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / incomplete_dir_name(step)
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in (STATE_DIR, MODEL_DIR, OPTIMIZER_DIR):
            (tmp / sub).mkdir(parents=True)
    barrier()
    model_sd = model_sharded_state_dict(model, trainable_only=lora_base is not None)
    keep_writer_in_process()  # no writer helper process for a signal to kill (megarank/checkpoint/writer.py)
    dist_checkpointing.save(model_sd, str(tmp / MODEL_DIR))
    save_extra_state(model, tmp / EXTRA_DIR)
    if optimizer_state is not None:
        dist_checkpointing.save(optimizer_state.sharded_state_dict(is_loading=False), str(tmp / OPTIMIZER_DIR))
    torch.save(train_state, train_state_file(tmp, rank()))
    barrier()
    if is_rank0():
        save_config(cfg, tmp / CONFIG_FILE)
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
        if optimizer_state is None:
            (tmp / OPTIMIZER_DIR).rmdir()
        write_marker(tmp, kind="train", step=step, **current_layout(),
                     **({RECORD_KEY: lora_base} if lora_base is not None else {}))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        publish_latest(run_dir, step)
        remove_incomplete(run_dir)
    barrier()
    return final


def load_train_state(step_dir: Path) -> dict:
    saved_world = read_marker(step_dir).get("world_size")
    state_file = train_state_file(step_dir, rank())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not state_file.is_file() and saved_world is not None and saved_world != world:
        state_file = train_state_file(step_dir, 0)  # another world size: the global parts are the same on every rank
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {step_dir} is incomplete")
    try:
        return safe_pickle.torch_load(state_file)
    except safe_pickle.RefusedPickle:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable file is a damaged checkpoint, whatever torch raises
        raise CheckpointError(f"{state_file} is damaged and cannot be read ({type(e).__name__})") from None


def load_training_checkpoint(step_dir, model, optimizer_state: Optional[OptimizerState]) -> dict:
    """Collective. Check every file of ``step_dir`` against its manifest, restore weights, FP8 extra state
    (where both sides have it) and, if the folder has it and ``optimizer_state`` is given, the optimizer state;
    return this rank's train state.

    Works at another TP/PP/DP size: weights and optimizer state are global model-space tensors that every
    layout reads its part of. A checkpoint saved without optimizer state (``checkpoint.save_optimizer:
    false``) resumes with a fresh optimizer, and that is logged.
    """
    step_dir = Path(step_dir)
    verify_checkpoint_files(step_dir)
    load_model_weights(model, step_dir)
    if optimizer_state is not None and (step_dir / OPTIMIZER_DIR).is_dir():
        opt_dir = step_dir / OPTIMIZER_DIR
        saved_keys = set(safe_pickle.load_tensors_metadata(opt_dir))
        loaded = safe_pickle.load(optimizer_state.sharded_state_dict(is_loading=True, saved_keys=saved_keys), opt_dir)
        optimizer_state.restore(loaded)
    elif optimizer_state is not None:
        optimizer_state.reload_model_params()  # bf16/fp16: fp32 master weights from the loaded model, not the build-time ones
        log.warning("%s has no optimizer state (saved with checkpoint.save_optimizer=false): the optimizer starts fresh", step_dir)
    return load_train_state(step_dir)
