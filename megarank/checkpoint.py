"""Megatron distributed checkpoints: layout, atomic save, checksums, load at any TP/PP/DP, resume bookkeeping.

A checkpoint folder (a converted model, or ``<checkpoint.dir>/step-N`` of a training run)::

    config.yaml              the resolved megarank Config (model section is the architecture)
    tokenizer/               tokenizer files (optional for synthetic models)
    model/                   torch_dist checkpoint of the weights: global (TP=1/PP=1-shaped) tensors,
                             layers stacked on dim 0 under ``decoder.layers.*``; loads at any TP/PP
    extra_state/             torch_dist checkpoint of Transformer Engine's ``_extra_state`` (FP8 scales and
                             amax history); only written by models that have it (the TE spec)
    optimizer/               torch_dist checkpoint of the optimizer state in model space (see below)
    train_state/rank-*.pt    per-rank step, scheduler, data position and RNG states
    megarank_checkpoint.json {"format_version", "kind": "converted" | "train", "step", "world_size", "tp", "pp", "dp"}
    megarank_manifest.json   size and CRC-32 of every other file (megarank/checkpoint_integrity.py)

``<checkpoint.dir>/latest`` holds the name of the newest *complete* step folder; it is replaced atomically
only after every rank finished writing and the manifest is written, so a kill during a save leaves it
pointing at the previous one. The next successful save removes any ``.step-N.incomplete`` folders left behind.

Every load checks the manifest first and names the damaged file; loaded weights must be finite. A run
directory whose ``latest`` step is damaged resolves to the newest intact step, with a warning.

Optimizer state: saved by every data-parallel rank for the shard it owns, with no gather, in the same
model-space keys megatron's 'fully_reshardable' format uses (``optimizer.state.exp_avg.<param key>`` ...), so
it reshards over TP, PP and DP (megarank/training/optimizer.py explains why megatron's own formats do not
do that without a gather in megatron-core 0.16.1). Saves are synchronous:
megatron-core 0.16.1's asynchronous path needs CUDA (dist_checkpointing/strategies/async_utils.py:165, 212,
604 call ``torch.cuda``) and writes from helper processes, which a SIGTERM to the worker's process group
kills (megarank/checkpoint_writer.py keeps the synchronous writer inside the trainer for that reason).

FP8 ``_extra_state`` is saved beside the weights, not in ``model/``, so ``model/`` stays the same for the
local and the TE spec (and for converted checkpoints, which have none). It is loaded when the checkpoint and
the model both have it; otherwise the reason it is not is logged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megarank.checkpoint_integrity import CheckpointError, check_finite, verify_checkpoint_files, write_manifest
from megarank.checkpoint_writer import keep_writer_in_process

__all__ = ["CheckpointError", "check_finite", "verify_checkpoint_files", "write_manifest"]

FORMAT_VERSION = 1
MODEL_DIR, OPTIMIZER_DIR, STATE_DIR, MARKER = "model", "optimizer", "train_state", "megarank_checkpoint.json"
EXTRA_DIR = "extra_state"
# What loading weights reads (evaluate, rerank, converters): the optimizer and train state are not checked there.
MODEL_PARTS = ("config.yaml", MARKER, MODEL_DIR, EXTRA_DIR, "tokenizer")
STEP_NAME = re.compile(r"step-(\d+)")

log = logging.getLogger("megarank.checkpoint")


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict of weights only: TE ``_extra_state`` objects go to ``extra_state/``
    (see :func:`extra_state_sharded_state_dict`), so ``model/`` loads into the local and the TE spec alike."""
    return {k: v for k, v in model.sharded_state_dict().items() if not _is_extra_state(k)}


def extra_state_sharded_state_dict(model) -> dict:
    """The model's ``_extra_state`` entries (Transformer Engine's FP8 scaling state; none in the local spec)."""
    return {k: v for k, v in model.sharded_state_dict().items() if _is_extra_state(k)}


def _has_extra_state(extra: dict) -> bool:
    # megatron's local linear layers carry an ``_extra_state`` of None (tensor_parallel/layers.py:1075-1077,
    # 1318-1320, "compatibility with TE state dict"); only Transformer Engine's modules put state in it.
    return any(getattr(v, "data", None) is not None for v in extra.values())


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    from megarank.parallel.init import any_rank

    return any_rank(flag)


def _first_error(message: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error message (or None), the same on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)


def save_model_weights(model, directory) -> None:
    """Collective: every rank writes its shards of the model into ``directory`` (a torch_dist checkpoint)."""
    from megatron.core import dist_checkpointing

    Path(directory).mkdir(parents=True, exist_ok=True)
    keep_writer_in_process()  # no writer helper process for a signal to kill (megarank/checkpoint_writer.py)
    dist_checkpointing.save(model_sharded_state_dict(model), str(directory))


