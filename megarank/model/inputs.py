"""What the reranker's forward takes from a batch: ``model_inputs`` (padded or packed) and ``PackedSequences``.

Batches come from ``megarank.data.batcher.Batcher`` and hold only torch tensors and host ints: a packed batch
carries its stream layout as a ``megarank.data.packing.PackedLayout`` under ``"packed_seq_params"``. Here, at the
model's door, that layout becomes megatron-core's ``PackedSeqParams`` with ``qkv_format="thd"``
(megatron/core/packed_seq_params.py), which the attention layer hands to RoPE and to core attention
(megatron/core/transformer/attention.py:1066-1114, 1142-1157):

* RoPE restarts at position 0 in every sequence: with ``cu_seqlens`` set, ``apply_rotary_pos_emb`` takes the
  THD branch, which applies ``freqs[:len_i]`` to each sequence i when the table is ``max_seqlen`` long
  (models/common/embeddings/rope_utils.py:178-247, "CASE 2");
* Transformer Engine's attention reads ``cu_seqlens_q/kv`` and ``max_seqlen_q/kv``
  (extensions/transformer_engine.py:1373-1406); the local spec's ``SDPACoreAttention`` reads the host-side
  ``seqlens`` added here, so it never syncs on ``cu_seqlens`` in a layer.

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

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megarank.parallel import context
from megarank.parallel.context import PackedShard, PaddedShard


@dataclass
class PackedSequences(PackedSeqParams):
    """``PackedSeqParams`` (what megatron and TE read) plus host-side copies of the segment lengths.

    Transformer Engine only reads the base class's fields (``dataclasses.fields(PackedSeqParams)``,
    extensions/transformer_engine.py:1290-1292), so the extra fields are invisible to it.
    """

    seqlens: tuple = ()  # every segment's length in this rank's stream, the end padding included
    num_sequences: int = 0  # real sequences: the first num_sequences segments
    # Per-micro-batch scratch shared by the layers (the local attention's bucket plan).
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    # Context parallelism: this rank's share of every segment (megarank/parallel/context.py); None without CP.
    shard: Optional[PackedShard] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_layout(cls, layout, device=None) -> "PackedSequences":
        """A ``megarank.data.packing.PackedLayout`` (or anything with ``seqlens``, ``num_sequences``,
        ``cu_seqlens``) -> the params the layers read, ``cu_seqlens`` on ``device``."""
        cu = layout.cu_seqlens if device is None else layout.cu_seqlens.to(device)
        longest = max(layout.seqlens)
        return cls(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
                   seqlens=tuple(layout.seqlens), num_sequences=layout.num_sequences)

    @classmethod
    def context_parallel(cls, layout, shard: PackedShard, device=None) -> "PackedSequences":
        """This CP rank's params of a packed stream (``layout`` global, ``shard`` its share).

        What Transformer Engine's context-parallel attention reads for THD (context_parallel.py
        ``attn_forward_func_with_cp``): ``cu_seqlens_q/kv`` of the real tokens and ``cu_seqlens_q/kv_padded`` of the
        segments, both global (TE divides by CP itself, and asserts the padded ones are set for THD); ``max_seqlen``
        global. megatron's THD RoPE reads the padded ones (attention.py:1081-1089) and takes this rank's positions
        per segment (rope_utils.py:_get_thd_freqs_on_this_cp_rank). ``seqlens`` (what the local spec and pooling
        split the local stream by) are the local segments."""
        padded = layout.cu_seqlens
        real = _cumulative(shard.lengths)
        if device is not None:
            padded, real = padded.to(device), real.to(device)
        longest = max(layout.seqlens)
        return cls(qkv_format="thd", cu_seqlens_q=real, cu_seqlens_kv=real, cu_seqlens_q_padded=padded,
                   cu_seqlens_kv_padded=padded, max_seqlen_q=longest, max_seqlen_kv=longest,
                   seqlens=shard.local_seqlens, num_sequences=layout.num_sequences, shard=shard)

    def to(self, device) -> "PackedSequences":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return PackedSequences(
            qkv_format=self.qkv_format,
            cu_seqlens_q=move(self.cu_seqlens_q),
            cu_seqlens_kv=move(self.cu_seqlens_kv),
            cu_seqlens_q_padded=move(self.cu_seqlens_q_padded),
            cu_seqlens_kv_padded=move(self.cu_seqlens_kv_padded),
            max_seqlen_q=self.max_seqlen_q,
            max_seqlen_kv=self.max_seqlen_kv,
            seqlens=self.seqlens,
            num_sequences=self.num_sequences,
            shard=self.shard,
        )


def _cumulative(lengths) -> torch.Tensor:
    """int32 [len + 1]: 0 and the running sums of ``lengths``."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu


def model_inputs(batch: dict, device) -> tuple[tuple, dict]:
    """(args, kwargs) of the reranker's forward for a padded or a packed batch, on ``device``.

    Under context parallelism (CP > 1) this is where the batch is split: the input ids keep this CP rank's
    tokens (megarank/parallel/context.py), the padded attention mask stays whole (every rank masks the gathered
    keys and counts the real tokens), and the split travels to the layers as ``packed_seq_params``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed = batch.get("packed_seq_params")
    cp = context.size()
    if cp > 1:
        group, r = context.group(), context.rank()
        if packed is None:
            shard = PaddedShard.of(ids.shape[1], cp, r, group, device)
            return (ids[:, shard.positions.cpu()].to(device), mask.to(device)), {"packed_seq_params": shard}
        if isinstance(packed, PackedSequences):
            raise ValueError("a PackedSequences batch cannot be split over context-parallel ranks; pass the "
                             "batcher's PackedLayout")
        shard = PackedShard.of(packed.seqlens, packed.real_lengths, cp, r, group)
        params = PackedSequences.context_parallel(packed, shard, device)
        return (ids[:, shard.index].to(device), mask[:, shard.index].to(device)), {"packed_seq_params": params}
    args = (ids.to(device), mask.to(device))
    if packed is None:
        return args, {}
    params = packed.to(device) if isinstance(packed, PackedSequences) else PackedSequences.from_layout(packed, device)
    return args, {"packed_seq_params": params}
