"""Packed batches: whole (query, passage) sequences laid end to end in one [1, T] token stream.

A packed batch carries no padding inside a sequence. Its boundaries travel as a ``PackedLayout`` (segment lengths,
``cu_seqlens``) under the batch key ``"packed_seq_params"``; at the model's door ``megarank.model.inputs.model_inputs``
turns it into megatron-core's ``PackedSeqParams`` (``qkv_format="thd"``), so this package never imports
megatron-core. RoPE restarts in every sequence and attention stays inside each (megarank/model/inputs.py).

The stream is padded at its end to a multiple of ``multiple`` (sequence parallelism splits it over TP ranks;
FP8 GEMMs on Hopper need the tokens on a rank divisible by 16: config.validate requires ``data.pad_to_multiple_of``
to be a multiple of 16 x TP under SP with FP8, and ``packing_multiple`` is a multiple of it, tests/test_packing.py).
The padding is one extra *segment* of pad tokens: every token of the stream then belongs to a segment, attention
stays inside each, and pooling reads only the first ``num_sequences`` segments, so the dummy's outputs are never
used and its gradient is exactly 0.

Which rows go into a batch, and whether it is packed, is ``megarank.data.batcher.Batcher``'s business.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class PackedLayout:
    """Where the sequences of a packed stream begin and end (host ints, and ``cu_seqlens`` as an int32 tensor)."""

    seqlens: tuple  # every segment's length, the end padding included
    num_sequences: int  # real sequences: the first num_sequences segments
    cu_seqlens: torch.Tensor = field(repr=False)  # int32 [len(seqlens) + 1]: 0 and the segments' running ends

    @classmethod
    def of(cls, segments, num_sequences: int) -> "PackedLayout":
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
        return cls(tuple(segments), num_sequences, cu)

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)


def packing_multiple(pad_to_multiple_of: int, tensor_parallel_size: int) -> int:
    """The stream length's multiple: the data's pad multiple and the TP size (sequence parallelism)."""
    return math.lcm(pad_to_multiple_of or 1, tensor_parallel_size or 1)


def pack_rows(rows, pad_id: int, multiple: int = 1) -> dict:
    """Id lists (one per sequence) -> a packed batch.

    Returns {"input_ids": LongTensor[1, T], "attention_mask": BoolTensor[1, T] (True = a real token, for token
    counts), "packed_seq_params": PackedLayout}.
    """
    lengths = [len(r) for r in rows]
    if not rows or min(lengths) == 0:
        raise ValueError("cannot pack an empty batch or an empty sequence")
    real = sum(lengths)
    total = -(-real // multiple) * multiple
    segments = lengths + ([total - real] if total > real else [])
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    ids[0, :real] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    mask = torch.zeros((1, total), dtype=torch.bool)
    mask[0, :real] = True
    return {"input_ids": ids, "attention_mask": mask, "packed_seq_params": PackedLayout.of(segments, len(rows))}


def pack_padded(batch: dict, pad_id: int, multiple: int = 1) -> dict:
    """A right-padded batch ({"input_ids", "attention_mask"} [b, s], plus any other keys) -> the same batch packed.

    For tests and benchmarks that run the same rows both ways; megarank itself packs straight from token ids
    (``Batcher``). Other keys (``group_size``, ``labels``) are kept; sequence i of the packed batch is row i.
    """
    ids, valid = batch["input_ids"], batch["attention_mask"]
    lengths = valid.sum(1).tolist()
    rows = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    packed = pack_rows(rows, pad_id, multiple)
    return {**{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}, **packed}