def _save_extra_state(model, directory: Path) -> None:
    """Collective: write ``extra_state/`` when any rank's model has ``_extra_state`` (the TE spec)."""
    from megatron.core import dist_checkpointing

    extra = extra_state_sharded_state_dict(model)
    if _any_rank(_has_extra_state(extra)):
        directory.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(extra, str(directory))


def _load_extra_state(model, folder: Path) -> None:
    """Collective: load ``extra_state/`` into a model that has ``_extra_state``; log why not otherwise."""
    from megatron.core import dist_checkpointing

    extra = extra_state_sharded_state_dict(model)
    saved = (folder / EXTRA_DIR / "metadata.json").is_file()
    has = _has_extra_state(extra)
    if saved and _any_rank(has):
        loaded = dist_checkpointing.load(extra, str(folder / EXTRA_DIR))
        model.load_state_dict(loaded, strict=False)
        log.info("loaded FP8 scaling state (_extra_state) from %s", folder / EXTRA_DIR)
    elif saved:
        log.info("%s holds FP8 scaling state (_extra_state) that this model has no place for (local spec): not used",
                 folder / EXTRA_DIR)
    elif has:
        log.info("%s has no FP8 scaling state (_extra_state; saved by the local spec or converted): "
                 "Transformer Engine starts with fresh scales and amax history", folder)


def _model_folder(checkpoint_dir) -> Path:
    """A checkpoint folder from itself, its ``model/`` or a run directory (via ``latest``)."""
    path = Path(checkpoint_dir)
    if path.name == MODEL_DIR and (path / "metadata.json").is_file() and not (path / MODEL_DIR).is_dir():
        return path.parent
    if not path.exists():
        raise CheckpointError(f"{path} is not a megarank checkpoint: it does not exist")
    if not (path / MODEL_DIR).is_dir() and (path / "latest").is_file():
        return latest_checkpoint(path, parts=MODEL_PARTS)
    return path


def _expected_shapes(sharded: dict) -> dict:
    """{key: (global shape, allow_shape_mismatch)} of the plain ShardedTensors a model sharded state dict saves as.

    megatron marks the word embedding ``allow_shape_mismatch`` (vocab padding may differ with TP:
    megatron/core/tensor_parallel/layers.py:309-317, VocabParallelEmbedding.sharded_state_dict); its rows may differ, not its width."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes = {}
    for sh in nested_values(sharded):
        subs = nested_values(sh.build()) if isinstance(sh, ShardedTensorFactory) else [sh]
        for sub in subs:
            if isinstance(sub, ShardedTensor):
                shapes[sub.key] = (tuple(sub.global_shape), bool(getattr(sub, "allow_shape_mismatch", False)))
    return shapes


def _check_tensor_shapes(sharded: dict, model_dir: Path, folder: Path) -> None:
    """Every tensor the model needs is in ``model/`` with the global shape the config implies."""
    from megatron.core import dist_checkpointing

    stored = {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(str(model_dir)).items()}
    for key, (shape, rows_may_differ) in _expected_shapes(sharded).items():
        if key not in stored:
            raise CheckpointError(f"{model_dir} has no tensor {key}, which this model needs; "
                                  f"{folder / 'config.yaml'} does not describe these weights")
        if stored[key] != shape and not (rows_may_differ and stored[key][1:] == shape[1:]):
            raise CheckpointError(f"{model_dir}: tensor {key} has shape {list(stored[key])} but the model section of "
                                  f"{folder / 'config.yaml'} implies {list(shape)}; the config does not match its tensors")


def load_model_weights(model, checkpoint_dir, strict: bool = True) -> None:
    """Collective: load the weights of a megarank checkpoint folder (or its ``model/``, or a run directory's
    ``latest`` step) into ``model``, after checking the folder's checksums; the loaded weights must be finite.
    FP8 ``_extra_state`` is loaded too where both sides have it."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    folder = _model_folder(checkpoint_dir)
    model_dir = folder / MODEL_DIR
    if not (model_dir / "metadata.json").is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    verify_checkpoint_files(folder, parts=MODEL_PARTS)
    sharded = model_sharded_state_dict(model)
    if strict:
        _check_tensor_shapes(sharded, model_dir, folder)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    loaded = dist_checkpointing.load(sharded, str(model_dir), strict=handling)
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in model.state_dict() if k not in loaded and not _is_extra_state(k)]
    if strict and missing:
        raise CheckpointError(f"{checkpoint_dir}: checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")
    try:
        check_finite(((k, v) for k, v in model.state_dict().items() if not _is_extra_state(k)), model_dir)
        error = None
    except CheckpointError as e:
        error = str(e)
    error = _first_error(error)  # every rank stops, whichever rank holds the bad shard
    if error:
        raise CheckpointError(error)
    _load_extra_state(model, folder)


