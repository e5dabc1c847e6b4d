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

    @classmethod
    def from_layout(cls, layout, device=None) -> "PackedSequences":
        """A ``megarank.data.packing.PackedLayout`` (or anything with ``seqlens``, ``num_sequences``,
        ``cu_seqlens``) -> the params the layers read, ``cu_seqlens`` on ``device``."""
        cu = layout.cu_seqlens if device is None else layout.cu_seqlens.to(device)
        longest = max(layout.seqlens)
        return cls(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest,
                   seqlens=tuple(layout.seqlens), num_sequences=layout.num_sequences)

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


def model_inputs(batch: dict, device) -> tuple[tuple, dict]:
    """(args, kwargs) of the reranker's forward for a padded or a packed batch, on ``device``."""
    args = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
    packed = batch.get("packed_seq_params")
    if packed is None:
        return args, {}
    params = packed.to(device) if isinstance(packed, PackedSequences) else PackedSequences.from_layout(packed, device)
    return args, {"packed_seq_params": params}
