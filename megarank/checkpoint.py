"""Megatron distributed checkpoints: layout, atomic save, load at any TP/PP, resume bookkeeping.

A checkpoint folder (a converted model, or ``<checkpoint.dir>/step-N`` of a training run)::

    config.yaml              the resolved megarank Config (model section is the architecture)
    tokenizer/               tokenizer files (optional for synthetic models)
    model/                   torch_dist checkpoint of the weights: global (TP=1/PP=1-shaped) tensors,
                             layers stacked on dim 0 under ``decoder.layers.*``; loads at any TP/PP
    optimizer/               torch_dist checkpoint of the distributed optimizer ('fully_reshardable')
    train_state/rank-*.pt    per-rank step, scheduler, data position and RNG states
    megarank_checkpoint.json {"format_version", "kind": "converted" | "train", "step"}

``<checkpoint.dir>/latest`` holds the name of the newest *complete* step folder; it is replaced atomically
only after every rank finished writing, so a kill during a save leaves it pointing at the previous one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megarank.checkpoint_writer import keep_writer_in_process

FORMAT_VERSION = 1
MODEL_DIR, OPTIMIZER_DIR, STATE_DIR, MARKER = "model", "optimizer", "train_state", "megarank_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict without TE ``_extra_state`` objects (FP8 scaling metadata is not
    part of a megarank checkpoint, so a checkpoint loads into the local and the TE spec alike)."""
    return {k: v for k, v in model.sharded_state_dict().items() if not _is_extra_state(k)}


def save_model_weights(model, directory) -> None:
    """Collective: every rank writes its shards of the model into ``directory`` (a torch_dist checkpoint)."""
    from megatron.core import dist_checkpointing

    Path(directory).mkdir(parents=True, exist_ok=True)
    keep_writer_in_process()  # no writer helper process for a signal to kill (megarank/checkpoint_writer.py)
    dist_checkpointing.save(model_sharded_state_dict(model), str(directory))


