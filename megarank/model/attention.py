"""Core attention for the local spec on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract), but one fused
SDPA call instead of baddbmm + masked softmax + bmm, and GQA without materialising repeated keys/values.
The mask follows megatron's convention: boolean, True = masked out (padding), broadcastable to [b, np, sq, sk].

Packed sequences (``packed_seq_params`` with ``qkv_format="thd"``, see megarank/data/packing.py): megatron's
attention squeezes q/k/v to [t, n, d] and reshapes our [t, n * d] output back to [t, 1, h]
(megatron/core/transformer/attention.py:1066-1069, 1189-1194). Attention must stay inside each sequence. One
block-diagonal mask over the stream would cost O(T^2) for O(sum L_i^2) of useful work, so each sequence gets
its own unmasked SDPA call (``PACKED_ATTENTION = "loop"``, the default). The alternative, ``"bucket"``, gathers
sequences of similar length into one padded [B, n, L, d] SDPA call with a key-padding mask (``BUCKET_WASTE``
bounds the padding a bucket may add). On SciFact training micro-batches (5-10 sequences) neither was
consistently faster on a shared CPU (benchmarks/RESULTS.md: 1.15-1.38x padded speed for buckets, 1.18-1.51x for
the loop, the order flipping between runs); the loop is the default as the simpler path (no gather/scatter
copies). Buckets should pay for streams of many short sequences (fewer, larger SDPA calls); not measured.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use the Transformer Engine spec")
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=keep,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=attention_mask is None and mask_type == AttnMaskType.causal,
            scale=self.softmax_scale,
            enable_gqa=self.heads_per_partition != self.groups_per_partition,
        )
        # [b, n, s, d] -> [s, b, n * d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def _sdpa(self, q, k, v, keep=None):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=self.heads_per_partition != self.groups_per_partition,
        )

    def _packed(self, query, key, value, packed):
        """q [t, np, d], k/v [t, ng, d] of a packed stream -> [t, np * d], attention within each segment."""
        if packed.qkv_format != "thd":
            raise ValueError(f"SDPACoreAttention: packed sequences must be qkv_format='thd', got {packed.qkv_format!r}")
        seqlens = getattr(packed, "seqlens", None)
        if not seqlens:  # a plain PackedSeqParams: one host sync per layer
            seqlens = tuple((packed.cu_seqlens_q[1:] - packed.cu_seqlens_q[:-1]).tolist())
        t = query.shape[0]
        if PACKED_ATTENTION == "loop":
            outs = [self._sdpa(*(x.transpose(0, 1).unsqueeze(0) for x in qkv))[0].transpose(0, 1)
                    for qkv in zip(query.split(seqlens), key.split(seqlens), value.split(seqlens))]
            return torch.cat(outs).reshape(t, -1)
        out = query.new_empty(query.shape)
        cache = getattr(packed, "cache", None)
        plan = cache.get("buckets") if cache is not None else None
        if plan is None:
            plan = _buckets(seqlens, query.device)
            if cache is not None:  # one plan per micro-batch, shared by every layer
                cache["buckets"] = plan
        for index, rows, width, keep in plan:
            # index [B * width]: a token per slot; a slot past its sequence's end points at the sequence's first
            # token (any real row works: it is a masked key, and its query row is dropped via `rows`).
            q, k, v = (x[index].view(-1, width, *x.shape[1:]).transpose(1, 2) for x in (query, key, value))
            o = self._sdpa(q, k, v, keep).transpose(1, 2).reshape(-1, *query.shape[1:])
            out[index[rows]] = o[rows]
        return out.reshape(t, -1)


# "loop": one SDPA call per sequence (default); "bucket": length-bucketed SDPA. Module-level
# so the benchmark and the tests can run both on the same model.
PACKED_ATTENTION = "loop"
# A bucket may hold at most this share of padded key slots (sum over its sequences of width - L_i over B * width).
BUCKET_WASTE = 0.1


def _buckets(seqlens, device):
    """Group segments of similar length: -> [(token index [B * width], valid slots (bool [B * width] or slice),
    width, SDPA keep-mask [B, 1, 1, width] or None when every sequence of the bucket is width long)].

    Segments are sorted by length (longest first); a bucket grows while its padding stays within BUCKET_WASTE.
    Pure host arithmetic on the small ``seqlens`` tuple, then one index tensor per bucket.
    """
    starts = [0]
    for n in seqlens[:-1]:
        starts.append(starts[-1] + n)
    order = sorted(range(len(seqlens)), key=lambda i: -seqlens[i])
    groups, current = [], []
    for i in order:
        trial = current + [i]
        width = seqlens[trial[0]]
        if current and sum(width - seqlens[j] for j in trial) > BUCKET_WASTE * width * len(trial):
            groups.append(current)
            trial = [i]
        current = trial
    groups.append(current)
    result = []
    for group in groups:
        width = seqlens[group[0]]
        lengths = torch.tensor([seqlens[i] for i in group], device=device)
        slot = torch.arange(width, device=device)
        inside = slot[None, :] < lengths[:, None]  # [B, width]
        first = torch.tensor([starts[i] for i in group], device=device)[:, None]
        index = torch.where(inside, first + slot[None, :], first).reshape(-1)
        ragged = any(seqlens[i] != width for i in group)
        keep = inside[:, None, None, :] if ragged else None  # SDPA: True = attend
        result.append((index, inside.reshape(-1) if ragged else slice(None), width, keep))
    return result
