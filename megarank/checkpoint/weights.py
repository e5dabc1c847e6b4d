"""Model weights in a checkpoint: save and load at any TP/PP (torch_dist global tensors), Transformer Engine's
FP8 ``_extra_state`` beside them, the shape and architecture checks, and the saved config.

FP8 ``_extra_state`` is saved beside the weights, not in ``model/``, so ``model/`` stays the same for the
local and the TE spec (and for converted checkpoints, which have none). It is loaded when the checkpoint and
the model both have it; otherwise the reason it is not is logged. Every load checks the manifest first and
names the damaged file; loaded weights must be finite. Every pickle in the folder is read through the
allow-lists of megarank/checkpoint/safe_pickle.py (a checkpoint never runs code it carries).
"""
from __future__ import annotations

import logging
from pathlib import Path

import megarank.checkpoint.safe_pickle as safe_pickle
from megarank.checkpoint.base_record import checked_base, lora_base_of
from megarank.checkpoint.collective import any_rank, first_error
from megarank.checkpoint.integrity import check_finite, verify_checkpoint_files
from megarank.checkpoint.layout import CONFIG_FILE, EXTRA_DIR, MODEL_DIR, MODEL_PARTS, CheckpointError
from megarank.checkpoint.run_folder import model_folder
from megarank.checkpoint.writer import keep_writer_in_process

log = logging.getLogger("megarank.checkpoint")


def _is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def model_sharded_state_dict(model, trainable_only: bool = False) -> dict:
    """The model's sharded state dict of weights only: TE ``_extra_state`` objects go to ``extra_state/``
    (see :func:`extra_state_sharded_state_dict`), so ``model/`` loads into the local and the TE spec alike.
    ``trainable_only``: only the parameters with ``requires_grad`` (what a LoRA checkpoint's ``model/`` holds:
    adapters and score head, model/adapters.py)."""
    sd = {k: v for k, v in model.sharded_state_dict().items() if not _is_extra_state(k)}
    if trainable_only:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        sd = {k: v for k, v in sd.items() if k in trainable}
    return sd


def extra_state_sharded_state_dict(model) -> dict:
    """The model's ``_extra_state`` entries (Transformer Engine's FP8 scaling state; none in the local spec)."""
    return {k: v for k, v in model.sharded_state_dict().items() if _is_extra_state(k)}


def _has_extra_state(extra: dict) -> bool:
    # megatron's local linear layers carry an ``_extra_state`` of None (tensor_parallel/layers.py:1075-1077,
    # 1318-1320, "compatibility with TE state dict"); only Transformer Engine's modules put state in it.
    return any(getattr(v, "data", None) is not None for v in extra.values())


def save_model_weights(model, directory) -> None:
    """Collective: every rank writes its shards of the model into ``directory`` (a torch_dist checkpoint)."""
    from megatron.core import dist_checkpointing

    Path(directory).mkdir(parents=True, exist_ok=True)
    keep_writer_in_process()  # no writer helper process for a signal to kill (megarank/checkpoint/writer.py)
    dist_checkpointing.save(model_sharded_state_dict(model), str(directory))


def save_extra_state(model, directory: Path) -> None:
    """Collective: write ``extra_state/`` when any rank's model has ``_extra_state`` (the TE spec)."""
    from megatron.core import dist_checkpointing

    extra = extra_state_sharded_state_dict(model)
    if any_rank(_has_extra_state(extra)):
        directory.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(extra, str(directory))


def raise_on_every_rank(check) -> None:
    """Run ``check()`` here; if it raised a CheckpointError on any rank, raise the first rank's on every rank, so
    all stop together (none waits in a later collective)."""
    try:
        check()
        error = None
    except CheckpointError as e:
        error = str(e)
    error = first_error(error)
    if error:
        raise CheckpointError(error)


def load_extra_state(model, folder: Path) -> None:
    """Collective: load ``extra_state/`` into a model that has ``_extra_state``; log why not otherwise."""
    extra = extra_state_sharded_state_dict(model)
    saved = (folder / EXTRA_DIR / "metadata.json").is_file()
    has = _has_extra_state(extra)
    if saved and any_rank(has):
        loaded = safe_pickle.load(extra, folder / EXTRA_DIR)

        def check_all():  # Transformer Engine unpickles each with plain pickle: only what the allow-list reads gets there
            for key, value in loaded.items():
                safe_pickle.check_extra_state(value, f"{folder / EXTRA_DIR} ({key})")

        raise_on_every_rank(check_all)  # whichever rank holds the refused object
        model.load_state_dict(loaded, strict=False)
        log.info("loaded FP8 scaling state (_extra_state) from %s", folder / EXTRA_DIR)
    elif saved:
        log.info("%s holds FP8 scaling state (_extra_state) that this model has no place for (local spec): not used",
                 folder / EXTRA_DIR)
    elif has:
        log.info("%s has no FP8 scaling state (_extra_state; saved by the local spec or converted): "
                 "Transformer Engine starts with fresh scales and amax history", folder)