def load_model_weights(model, checkpoint_dir, strict: bool = True) -> None:
    """Collective: load the weights of a megarank checkpoint folder (or its ``model/``) into ``model``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(checkpoint_dir)
    if (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    sharded = model_sharded_state_dict(model)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    loaded = dist_checkpointing.load(sharded, str(path), strict=handling)
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in model.state_dict() if k not in loaded and not _is_extra_state(k)]
    if strict and missing:
        raise CheckpointError(f"{checkpoint_dir}: checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")


def read_marker(path) -> dict:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MARKER})")
    return json.loads(marker.read_text())


def write_marker(path, kind: str, step: int = 0, **extra) -> None:
    data = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, **extra}
    (Path(path) / MARKER).write_text(json.dumps(data, indent=1))


def load_checkpoint_config(path):
    """The Config saved with a checkpoint folder."""
    from megarank.config import load_config

    cfg_path = Path(path) / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} has no config.yaml")
    return load_config(str(cfg_path))


ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "rope_theta", "rope_scaling", "norm_eps", "num_labels")


def _architecture(m) -> dict:
    from megarank.config import padded_vocab_size

    arch = {k: getattr(m, k) for k in ARCHITECTURE_KEYS}
    arch["kv_channels"] = m.kv_channels or m.hidden_size // m.num_attention_heads
    arch["padded_vocab_size"] = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    return arch


def check_architecture(model_cfg, checkpoint_dir) -> None:
    """The run's model section must describe the checkpoint's model; name the first key that differs."""
    saved = _architecture(load_checkpoint_config(checkpoint_dir).model)
    wanted = _architecture(model_cfg)
    for key, value in saved.items():
        if wanted[key] != value:
            raise CheckpointError(
                f"{checkpoint_dir}/config.yaml has model.{key} = {value} but this run's config has {wanted[key]}; "
                "use the model section of the checkpoint's config.yaml"
            )


# ----------------------------------------------------------------------------------------------- run folders


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The step folder named by ``<run_dir>/latest``, or None when there is none yet."""
    marker = Path(run_dir) / "latest"
    if not marker.is_file():
        return None
    step_dir = Path(run_dir) / marker.read_text().strip()
    if not (step_dir / MARKER).is_file():
        raise CheckpointError(f"{marker} points at {step_dir}, which is not a complete checkpoint")
    return step_dir


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder itself, or the step folder that a run directory's ``latest`` names."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a folder")
    if not (path / MODEL_DIR).is_dir() and (path / "latest").is_file():
        path = latest_checkpoint(path)
    if not (path / MODEL_DIR / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no config.yaml)")
    return path


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def publish_latest(run_dir, step: int) -> None:
    """Point ``latest`` at ``step-N`` atomically (write a temp file, fsync, rename)."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".latest.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(step_dir_name(step) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / "latest")


def prune_old(run_dir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete step folders (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    steps = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in run_dir.glob("step-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit()
    )
    for _, p in steps[:-keep_last]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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


# ----------------------------------------------------------------------------------------------- training state

OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}  # reshards over DP and TP (DESIGN §6)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_training_checkpoint(run_dir, step: int, model, optimizer, train_state: dict, cfg, tokenizer_dir=None) -> Path:
    """Collective. Write ``<run_dir>/step-N`` through a hidden temp folder, then publish ``latest``.

    ``model`` is the unwrapped LlamaReranker, ``optimizer`` megatron's (or None), ``train_state`` this rank's
    picklable-free dict of tensors/numbers (step, scheduler, sampler, RNG). A kill at any point leaves
    ``latest`` on the previous complete checkpoint.
    """
    from megatron.core import dist_checkpointing

    from megarank.config import save_config

    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / f".{step_dir_name(step)}.incomplete"
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in (STATE_DIR, MODEL_DIR, OPTIMIZER_DIR):
            (tmp / sub).mkdir(parents=True)
    barrier()
    model_sd = model_sharded_state_dict(model)
    keep_writer_in_process()  # no writer helper process for a signal to kill (megarank/checkpoint_writer.py)
    dist_checkpointing.save(model_sd, str(tmp / MODEL_DIR))
    if optimizer is not None:
        opt_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False, metadata=OPTIM_METADATA)
        dist_checkpointing.save(opt_sd, str(tmp / OPTIMIZER_DIR))
    torch.save(train_state, tmp / STATE_DIR / f"rank-{_rank()}.pt")
    barrier()
    if is_rank0():
        save_config(cfg, tmp / "config.yaml")
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if optimizer is None:
            (tmp / OPTIMIZER_DIR).rmdir()
        write_marker(tmp, kind="train", step=step, world_size=dist.get_world_size() if dist.is_initialized() else 1)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        publish_latest(run_dir, step)
    barrier()
    return final


def load_training_checkpoint(step_dir, model, optimizer) -> dict:
    """Collective. Restore weights and (if present and wanted) optimizer state; return this rank's train state.

    Works at another TP/DP size (weights and 'fully_reshardable' optimizer state reshard); at another PP
    size the optimizer state is skipped with a warning only if its layout cannot match.
    """
    from megatron.core import dist_checkpointing

    from megarank.training.optimizer import untie_step_counters

    step_dir = Path(step_dir)
    load_model_weights(model, step_dir)
    if optimizer is not None and (step_dir / OPTIMIZER_DIR).is_dir():
        _init_optimizer_state(optimizer)
        opt_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True, metadata=OPTIM_METADATA)
        loaded = dist_checkpointing.load(opt_sd, str(step_dir / OPTIMIZER_DIR))
        optimizer.load_state_dict(loaded)
        untie_step_counters(optimizer)
    state_file = step_dir / STATE_DIR / f"rank-{_rank()}.pt"
    if not state_file.is_file():  # resumed at another world size: the global parts are the same on every rank
        state_file = step_dir / STATE_DIR / "rank-0.pt"
    return torch.load(state_file, weights_only=True)


def _init_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state to load into; create it with one zero-gradient, lr-0 step
    (lr 0 so decoupled weight decay does not move the weights)."""
    from megarank.training.optimizer import inner_optimizers

    for opt in inner_optimizers(optimizer):
        groups = opt.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
        else:
            for g in groups:
                for p in g["params"]:
                    p.grad = torch.zeros_like(p)
            opt.optimizer.step()
            opt.optimizer.zero_grad()
        for g, lr in zip(groups, saved):
            g["lr"] = lr
