"""Read a megarank checkpoint folder one layer at a time, whatever TP/PP it was saved at.

A ``torch_dist`` checkpoint stores global tensors (layers stacked on dim 0), split into whatever chunks the saving
ranks held. Reading ``[i]`` of a stacked tensor through ``dist_checkpointing.load`` with a one-layer ShardedTensor
lets DCP gather exactly that slice from the overlapping chunks, so memory stays at about one layer. Only
``model/`` is read: a training checkpoint's ``optimizer/`` and ``train_state/`` are skipped. Its pickles are read
through the allow-lists of megarank/checkpoint/safe_pickle.py (a checkpoint never runs code it carries).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint_tools.errors import ConversionError
from checkpoint_tools.keymap import EMBEDDING, LAYER_MAPPINGS, megatron_keys, megatron_shapes
from megarank.checkpoint import safe_pickle
from megarank.checkpoint.layout import CONFIG_FILE, MODEL_DIR


def resolve_checkpoint(src) -> Path:
    """A megarank checkpoint folder: SRC itself, or the step folder a run directory's ``latest`` names."""
    from megarank.checkpoint import CheckpointError
    from megarank.checkpoint import resolve_checkpoint as resolve

    try:
        return resolve(src)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def ensure_process_group() -> None:
    """dist_checkpointing needs torch.distributed even for one process: a gloo group over an in-memory store."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class MegatronWeights:
    """Stored tensor metadata of ``<ckpt>/model`` and one-layer reads."""

    def __init__(self, ckpt: Path):
        self.dir = Path(ckpt) / MODEL_DIR
        try:
            meta = safe_pickle.load_tensors_metadata(self.dir)
        except safe_pickle.RefusedPickle as e:
            raise ConversionError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - unreadable metadata is a bad checkpoint
            raise ConversionError(f"{self.dir} could not be read as a torch_dist checkpoint ({e})") from None
        self.shapes = {k: tuple(v.global_shape) for k, v in meta.items()}
        self.dtypes = {k: v.dtype for k, v in meta.items()}

    def check_against(self, model_cfg) -> None:
        """Every expected tensor present with the shape the saved config implies; nothing unexpected."""
        stored_vocab = self.shapes.get(EMBEDDING.megatron, (model_cfg.vocab_size,))[0]
        expected = megatron_shapes(model_cfg, padded_vocab=max(stored_vocab, model_cfg.vocab_size))
        missing = [k for k in expected if k not in self.shapes]
        if missing:
            raise ConversionError(f"{self.dir}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = [k for k in self.shapes if k not in expected and not k.endswith("_extra_state")]
        if unexpected:
            raise ConversionError(f"{self.dir}: unexpected tensor {unexpected[0]} (shape {list(self.shapes[unexpected[0]])}); megarank's reranker has no such weight")
        for key, shape in expected.items():
            if self.shapes[key] != tuple(shape):
                raise ConversionError(
                    f"{self.dir}: tensor {key} has shape {list(self.shapes[key])} but {CONFIG_FILE}'s model section "
                    f"implies {list(shape)}; the checkpoint's saved config contradicts its weights"
                )

    def _load(self, sharded: dict) -> dict:
        from megarank.checkpoint import CheckpointError, check_finite

        ensure_process_group()
        with warnings.catch_warnings():  # megatron 0.16 calls DCP's deprecated load_state_dict: not ours to fix
            warnings.filterwarnings("ignore", message=".*load_state_dict.* is deprecated", category=FutureWarning)
            try:
                loaded = safe_pickle.load(sharded, self.dir, validate_access_integrity=False)
            except safe_pickle.RefusedPickle as e:
                raise ConversionError(str(e)) from None

        try:  # NaN/Inf weights (a damaged or diverged checkpoint) must not reach an export
            check_finite(loaded.items(), self.dir)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        return loaded

    def read_global(self, key: str) -> torch.Tensor:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        target = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        return self._load({key: ShardedTensor.from_rank_offsets(key, target, replica_id=0)})[key]

    def read_layer(self, i: int) -> dict:
        """megatron key -> tensor of layer ``i`` (without the layer axis) for every per-layer tensor."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sharded = {}
        for mp in LAYER_MAPPINGS:
            shape = self.shapes[mp.megatron]
            # a [1, ...] slice at offset i of the [L, ...] global tensor (no prepend axis: DCP then reads just
            # the overlapping stored chunks, whatever TP/PP split they were saved with)
            target = torch.empty((1,) + shape[1:], dtype=self.dtypes[mp.megatron])
            sharded[mp.megatron] = ShardedTensor.from_rank_offsets(mp.megatron, target, (0, i, shape[0]), replica_id=0)
        return {k: v[0] for k, v in self._load(sharded).items()}

    def num_bytes(self, keys=None) -> int:
        keys = keys or [k for k in megatron_keys() if k in self.shapes]
        total = 0
        for k in keys:
            n = torch.empty((), dtype=self.dtypes[k]).element_size()
            for s in self.shapes[k]:
                n *= s
            total += n
        return total