def _plain_sharded_tensors(sharded: dict):
    """The plain ShardedTensors a model sharded state dict saves as (a factory, such as SwiGLU's fc1, expanded into
    its chunks: contiguous views of the parameter)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for sh in nested_values(sharded):
        for sub in (nested_values(sh.build()) if isinstance(sh, ShardedTensorFactory) else [sh]):
            if isinstance(sub, ShardedTensor):
                yield sub


def _expected_shapes(sharded: dict) -> dict:
    """{key: (global shape, allow_shape_mismatch)} of the plain ShardedTensors a model sharded state dict saves as.

    megatron marks the word embedding ``allow_shape_mismatch`` (vocab padding may differ with TP:
    megatron/core/tensor_parallel/layers.py:309-317, VocabParallelEmbedding.sharded_state_dict); its rows may differ, not its width."""
    return {sub.key: (tuple(sub.global_shape), bool(getattr(sub, "allow_shape_mismatch", False)))
            for sub in _plain_sharded_tensors(sharded)}


def _check_tensor_shapes(sharded: dict, model_dir: Path, folder: Path) -> None:
    """Every tensor the model needs is in ``model/`` with the global shape the config implies."""
    stored = {k: tuple(v.global_shape) for k, v in safe_pickle.load_tensors_metadata(model_dir).items()}
    for key, (shape, rows_may_differ) in _expected_shapes(sharded).items():
        if key not in stored:
            raise CheckpointError(f"{model_dir} has no tensor {key}, which this model needs; "
                                  f"{folder / 'config.yaml'} does not describe these weights")
        if stored[key] != shape and not (rows_may_differ and stored[key][1:] == shape[1:]):
            raise CheckpointError(f"{model_dir}: tensor {key} has shape {list(stored[key])} but the model section of "
                                  f"{folder / 'config.yaml'} implies {list(shape)}; the config does not match its tensors")


def load_model_weights(model, checkpoint_dir, strict: bool = True, new_adapters: bool = False, base=None) -> None:
    """Collective: load the weights of a megarank checkpoint folder (or its ``model/``, or a run directory's
    ``latest`` step) into ``model``, after checking the folder's checksums; the loaded weights must be finite.
    FP8 ``_extra_state`` is loaded too where both sides have it.

    A LoRA checkpoint (its marker records a base, megarank/checkpoint/base_record.py) is loaded as its base (checked
    against the record, and against ``base``, a run's ``checkpoint.load``, when given) and then its trained tensors.
    ``new_adapters``: ``checkpoint.load`` of a LoRA run: the base has no adapters, which keep their fresh values."""
    folder = model_folder(checkpoint_dir)
    if lora_base_of(folder) is not None:
        if all(p.requires_grad for p in model.parameters()):  # nothing frozen: a model without adapters
            raise CheckpointError(f"{folder} holds LoRA adapters only, for a model with model.lora_rank > 0 (its "
                                  "config.yaml); to start other training from it, export it merged first "
                                  "(megarank-convert megatron-to-hf, then hf-to-megatron)")
        _load_folder(model, checked_base(folder, base), strict, part="base")
        _load_folder(model, folder, strict, part="trainable")
    else:
        _load_folder(model, folder, strict, part="base" if new_adapters else "all")


def _load_folder(model, folder: Path, strict: bool, part: str) -> None:
    """part: "all" tensors of the model; "trainable" ones only (a LoRA step's ``model/``); "base": every tensor
    but the adapters, which the folder does not have."""
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model_dir = folder / MODEL_DIR
    if not (model_dir / "metadata.json").is_file():
        raise CheckpointError(f"{folder} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    verify_checkpoint_files(folder, parts=MODEL_PARTS)
    sharded = model_sharded_state_dict(model, trainable_only=part == "trainable")
    if part == "base":
        stored = set(safe_pickle.load_tensors_metadata(model_dir))
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        sharded = {k: v for k, v in sharded.items() if k not in trainable or v.key in stored}
    wanted = set(sharded)
    if strict:
        _check_tensor_shapes(sharded, model_dir, folder)
    handling = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL
    loaded = safe_pickle.load(sharded, model_dir, strict=handling)
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in model.state_dict() if k not in loaded and not _is_extra_state(k)
               and (part == "all" or k in wanted)]
    if strict and missing:
        raise CheckpointError(f"{folder}: checkpoint has no tensor for {missing[0]} (and {len(missing) - 1} more)")
    raise_on_every_rank(lambda: check_finite(  # whichever rank holds the bad shard
        ((k, v) for k, v in model.state_dict().items() if not _is_extra_state(k)), model_dir))
    load_extra_state(model, folder)


def load_checkpoint_config(path):
    """The Config saved with a checkpoint folder."""
    from megarank.config import ConfigError, load_config

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is not a megarank checkpoint: it does not exist")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no config.yaml)")
    try:
        return load_config(str(cfg_path))
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


ARCHITECTURE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "rope_theta", "rope_scaling", "norm_eps", "num_labels")


def _architecture(m) -> dict:
    arch = {k: getattr(m, k) for k in ARCHITECTURE_KEYS}
    arch["kv_channels"] = m.head_dim
    arch["padded_vocab_size"] = m.padded_vocab(1)
    return arch


def check_architecture(model_cfg, checkpoint_dir) -> None:
    """The run's model section must describe the checkpoint's model; name the first key that differs."""
    folder = model_folder(checkpoint_dir)
    saved = _architecture(load_checkpoint_config(folder).model)
    wanted = _architecture(model_cfg)
    for key, value in saved.items():
        if wanted[key] != value:
            raise CheckpointError(
                f"{folder}/config.yaml has model.{key} = {value} but this run's config has {wanted[key]}; "
                "use the model section of the checkpoint's config.yaml"
            )


def load_global_tensors(model, tensors, where: str) -> None:
    """Collective: copy global (TP=1/PP=1-shaped) tensors into ``model``, built at any TP/PP: what
    ``load_model_weights`` does from a folder, from a mapping in memory (an HF model converted without writing,
    ``checkpoint_tools.import_hf.hf_to_megatron_in_memory``).

    ``tensors`` maps the keys a ``model/`` folder stores (``model_sharded_state_dict``: stacked layers under
    ``decoder.layers.*``, layer index first) to global tensors. Each of this rank's shards (a factory such as
    SwiGLU's fc1 expanded into its contiguous chunks) gets ``global[offset : offset + local_shape]``, cast to the
    model's dtype. The word embedding's rows may differ (``allow_shape_mismatch``: vocabulary padding): the rows
    that exist are copied and the rest zeroed, as megatron's loader does. Every tensor of the model must be in
    ``tensors`` with the global shape the config implies, and the result must be finite; otherwise a
    CheckpointError naming ``where`` and the key (the same on every rank). FP8 ``_extra_state`` is not loaded."""
    import torch

    def fill(sub) -> None:
        if sub.key not in tensors:
            raise CheckpointError(f"{where} has no tensor {sub.key}, which this model needs")
        full = tensors[sub.key]
        shape, stored = tuple(sub.global_shape), tuple(full.shape)
        if stored != shape and not (sub.allow_shape_mismatch and stored[1:] == shape[1:]):
            raise CheckpointError(f"{where}: tensor {sub.key} has shape {list(stored)} but the model needs "
                                  f"{list(shape)}; the config does not match its tensors")
        p = sub.prepend_axis_num
        local = sub.data.view((1,) * p + tuple(sub.data.shape))
        box = [slice(o, o + 1) for o in sub.global_offset[:p]]
        box += [slice(o, o + n) for o, n in zip(sub.global_offset[p:], sub.data.shape)]
        part = full[tuple(box)]  # may be cut short along dim 0 (an embedding with fewer stored rows)
        if part.shape != local.shape:
            local.zero_()
        local[tuple(slice(0, n) for n in part.shape)].copy_(part)

    error = None
    try:
        sharded = model_sharded_state_dict(model)
        unsharded = [k for k in model.state_dict() if k not in sharded and not _is_extra_state(k)]
        if unsharded:
            raise CheckpointError(f"{where}: the model's tensor {unsharded[0]} has no checkpoint key")
        with torch.no_grad():
            for sub in _plain_sharded_tensors(sharded):
                fill(sub)
        check_finite(((k, v) for k, v in model.state_dict().items() if not _is_extra_state(k)), where)
    except CheckpointError as e:
        error = str(e)
    error = first_error(error)  # every rank stops, whichever rank found the problem
    if error:
        raise CheckpointError(error)
