"""A LoRA checkpoint read as the merged model: its recorded base (megarank/checkpoint/base_record.py, checked) with
each adapted weight replaced by ``W + (alpha / r) * B @ A`` one layer at a time, and the trained head (and final
norm) from the step. Same reader interface as ``MegatronWeights``, so ``megatron-to-hf`` writes the merged model
through the one tensor map (keymap.py) and memory stays at about one layer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_tools.errors import ConversionError
from checkpoint_tools.megatron_reader import MegatronWeights


def is_lora_checkpoint(ckpt: Path) -> bool:
    from megarank.checkpoint.base_record import lora_base_of

    return lora_base_of(ckpt) is not None


class MergedLoRAWeights:
    """``shapes``, ``dtypes``, ``check_against``, ``read_global``, ``read_layer``, ``num_bytes`` of the merged model."""

    def __init__(self, ckpt: Path, model_cfg):
        from megarank.checkpoint import CheckpointError
        from megarank.checkpoint.base_record import checked_base
        from megarank.model.adapters import ADAPTER_SUFFIX

        try:
            base = checked_base(ckpt)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        self.base_dir = base
        self.base, self.trained = MegatronWeights(base), MegatronWeights(ckpt)
        self.adapter_keys = [k for k in self.trained.shapes if ADAPTER_SUFFIX + "." in k]
        self.rank, self.alpha = model_cfg.lora_rank, model_cfg.lora_alpha
        self.shapes, self.dtypes = dict(self.base.shapes), dict(self.base.dtypes)

    def check_against(self, model_cfg) -> None:
        self.base.check_against(model_cfg)

    def read_global(self, key: str) -> torch.Tensor:
        """The step's tensor where it trained one (the score head, the final norm), else the base's."""
        source = self.trained if key in self.trained.shapes else self.base
        return source.read_global(key).to(self.dtypes[key])

    def _adapter_slice(self, key: str, i: int) -> torch.Tensor:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        shape = self.trained.shapes[key]
        target = torch.empty((1,) + shape[1:], dtype=self.trained.dtypes[key])
        sharded = ShardedTensor.from_rank_offsets(key, target, (0, i, shape[0]), replica_id=0)
        return self.trained._load({key: sharded})[key][0]

    def read_adapters(self, i: int) -> dict:
        """Layer ``i``'s adapter tensors as trained (``...<target>_adapter.lora_a [r, in]`` / ``lora_b [out, r]``)."""
        return {k: self._adapter_slice(k, i) for k in self.adapter_keys}

    def read_layer(self, i: int) -> dict:
        from megarank.model.adapters import merge_lora

        layer = self.base.read_layer(i)
        layer.update(self.read_adapters(i))
        return merge_lora(layer, self.rank, self.alpha)

    def num_bytes(self, keys=None) -> int:
        return self.base.num_bytes(keys)


def open_weights(ckpt: Path, model_cfg):
    """The reader of a checkpoint's weights: merged for a LoRA checkpoint, as stored otherwise."""
    return MergedLoRAWeights(ckpt, model_cfg) if is_lora_checkpoint(ckpt) else MegatronWeights(ckpt)
