"""Packed micro-batches: whole (query, passage) sequences laid end to end in one [1, T] token stream.

A packed batch carries no padding inside a sequence. Its boundaries travel as megatron-core's
``PackedSeqParams`` with ``qkv_format="thd"`` (megatron/core/packed_seq_params.py), which the attention layer
hands to RoPE and to core attention (megatron/core/transformer/attention.py:1066-1114, 1142-1157):

* RoPE restarts at position 0 in every sequence: with ``cu_seqlens`` set, ``apply_rotary_pos_emb`` takes the
  THD branch, which applies ``freqs[:len_i]`` to each sequence i when the table is ``max_seqlen`` long
  (models/common/embeddings/rope_utils.py:178-247, "CASE 2");
* Transformer Engine's attention reads ``cu_seqlens_q/kv`` and ``max_seqlen_q/kv``
  (extensions/transformer_engine.py:1373-1406); the local spec's ``SDPACoreAttention`` reads the host-side
  ``seqlens`` added here, so it never syncs on ``cu_seqlens`` in a layer.

The stream is padded at its end to a multiple of ``multiple`` (sequence parallelism splits it over TP ranks;
TE's FP8 GEMMs want the tokens on a rank divisible by 8: config.validate requires ``data.pad_to_multiple_of`` to
be a multiple of 8 x TP under SP with FP8, and ``packing_multiple`` is a multiple of it, tests/test_packing.py).
The padding is one extra *segment* of pad tokens: every token of the stream then belongs to a segment, attention
stays inside each, and pooling reads only the first ``num_sequences`` segments, so the dummy's outputs are never
used and its gradient is exactly 0.

What Transformer Engine's ``DotProductAttention`` needs for ``qkv_format="thd"`` and gets here (TE main at
d0067d0, transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py):
3-D q/k/v ``[t, heads, d]`` (megatron squeezes the batch dim, attention.py:1066-1069; TE asserts it at 1782-1784);
a mask type containing "padding" (1785-1787: the spec's ``AttnMaskType.padding``, and megatron turns ``no_mask``
into ``padding`` for thd, extensions/transformer_engine.py:1397-1404); ``cu_seqlens_q/kv`` 1-D int32 of one shape
(1788-1798), ending at ``t`` because the end padding is a segment (so no output row is left to chance);
``max_seqlen_q/kv`` as host ints, which spares TE a device-to-host sync per layer (1800-1811, 1488-1494); and no
``cu_seqlens_*_padded``, so TE sees no padding between sequences and keeps FlashAttention eligible (2008-2026).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class PackedSequences(PackedSeqParams):
    """``PackedSeqParams`` (what megatron and TE read) plus host-side copies of the segment lengths.

    Transformer Engine only reads the base class's fields (``dataclasses.fields(PackedSeqParams)``,
    extensions/transformer_engine.py:1290-1292), so the extra fields are invisible to it.
    """

    seqlens: tuple = ()  # every segment's length, the end padding included
    num_sequences: int = 0  # real sequences: the first num_sequences segments
    # Per-micro-batch scratch shared by the layers (the local attention's bucket plan).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device) -> "PackedSequences":
        return PackedSequences(
            qkv_format=self.qkv_format,
            cu_seqlens_q=self.cu_seqlens_q.to(device),
            cu_seqlens_kv=self.cu_seqlens_kv.to(device),
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_kv=self.max_seqlen_kv,
            seqlens=self.seqlens,
            num_sequences=self.num_sequences,
        )


def packing_multiple(pad_to_multiple_of: int, tensor_parallel_size: int) -> int:
    """The stream length's multiple: the data's pad multiple and the TP size (sequence parallelism)."""
    return math.lcm(pad_to_multiple_of or 1, tensor_parallel_size or 1)


def pack_rows(rows, pad_id: int, multiple: int = 1) -> dict:
    """Id lists (one per sequence) -> a packed batch.

    Returns {"input_ids": LongTensor[1, T], "attention_mask": BoolTensor[1, T] (True = a real token, for token
    counts), "packed_seq_params": PackedSequences}.
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
    return {"input_ids": ids, "attention_mask": mask, "packed_seq_params": _params(segments, len(rows))}


