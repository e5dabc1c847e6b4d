"""Core attention for the local spec on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward contract), but one fused
SDPA call instead of baddbmm + masked softmax + bmm, and GQA without materialising repeated keys/values.
The mask follows megatron's convention: boolean, True = masked out (padding), broadcastable to [b, np, sq, sk].

Packed sequences (``packed_seq_params`` with ``qkv_format="thd"``, see megarank/model/inputs.py and megarank/data/batcher.py): megatron's
attention squeezes q/k/v to [t, n, d] and reshapes our [t, n * d] output back to [t, 1, h]
(megatron/core/transformer/attention.py:1066-1069, 1189-1194). Attention must stay inside each sequence. One
block-diagonal mask over the stream would cost O(T^2) for O(sum L_i^2) of useful work, so each sequence gets
its own unmasked SDPA call (``PACKED_ATTENTION = "loop"``, the default). The alternative, ``"bucket"``, gathers
sequences of similar length into one padded [B, n, L, d] SDPA call with a key-padding mask (``BUCKET_WASTE``
bounds the padding a bucket may add). On SciFact training micro-batches (5-10 sequences) neither was
consistently faster on a shared CPU (benchmarks/RESULTS.md: 1.15-1.38x padded speed for buckets, 1.18-1.51x for
the loop, the order flipping between runs); the loop is the default as the simpler path (no gather/scatter
copies). Buckets should pay for streams of many short sequences (fewer, larger SDPA calls); not measured.

RoPE in the core attention (``rope`` set, by LlamaReranker.use_core_rope): megatron applies RoPE before the core
attention with ``_apply_rotary_pos_emb_bshd`` (models/common/embeddings/rope_utils.py:92-126), which per layer and
per q/k recomputes cos and sin of the whole table, builds rotate-half with a ``neg`` and a ``cat`` and ends with a
``cat((t, t_pass))`` copy: on CPU ≈ 8% of a SmolLM2 scoring forward (benchmarks/RESULTS.md, issue 11). Here the
reranker passes no ``rotary_pos_emb`` to the layers and the core attention rotates q and k itself from cos/sin
tables computed once (``RotaryTables``), with the same products and sums (x1*c - x2*s, x2*c + x1*s: the same
roundings as megatron's x*cos + rotate_half(x)*sin, since -(a*b) is exact) and the exact gradient of that
rotation (``RotateHalf``), so scores and gradients match megatron's RoPE bit for bit in fp32 (and bf16).

Context parallelism (megarank/parallel/context.py): each rank holds its DualChunkSwap share of every sequence. The
core attention rotates its queries and keys by their global positions, all-gathers keys and values over the CP
group (``gather_sequence``: reduce-scatter of their gradients in backward) and attends with its local queries to
every key of the sequence; the key-padding mask follows the gathered keys' order. Bidirectional attention does not
depend on the keys' order, so no reordering is needed. RoPE must then be applied here (the reranker checks it).
"""
import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megarank.parallel.context import PaddedShard, gather_sequence


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
        tp = pg_collection.tp.size() if pg_collection is not None else parallel_state.get_tensor_model_parallel_world_size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # RotaryTables when RoPE is applied here instead of in megatron's attention (see the module docstring).
        self.rope = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention bias")
        if isinstance(packed_seq_params, PaddedShard):
            return self._padded_context(query, key, value, attention_mask, packed_seq_params)
        if getattr(packed_seq_params, "shard", None) is not None:
            return self._packed_context(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            if self.rope is not None:
                query, key = self._rope_packed(query, key, packed_seq_params)
            return self._packed(query, key, value, packed_seq_params)
        if self.rope is not None:
            cos, sin = self.rope.get(query.shape[0], query.device, query.dtype)  # [s, 1, 1, d/2]
            query, key = RotateHalf.apply(query, cos, sin), RotateHalf.apply(key, cos, sin)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        keep = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        out = self._sdpa(q, k, v, keep, is_causal=attention_mask is None and mask_type == AttnMaskType.causal)
        # [b, n, s, d] -> [s, b, n * d]
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def _context_rope(self, cache: dict, longest: int, positions, query):
        """cos/sin [n_local, 1, 1, d/2] at this rank's global positions, built once per micro-batch (``cache``)."""
        if self.rope is None:
            raise ValueError("context parallelism on the local spec needs RoPE in the core attention "
                             "(LlamaReranker.use_core_rope)")
        key_ = ("rope-cp", query.device, query.dtype)
        tables = cache.get(key_)
        if tables is None:
            cos, sin = self.rope.get(longest, query.device, query.dtype)
            at = positions.to(query.device)
            tables = cache[key_] = (cos[at], sin[at])
        return tables

    def _padded_context(self, query, key, value, attention_mask, shard):
        """q/k/v [S/CP, b, n, d] of a padded batch split over CP ranks -> [S/CP, b, np * d]; ``attention_mask``
        [b, 1, 1, S] in the all-gathered keys' order (True = masked out)."""
        cos, sin = self._context_rope(shard.cache, shard.length, shard.positions, query)
        query, key = RotateHalf.apply(query, cos, sin), RotateHalf.apply(key, cos, sin)
        key, value = (gather_sequence(t.contiguous(), shard.context_group) for t in (key, value))  # [S, b, ng, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._sdpa(q, k, v, None if attention_mask is None else ~attention_mask)
        b, n, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d)

    def _packed_context(self, query, key, value, packed):
        """q [t/CP, np, d], k/v [t/CP, ng, d] of this rank's share of a packed stream -> [t/CP, np * d]: each local
        query attends to every real key of its sequence, gathered from all CP ranks."""
        shard, cache = packed.shard, packed.cache
        cos, sin = self._context_rope(cache, max(shard.seqlens), shard.positions, query)
        query, key = RotateHalf.apply(query, cos[:, 0], sin[:, 0]), RotateHalf.apply(key, cos[:, 0], sin[:, 0])
        key, value = (gather_sequence(t.contiguous(), shard.context_group) for t in (key, value))  # [CP * t/CP, ng, d]
        plan = cache.get(("cp-plan", query.device))
        if plan is None:
            plan = cache[("cp-plan", query.device)] = shard.key_plan(query.device)
        outs = []
        for offset, n, keys, keep in plan:
            q = query[offset : offset + n].transpose(0, 1).unsqueeze(0)
            k, v = (t[keys].transpose(0, 1).unsqueeze(0) for t in (key, value))
            outs.append(self._sdpa(q, k, v, keep)[0].transpose(0, 1))
        return torch.cat(outs).reshape(query.shape[0], -1)

    def _sdpa(self, q, k, v, keep=None, is_causal=False):
        """SDPA on [b, n, s, d]. Grouped-query attention: SDPA's own ``enable_gqa``, except on CUDA with a mask,
        where the flash and memory-efficient kernels refuse GQA and SDPA falls back to the math kernel
        (transformers repeats K/V there for this reason: integrations/sdpa_attention.py ``use_gqa_in_sdpa``, "CUDA
        ... require no mask"); there K/V are repeated per query head, the same attention."""
        gqa = self.heads_per_partition != self.groups_per_partition
        if gqa and not gqa_natively(q.device.type, masked=keep is not None):
            repeat = self.heads_per_partition // self.groups_per_partition
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            gqa = False
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, dropout_p=dropout_p, is_causal=is_causal, scale=self.softmax_scale,
                enable_gqa=gqa,
            )

    def _dropout_rng(self, dropout_p: float):
        """Attention dropout draws from megatron's model-parallel RNG, as DotProductAttention does
        (megatron/core/transformer/dot_product_attention.py:216-220: ``get_cuda_rng_tracker().fork()`` unless
        sequence parallel): tensor-parallel ranks hold different heads and must drop different elements, while the
        default generator is seeded alike on every TP rank. On CPU the tracker is megatron's inference tracker, whose
        fork uses the CPU generator (megarank/parallel/init.py set_seed)."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()

    def _rope_packed(self, query, key, packed):
        """RoPE on a packed [t, n, d] stream: positions restart at 0 in every segment, as megatron's THD RoPE
        (rope_utils.py:232-247: ``freqs[:len_i]`` per sequence). The per-token tables are built once per
        micro-batch (``packed.cache``) and shared by every layer."""
        seqlens = getattr(packed, "seqlens", None) or tuple((packed.cu_seqlens_q[1:] - packed.cu_seqlens_q[:-1]).tolist())
        cache = getattr(packed, "cache", None)
        key_ = ("rope", query.device, query.dtype)
        tables = cache.get(key_) if cache is not None else None
        if tables is None:
            cos, sin = self.rope.get(max(seqlens), query.device, query.dtype)
            tables = tuple(torch.cat([t[:n] for n in seqlens])[:, 0] for t in (cos, sin))  # [t, 1, d/2]
            if cache is not None:
                cache[key_] = tables
        return RotateHalf.apply(query, *tables), RotateHalf.apply(key, *tables)

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


def gqa_natively(device_type: str, masked: bool) -> bool:
    """Whether SDPA's ``enable_gqa`` keeps a fast kernel: not on CUDA with a mask (see SDPACoreAttention._sdpa)."""
    return not (masked and device_type == "cuda")


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


