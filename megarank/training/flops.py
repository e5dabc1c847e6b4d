"""Model FLOPs of training micro-batches and MFU (model FLOPs utilisation), from the real sequence lengths.

Counted are the model's matrix multiplications, 2 FLOPs per multiply-add, as in PaLM's definition of MFU
(Chowdhery et al. 2022, appendix B): the work the model needs, not what a kernel happens to execute. Forward,
per transformer layer, for a sequence of L tokens (h = hidden, d = head dim ``kv_channels``, n_q query heads,
n_kv = ``num_query_groups`` key/value heads, f = ``ffn_hidden_size``):

* QKV projection (GQA): 2 L h (n_q + 2 n_kv) d;  output projection: 2 L n_q d h;
* SwiGLU MLP, three h x f matrices (gate, up, down): 3 x 2 L h f;
* attention, per sequence: scores Q K^T 2 L^2 n_q d and probabilities x V 2 L^2 n_q d, so 4 L^2 n_q d
  (a packed stream attends within each segment: sum over segments of L_i^2, never T^2);

plus the score head, 2 h num_labels per sequence. Not counted: norms, RoPE, softmax, SwiGLU's elementwise
product, pooling sums, the loss, the embedding lookup (a gather: no multiply-add) and its gradient (a
scatter-add). Forward + backward = 3 x forward: the backward of every matmul is two matmuls of its size (the
input gradient and the weight gradient; attention: dQ, dK from dS, and dV, dP from dO). Recomputation is not
model work and is not counted: flash attention's backward recomputing the scores, or activation
recomputation (``model.recompute_granularity``), lower the MFU they cost.

**Real tokens only.** MFU here is useful work: a padded micro-batch counts each sequence at its own length
(``attention_mask``), a packed one its sequences' segments but not the padding segment at the stream's end.
Padding the GPU/CPU computes anyway therefore shows as lower MFU, which is what lets MFU compare layouts
(packed vs padded) by the work that trains the model.

MFU over a job = (model FLOPs of all data-parallel replicas' micro-batches in a step / step seconds) /
(peak FLOP/s of one device x world size). Each DP replica trains different groups, so replicas' FLOPs add up;
TP and PP split one replica's FLOPs over TP x PP devices without adding any, so they count once per replica
while their devices count in the denominator (their communication and pipeline bubbles lower MFU, as they
should). Every rank of a replica sees the same micro-batches, so each rank can count its replica's FLOPs.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def head_dim(m) -> int:
    """The attention head dimension: ``model.kv_channels``, else hidden / heads (as the model is built)."""
    return m.head_dim


def forward_flops(m, lengths: Sequence[int]) -> int:
    """Model FLOPs of one forward over sequences of these (real) lengths; ``m`` is a ``ModelConfig``."""
    h, d = m.hidden_size, head_dim(m)
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    per_token = 2 * h * (q + 2 * kv) + 2 * q * h + 3 * 2 * h * m.ffn_hidden_size
    attention = 4 * q * sum(n * n for n in lengths)
    head = 2 * h * m.num_labels * len(lengths)
    return m.num_layers * (per_token * sum(lengths) + attention) + head


def training_flops(m, lengths: Sequence[int]) -> int:
    """Forward + backward model FLOPs (3 x forward) of one micro-batch of sequences of these lengths."""
    return 3 * forward_flops(m, lengths)


def real_lengths(batch: dict) -> list[int]:
    """Each sequence's real length in a training micro-batch, padded ([b, s] + attention_mask) or packed."""
    packed = batch.get("packed_seq_params")
    if packed is not None:
        return list(packed.seqlens[: packed.num_sequences])  # the end-padding segment is not a sequence
    return [int(n) for n in batch["attention_mask"].sum(1).tolist()]


def micro_batches_flops(m, micro_batches: Iterable[dict]) -> int:
    """Forward + backward model FLOPs of one step's micro-batches on this data-parallel replica."""
    return sum(training_flops(m, real_lengths(b)) for b in micro_batches)


def mfu(flops_all_replicas: float, seconds: float, peak_per_device: float, world_size: int) -> float:
    """Model FLOPs utilisation (0-1) of a step: all replicas' model FLOPs per second / (peak x devices)."""
    return flops_all_replicas / max(seconds, 1e-12) / (peak_per_device * world_size)


def peak_dtype(m) -> str:
    """The dtype whose peak is the MFU denominator: FP8's where the GEMMs run in FP8, else ``model.dtype``.

    With ``model.fp8`` (and even with ``fp8_first_last_bf16``, two bf16 layers) the FP8 rate is the honest
    ceiling for the GEMMs that dominate; hardware.peak_flops has FP8 rates for the GPUs that run it.
    """
    return "fp8" if getattr(m, "fp8", None) else m.dtype
