"""Write a megatron-core ``torch_dist`` checkpoint tensor by tensor, without building the model.

megatron's own ``dist_checkpointing.save`` needs every tensor in memory at once. Here the checkpoint is written
with PyTorch DCP directly, through a save planner whose ``resolve_data`` computes each chunk only when the writer
asks for it (items are written in plan order by one thread), so memory stays at about one chunk. The result is
what ``dist_checkpointing.save`` of a TP=1/PP=1 megarank model writes: the same keys, global shapes, chunk layout
(one chunk per layer of every stacked tensor; ``linear_fc1`` as separate gate and up chunks, as megatron's SwiGLU
sharded factory saves them), the same ``metadata.json`` and an empty ``common.pt``. ``model/`` therefore loads
with ``megarank.checkpoint.load_model_weights`` at any TP/PP.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)


@dataclass
class Chunk:
    """One stored piece of a global tensor and how to compute it."""

    key: str
    global_shape: tuple
    offset: tuple
    shape: tuple
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n

    def compute(self) -> torch.Tensor:
        """The chunk's data, checked against the plan."""
        tensor = self.produce()
        if tuple(tensor.shape) != tuple(self.shape) or tensor.dtype != self.dtype:
            raise AssertionError(f"{self.key} chunk at {self.offset}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {self.shape} {self.dtype}")
        return tensor

    def write_item(self) -> WriteItem:
        offsets = torch.Size(self.offset)
        return WriteItem(
            index=MetadataIndex(self.key, offsets),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(
                chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(self.shape)),
                properties=TensorProperties(dtype=self.dtype),
                size=torch.Size(self.global_shape),
            ),
        )


class _LazyPlanner(DefaultSavePlanner):
    """A planner whose plan is the given chunks and whose data is computed on request."""

    def __init__(self, chunks, on_written=None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, torch.Size(c.offset)): c for c in chunks}
        self._items = [c.write_item() for c in chunks]
        self._on_written = on_written

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        chunk = self._chunks[(write_item.index.fqn, write_item.index.offset)]
        tensor = chunk.compute()
        if self._on_written is not None:
            self._on_written(chunk)
        return tensor.contiguous()


def write_torch_dist(directory, chunks, on_written=None) -> None:
    """Write ``chunks`` (in this order) as a megatron ``torch_dist`` checkpoint into ``directory``."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
    with warnings.catch_warnings():  # one process on purpose: DCP's "assuming single process" notice is noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save({}, storage_writer=writer, planner=_LazyPlanner(chunks, on_written), no_dist=True)
    torch.save({}, directory / "common.pt")  # megatron's common (non-tensor) state: none for model weights
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(directory))


def stacked_chunks(key: str, global_shape: tuple, dtype, produce_layer, split_rows: int = 1):
    """Chunks of a ``[L, ...]`` stacked tensor: one per layer (or ``split_rows`` row blocks per layer, as megatron
    stores linear_fc1's gate and up halves). ``produce_layer(i, part)`` returns that block without the layer axis."""
    layers, rows, rest = global_shape[0], global_shape[1], tuple(global_shape[2:])
    block = rows // split_rows
    out = []
    for i in range(layers):
        for part in range(split_rows):
            out.append(
                Chunk(key, tuple(global_shape), (i, part * block) + (0,) * len(rest), (1, block) + rest, dtype,
                      (lambda i=i, part=part: produce_layer(i, part).unsqueeze(0)))
            )
    return out


def whole_chunk(key: str, shape: tuple, dtype, produce) -> Chunk:
    return Chunk(key, tuple(shape), (0,) * len(shape), tuple(shape), dtype, produce)


def materialize(chunks) -> dict:
    """The global tensors ``chunks`` describe, assembled in memory: {key: tensor of its global shape and dtype},
    what ``write_torch_dist(dir, chunks)`` stores (read back by ``dist_checkpointing.load_plain_tensors``)."""
    out = {}
    for c in chunks:
        if c.key not in out:
            out[c.key] = torch.empty(c.global_shape, dtype=c.dtype)
        out[c.key][tuple(slice(o, o + n) for o, n in zip(c.offset, c.shape))].copy_(c.compute())
    return out