class RotaryTables:
    """cos and sin of a megatron ``RotaryEmbedding``'s angles, computed once and sliced per sequence length.

    The angle of position p and frequency j is ``p * inv_freq[j]`` (``get_freqs_non_repeated``,
    rotary_pos_embedding.py:127-139), whatever the table's length, so a slice of a longer table is exactly the
    table megatron would build for the shorter length. Rotate-half (non-interleaved) RoPE repeats the angles
    (``cat((freqs, freqs))``, rotary_pos_embedding.py:164-165): one half is all the tables need. Megatron casts
    cos/sin to the activations' dtype after computing them in the angles' dtype (rope_utils.py:122-123); so do we.
    Only for unscaled positions (no ``seq_len_interpolation_factor``) and mscale 1 (not YaRN): the reranker
    checks that before using it.
    """

    def __init__(self, rotary):
        self.rotary = rotary
        self._tables = {}  # (device, dtype) -> (cos, sin) [n, 1, 1, d/2] of the longest length asked so far

    def get(self, n: int, device, dtype):
        key = (torch.device(device), dtype)
        tables = self._tables.get(key)
        if tables is None or tables[0].shape[0] < n:
            with torch.no_grad():
                freqs = self.rotary.get_freqs_non_repeated(max(n, 512)).to(device)[:, None, None, :]
                tables = (torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))
            self._tables[key] = tables
        return tables[0][:n], tables[1][:n]