def read_marker(path) -> dict:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MARKER})")
    try:
        return json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{marker} is damaged (not JSON)") from None


def write_marker(path, kind: str, step: int = 0, **extra) -> None:
    data = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, **extra}
    (Path(path) / MARKER).write_text(json.dumps(data, indent=1))


def load_checkpoint_config(path):
    """The Config saved with a checkpoint folder."""
    from megarank.config import ConfigError, load_config

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is not a megarank checkpoint: it does not exist")
    cfg_path = path / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no config.yaml)")
    try:
        return load_config(str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


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
    folder = _model_folder(checkpoint_dir)
    saved = _architecture(load_checkpoint_config(folder).model)
    wanted = _architecture(model_cfg)
    for key, value in saved.items():
        if wanted[key] != value:
            raise CheckpointError(
                f"{folder}/config.yaml has model.{key} = {value} but this run's config has {wanted[key]}; "
                "use the model section of the checkpoint's config.yaml"
            )


# ----------------------------------------------------------------------------------------------- run folders


def _step_folders(run_dir: Path) -> list:
    """[(step, folder)] of the ``step-N`` folders in ``run_dir``, newest first."""
    found = []
    for p in run_dir.glob("step-*"):
        m = STEP_NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _damage(step_dir: Path, parts) -> Optional[str]:
    """Why ``step_dir`` cannot be used (None when it is complete and intact)."""
    if not (step_dir / MARKER).is_file():
        return f"{step_dir} is not a complete checkpoint"
    try:
        verify_checkpoint_files(step_dir, parts=parts)
    except CheckpointError as e:
        return str(e)
    return None


def _newest_intact(run_dir: Path, parts, skip: Optional[Path] = None) -> Optional[Path]:
    for _, p in _step_folders(run_dir):
        if (skip is None or p.resolve() != skip.resolve()) and _damage(p, parts) is None:
            return p
    return None


_WARNED: set = set()


def latest_checkpoint(run_dir, parts=None) -> Optional[Path]:
    """The step folder named by ``<run_dir>/latest``, checked against its manifest (``parts``: only those
    top-level entries, None = all), or None when there is none yet. A damaged or incomplete step falls back
    to the newest intact ``step-N`` with a warning; without one, the error names what is damaged."""
    run_dir = Path(run_dir)
    marker = run_dir / "latest"
    if not marker.is_file():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = None
    if name is None or not STEP_NAME.fullmatch(name):
        intact = _newest_intact(run_dir, parts)
        hint = (f"; the newest intact checkpoint there is {intact.name} (write '{intact.name}' into it to resume "
                "from there)" if intact else "; the folder holds no intact step-N checkpoint")
        shown = "unreadable bytes" if name is None else repr(name[:40])
        raise CheckpointError(f"{marker} holds {shown}, not the name of a step folder such as step-N{hint}")
    step_dir = run_dir / name
    damage = _damage(step_dir, parts)
    if damage is None:
        return step_dir
    if not step_dir.exists():
        damage = f"{step_dir} does not exist"
    intact = _newest_intact(run_dir, parts, skip=step_dir)
    if intact is None:
        raise CheckpointError(f"{marker} points at {step_dir}, which is not a complete checkpoint ({damage}), "
                              f"and {run_dir} holds no other intact step")
    warning = f"{marker} points at {step_dir}, which cannot be used ({damage}); using {intact}, the newest intact step"
    if warning not in _WARNED:
        _WARNED.add(warning)
        log.warning(warning)
    return intact


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder itself, or the step folder that a run directory's ``latest`` names; its weights'
    files are checked against the manifest (a damaged ``latest`` step falls back, see latest_checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a folder")
    if not (path / MODEL_DIR).is_dir() and (path / "latest").is_file():
        path = latest_checkpoint(path, parts=MODEL_PARTS)
    if not (path / MODEL_DIR / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no config.yaml)")
    verify_checkpoint_files(path, parts=MODEL_PARTS)
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


def _latest_name(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def prune_old(run_dir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    run_dir = Path(run_dir)
    latest = _latest_name(run_dir)
    for _, p in _step_folders(run_dir)[keep_last:]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(run_dir, keep: Optional[Path] = None) -> None:
    """Remove the ``.step-N.incomplete`` folders that killed saves left behind (all but ``keep``)."""
    for p in Path(run_dir).glob(".step-*.incomplete"):
        if p.is_dir() and (keep is None or p.resolve() != Path(keep).resolve()):
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


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def current_layout() -> dict:
    """{"world_size", "tp", "pp", "dp"} of this process group (megatron's parallel state)."""
    from megatron.core import parallel_state

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not parallel_state.model_parallel_is_initialized():
        return {"world_size": world, "tp": 1, "pp": 1, "dp": world}
    return {"world_size": world, "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def layout_change(step_dir) -> str:
    """'' when this run has the layout ``step_dir`` was saved at, else e.g.
    ' (saved at TP=2 PP=1 DP=1, now TP=1 PP=1 DP=2: weights and optimizer state resharded)'."""
    saved = read_marker(step_dir)
    now = current_layout()
    if not all(k in saved for k in ("tp", "pp", "dp")):
        return f" (saved by {saved.get('world_size', '?')} ranks at an unrecorded TP/PP/DP; now TP={now['tp']} PP={now['pp']} DP={now['dp']})"
    if all(saved[k] == now[k] for k in ("tp", "pp", "dp")):
        return ""
    fmt = lambda d: f"TP={d['tp']} PP={d['pp']} DP={d['dp']}"  # noqa: E731
    return f" (saved at {fmt(saved)}, now {fmt(now)}: weights and optimizer state resharded)"


def save_training_checkpoint(run_dir, step: int, model, optimizer, train_state: dict, cfg, tokenizer_dir=None) -> Path:
    """Collective. Write ``<run_dir>/step-N`` through a hidden temp folder, then publish ``latest``.

    ``model`` is the unwrapped LlamaReranker, ``optimizer`` megatron's (or None), ``train_state`` this rank's
    picklable-free dict of tensors/numbers (step, scheduler, sampler, RNG). A kill at any point leaves
    ``latest`` on the previous complete checkpoint. Rank 0 writes the manifest after every rank's files are
    written, then renames the folder into place, publishes ``latest`` and removes older incomplete folders.
    """
    from megatron.core import dist_checkpointing

    from megarank.config import save_config
    from megarank.training.optimizer import optimizer_sharded_state_dict

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
    _save_extra_state(model, tmp / EXTRA_DIR)
    if optimizer is not None:
        dist_checkpointing.save(optimizer_sharded_state_dict(optimizer, model, is_loading=False), str(tmp / OPTIMIZER_DIR))
    torch.save(train_state, tmp / STATE_DIR / f"rank-{_rank()}.pt")
    barrier()
    if is_rank0():
        save_config(cfg, tmp / "config.yaml")
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        if optimizer is None:
            (tmp / OPTIMIZER_DIR).rmdir()
        write_marker(tmp, kind="train", step=step, **current_layout())
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        publish_latest(run_dir, step)
        remove_incomplete(run_dir)
    barrier()
    return final


def _load_train_state(step_dir: Path) -> dict:
    saved_world = read_marker(step_dir).get("world_size")
    state_file = step_dir / STATE_DIR / f"rank-{_rank()}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not state_file.is_file() and saved_world is not None and saved_world != world:
        state_file = step_dir / STATE_DIR / "rank-0.pt"  # another world size: the global parts are the same on every rank
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {step_dir} is incomplete")
    try:
        return torch.load(state_file, weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is a damaged checkpoint, whatever torch raises
        raise CheckpointError(f"{state_file} is damaged and cannot be read ({type(e).__name__})") from None


def load_training_checkpoint(step_dir, model, optimizer) -> dict:
    """Collective. Check every file of ``step_dir`` against its manifest, restore weights, FP8 extra state
    (where both sides have it) and, if the folder has it and ``optimizer`` is given, the optimizer state;
    return this rank's train state.

    Works at another TP/PP/DP size: weights and optimizer state are global model-space tensors that every
    layout reads its part of. A checkpoint saved without optimizer state (``checkpoint.save_optimizer:
    false``) resumes with a fresh optimizer, and that is logged.
    """
    from megatron.core import dist_checkpointing

    from megarank.training.optimizer import optimizer_sharded_state_dict, restore_optimizer_state

    step_dir = Path(step_dir)
    verify_checkpoint_files(step_dir)
    load_model_weights(model, step_dir)
    if optimizer is not None and (step_dir / OPTIMIZER_DIR).is_dir():
        opt_dir = str(step_dir / OPTIMIZER_DIR)
        saved_keys = set(dist_checkpointing.load_tensors_metadata(opt_dir))
        loaded = dist_checkpointing.load(optimizer_sharded_state_dict(optimizer, model, is_loading=True, saved_keys=saved_keys), opt_dir)
        restore_optimizer_state(optimizer, loaded)
    elif optimizer is not None:
        optimizer.reload_model_params()  # bf16/fp16: fp32 master weights from the loaded model, not the build-time ones
        log.warning("%s has no optimizer state (saved with checkpoint.save_optimizer=false): the optimizer starts fresh", step_dir)
    return _load_train_state(step_dir)
