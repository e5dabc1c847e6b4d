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

Context parallelism (``seq_multiple`` > 1, i.e. 2 x CP): every sequence is padded inside its own segment to a
multiple of ``seq_multiple`` so that it splits into 2 x CP equal chunks (Transformer Engine's DualChunkSwap,
megarank/parallel/context.py). The layout then carries each segment's real length too (``lengths``): attention
masks the padded keys, pooling reads only the real tokens, and Transformer Engine gets both ``cu_seqlens`` (real)
and ``cu_seqlens_padded`` (the segments), megarank/model/inputs.py.

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
    # Real tokens of every segment, when a sequence is padded inside its segment (context parallelism); () = seqlens.
    lengths: tuple = ()

    @classmethod
    def of(cls, segments, num_sequences: int, lengths=()) -> "PackedLayout":
        cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
        lengths = tuple(lengths)
        return cls(tuple(segments), num_sequences, cu, lengths if lengths != tuple(segments) else ())

    @property
    def real_lengths(self) -> tuple:
        """The real tokens of every segment (the segment lengths unless sequences are padded inside them)."""
        return self.lengths or self.seqlens

    @property
    def max_seqlen(self) -> int:
        return max(self.seqlens)


def packing_multiple(pad_to_multiple_of: int, tensor_parallel_size: int, context_parallel_size: int = 1) -> int:
    """The stream length's multiple: the data's pad multiple and the TP size (sequence parallelism). With context
    parallelism, CP x lcm(pad multiple, 2 x TP): every CP rank's share (1/CP of the stream) is then itself a multiple
    of the pad multiple (FP8 needs 16 tokens per rank, config.validate) and of TP, and the stream of 2 x CP."""
    pad, tp, cp = pad_to_multiple_of or 1, tensor_parallel_size or 1, context_parallel_size or 1
    if cp > 1:
        return cp * math.lcm(pad, 2 * tp)
    return math.lcm(pad, tp)


def pack_rows(rows, pad_id: int, multiple: int = 1, seq_multiple: int = 1) -> dict:
    """Id lists (one per sequence) -> a packed batch; each sequence's segment padded to a multiple of
    ``seq_multiple`` (context parallelism), the stream to a multiple of ``multiple`` (a multiple of seq_multiple).

    Returns {"input_ids": LongTensor[1, T], "attention_mask": BoolTensor[1, T] (True = a real token, for token
    counts), "packed_seq_params": PackedLayout}.
    """
    lengths = [len(r) for r in rows]
    if not rows or min(lengths) == 0:
        raise ValueError("cannot pack an empty batch or an empty sequence")
    if multiple % seq_multiple:
        raise ValueError(f"the stream multiple {multiple} must be a multiple of the sequence multiple {seq_multiple}")
    padded = [-(-n // seq_multiple) * seq_multiple for n in lengths]
    used = sum(padded)
    total = -(-used // multiple) * multiple
    segments = padded + ([total - used] if total > used else [])
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    mask = torch.zeros((1, total), dtype=torch.bool)
    if seq_multiple == 1:
        ids[0, :used] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
        mask[0, :used] = True
    else:
        start = 0
        for r, n in zip(rows, padded):
            ids[0, start : start + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[0, start : start + len(r)] = True
            start += n
    real = lengths + segments[len(rows):]
    return {"input_ids": ids, "attention_mask": mask, "packed_seq_params": PackedLayout.of(segments, len(rows), real)}


def pack_padded(batch: dict, pad_id: int, multiple: int = 1, seq_multiple: int = 1) -> dict:
    """A right-padded batch ({"input_ids", "attention_mask"} [b, s], plus any other keys) -> the same batch packed.

    For tests and benchmarks that run the same rows both ways; megarank itself packs straight from token ids
    (``Batcher``). Other keys (``group_size``, ``labels``) are kept; sequence i of the packed batch is row i.
    """
    ids, valid = batch["input_ids"], batch["attention_mask"]
    lengths = valid.sum(1).tolist()
    rows = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    packed = pack_rows(rows, pad_id, multiple, seq_multiple)
    return {**{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}, **packed}