class RotateHalf(torch.autograd.Function):
    """Rotate-half RoPE: x = [x1; x2] -> [x1*c - x2*s; x2*c + x1*s] over the last dim (c, s broadcast over x1).

    Forward and backward use megatron's roundings: its ``x*cos + rotate_half(x)*sin`` with
    rotate_half(x) = [-x2; x1] computes x1*c + (-x2)*s and x2*c + x1*s, the same as here since -(a*b) = (-a)*b
    exactly and a + (-b) = a - b. Its autograd gives dx1 = g1*c + g2*s and dx2 = g2*c + (-(g1*s)) — the inverse
    rotation, computed the same way in ``backward``. No ``cat``, no ``neg``, no per-layer cos/sin.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_rotate(grad, cos, sin, inverse=True), None, None


def rope_rotate(x, cos, sin, inverse: bool = False):
    """x [..., d] -> the rotation by +angle (``inverse`` False) or -angle, halves as x.view(..., 2, d/2) so that every
    product runs over the whole tensor with cos/sin broadcast (measured 2.5 ms vs megatron's 4-4.8 ms for one
    SmolLM2 q of 448 x 8 tokens, one thread; slicing the halves instead ran 3.6 ms)."""
    half = x.shape[-1] // 2
    xv = x.reshape(*x.shape[:-1], 2, half)
    out = xv * cos.unsqueeze(-2)
    if inverse:  # dx1 = g1*c + g2*s, dx2 = g2*c - g1*s
        out[..., 0, :] += xv[..., 1, :] * sin
        out[..., 1, :] -= xv[..., 0, :] * sin
    else:  # y1 = x1*c - x2*s, y2 = x2*c + x1*s
        out[..., 0, :] -= xv[..., 1, :] * sin
        out[..., 1, :] += xv[..., 0, :] * sin
    return out.view(x.shape)