def pack_padded(batch: dict, pad_id: int, multiple: int = 1) -> dict:
    """A right-padded batch ({"input_ids", "attention_mask"} [b, s], plus any other keys) -> the same batch packed.

    Other keys (``group_size``, ``labels``) are kept; sequence i of the packed batch is row i.
    """
    ids, valid = batch["input_ids"], batch["attention_mask"]
    lengths = valid.sum(1).tolist()
    rows = [ids[i, :n].tolist() for i, n in enumerate(lengths)]
    packed = pack_rows(rows, pad_id, multiple)
    return {**{k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}, **packed}


def _params(segments: list, num_sequences: int) -> PackedSequences:
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    longest = max(segments)
    return PackedSequences(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest, seqlens=tuple(segments), num_sequences=num_sequences)


def model_inputs(batch: dict, device) -> tuple[tuple, dict]:
    """(args, kwargs) of the reranker's forward for a padded or a packed batch, on ``device``."""
    args = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
    packed = batch.get("packed_seq_params")
    return args, ({"packed_seq_params": packed.to(device)} if packed is not None else {})


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def batch_cost(num_rows: int, longest: int, total: int, packed: bool, multiple: int) -> int:
    """Tokens the model processes for a batch of ``num_rows`` sequences (``longest`` the longest, ``total`` all
    their tokens): the stream length packed, rows x padded length padded. From aggregates, so that a batch
    growing one sequence at a time is costed in O(1) (scoring batches, megarank.data.candidates)."""
    multiple = multiple or 1
    if packed:
        return _round_up(total, multiple)
    return num_rows * _round_up(longest, multiple)


def micro_batch_cost(group_rows: list, packed: bool, multiple: int) -> int:
    """Tokens the model processes for these groups' rows: the stream length packed, rows x padded length padded."""
    lengths = [len(r) for g in group_rows for r in g]
    return batch_cost(len(lengths), max(lengths), sum(lengths), packed, multiple)


def token_budget_micro_batches(groups, pair_tokenizer, budget: int, packed: bool, multiple: int) -> list:
    """Split one step's query groups into micro-batches of whole groups, each up to ``budget`` tokens.

    Groups keep their (sampler) order and fill micro-batches greedily: a group joins the current micro-batch
    while the micro-batch's cost (``micro_batch_cost``: what the model really runs, padding included) stays
    within the budget; a group over the budget on its own forms a micro-batch alone. Every micro-batch gets
    ``loss_weight`` = its groups x number of micro-batches / all groups, so that megatron's schedule, which
    divides each micro-batch's loss by the number of micro-batches (schedules.py:266-269), gives
    the mean over all groups: the same loss and gradients as any fixed split (weights of exactly 1.0 when all
    micro-batches have the same number of groups).
    """
    if budget <= 0:
        raise ValueError(f"train.micro_batch_tokens must be positive here (got {budget})")
    encoded = []
    for query, passages in groups:
        encoded.append(pair_tokenizer.encode([query] * len(passages), list(passages)))
    sizes = {len(rows) for rows in encoded}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"all groups must have the same non-zero number of passages, got sizes {sorted(sizes)}")
    chunks, current = [], []
    for rows in encoded:
        if current and micro_batch_cost(current + [rows], packed, multiple) > budget:
            chunks.append(current)
            current = []
        current.append(rows)
    chunks.append(current)
    group_size = len(encoded[0])
    batches = []
    for chunk in chunks:
        rows = [r for g in chunk for r in g]
        batch = pack_rows(rows, pair_tokenizer.pad_id, multiple) if packed else pair_tokenizer.pad(rows)
        batch["group_size"] = group_size
        batch["labels"] = torch.zeros(len(chunk), dtype=torch.long)
        batch["loss_weight"] = len(chunk) * len(chunks) / len(groups)
        batches.append(batch)
    return batches
