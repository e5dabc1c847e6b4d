"""Context parallelism (CP): how a sequence is split over the CP ranks, and the two collectives the model adds.

The split is Transformer Engine's and megatron-core's DualChunkSwap: a sequence of S tokens (S a multiple of
2 x CP) is cut into 2 x CP chunks and CP rank r holds chunks r and 2CP-1-r, in that order
(megatron/core/utils.py:2021-2036 ``get_batch_on_this_cp_rank`` for [b, s] batches; TE
``thd_get_partitioned_indices`` per sequence of a packed stream, megatron/core/utils.py:2070-2076, whose result TE's
tests pin down: tests/pytorch/attention/test_cp_utils.py ``test_thd_get_partitioned_indices_matches_dual_chunk_
expected_indices``). Transformer Engine's context-parallel attention requires that layout ("It also requires tokens
to be re-ordered before entering this function", context_parallel.py ``attn_forward_func_with_cp``) and megatron's
RoPE selects the same positions (rope_utils.py:48-70 padded, :129-172 packed). A bidirectional model needs no load
balancing, but one layout for both specs means one data path, and RoPE positions are global either way.

What runs after the split (megarank/model/reranker.py, megarank/model/attention.py):

* attention sees the whole sequence: on the Transformer Engine spec TE's CP attention (``cp_comm_type`` p2p,
  megatron's default, extensions/transformer_engine.py:1240-1241: a ring that overlaps each K/V exchange with the
  attention of the previous block -- for bidirectional attention every step is a full block, so the overlap is
  complete, while TE's all_gather variant exposes its communication and a2a needs heads divisible by CP); on the
  local spec megarank's SDPA core attention all-gathers keys and values over the CP group (the Llama 3 paper's
  all-gather CP, section 3.3.2) with a reduce-scatter of their gradients in backward (``gather_sequence``);
* RoPE rotates every local token by its global position (``positions``);
* pooling adds each rank's part of each sequence (``pooling_weights``) and the score head is applied to that part
  before the sum: the head is linear and bias-free, so sum over ranks of head(part) = head(pooled), and the
  all-reduce (``reduce_scores``) moves [b, 1] scores instead of [b, h] vectors;
* gradients: megatron's schedule multiplies every CP rank's loss by CP (schedules.py:266-268) and its DDP averages
  gradients over data x context ranks (distributed_data_parallel.py:279-292, ``dp_cp_group``). ``reduce_scores``
  passes the score gradient through unchanged in backward (megatron's ``_ReduceFromModelParallelRegion``), so rank r
  gets CP x the gradient of its own tokens' share for every parameter, the score head's included (its input on rank r
  is rank r's part); the average over CP ranks is then exactly the gradient of the one loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def size() -> int:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()


def chunk_positions(length: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (0..length-1) of the tokens CP rank ``cp_rank`` holds of a sequence of ``length`` tokens: chunks
    r and 2CP-1-r of 2CP equal chunks, in that order (LongTensor [length / CP])."""
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} tokens cannot be split over {cp_size} context-parallel ranks: "
                         f"its length must be a multiple of 2 x CP = {2 * cp_size}")
    c = length // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)
    return torch.cat([first, second])


def gathered_order(length: int, cp_size: int) -> torch.Tensor:
    """Positions of a sequence's tokens after an all-gather of every rank's share (rank-major): a permutation of
    0..length-1."""
    return torch.cat([chunk_positions(length, cp_size, r) for r in range(cp_size)])


def pooling_weights(positions: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """The weight of each local token in its sequence's pooled vector: ``positions`` of the local tokens in their
    sequence, ``lengths`` (broadcastable to them) the real tokens of each one's sequence -> float64 weights of the
    broadcast shape, so that the pooled vector is the sum over ranks of sum_j w_j h_j.

    avg: 1/L for a real token (mean over the real tokens, megarank/model/pooling.py ``pool``); last: 1 at position
    L-1; cls: 1 at position 0. Padding tokens get 0."""
    if mode == "avg":
        return (positions < lengths).double() / lengths.clamp(min=1).double()
    if mode == "last":
        return (positions == (lengths - 1).clamp(min=0)).double()
    if mode == "cls":
        return (positions == 0).double()
    raise ValueError(f"unknown pooling {mode!r}")


def gather_sequence(x: torch.Tensor, cp_group) -> torch.Tensor:
    """All-gather ``x`` along dim 0 over the CP group (rank-major); backward: reduce-scatter of the gradient, so
    each rank's keys/values get the gradient from every rank's queries. megatron's sequence-parallel gather
    (tensor_parallel/mappings.py:296-348, ``tensor_parallel_output_grad=True``) on the CP group."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=cp_group)


def reduce_scores(x: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum the ranks' partial scores; backward: identity (mappings.py:217-233 ``_ReduceFromModelParallelRegion``),
    see the module docstring for why that gives exact gradients under megatron's CP loss scaling."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=cp_group)


@dataclass
class PaddedShard(PackedSeqParams):
    """A padded [b, S] batch split over CP ranks: this rank holds columns ``positions`` (DualChunkSwap) of every row.

    Passed to the layers as ``packed_seq_params`` with ``qkv_format="sbhd"`` (megatron's attention hands it to the
    core attention untouched and only squeezes/reshapes for "thd", attention.py:1066, 1189): the local spec's SDPA
    core attention reads it to rotate by global positions and to all-gather keys and values. Only the local spec
    trains padded batches under CP (config.validate: Transformer Engine's CP attention takes no padding mask in
    bshd/sbhd)."""

    length: int = 0  # S, the global padded length
    positions: Optional[torch.Tensor] = None  # [S / CP] global positions of the local columns
    key_order: Optional[torch.Tensor] = None  # [S] positions of the all-gathered keys
    context_group: object = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, length: int, cp_size: int, cp_rank: int, cp_group, device=None) -> "PaddedShard":
        return cls(qkv_format="sbhd", length=length,
                   positions=chunk_positions(length, cp_size, cp_rank).to(device),
                   key_order=gathered_order(length, cp_size).to(device), context_group=cp_group)


@dataclass
class PackedShard:
    """This rank's share of a packed stream under CP: for every segment (sequence) i of global padded length P_i
    and real length L_i, the local stream holds its chunks r and 2CP-1-r (P_i / CP tokens), segments in order.

    ``index`` [t / CP]: the local tokens' places in the global stream (to slice input ids); ``positions`` [t / CP]:
    their positions in their sequence (RoPE, pooling); ``local_seqlens``: P_i / CP; ``lengths``: L_i (global)."""

    index: torch.Tensor
    positions: torch.Tensor
    local_seqlens: tuple
    lengths: tuple
    seqlens: tuple  # P_i, the global segments
    context_size: int
    context_group: object = field(default=None, repr=False)

    @classmethod
    def of(cls, seqlens, lengths, cp_size: int, cp_rank: int, cp_group) -> "PackedShard":
        index, positions, start = [], [], 0
        for p in seqlens:
            pos = chunk_positions(p, cp_size, cp_rank)
            positions.append(pos)
            index.append(pos + start)
            start += p
        return cls(torch.cat(index), torch.cat(positions), tuple(p // cp_size for p in seqlens), tuple(lengths),
                   tuple(seqlens), cp_size, cp_group)

    def key_plan(self, device) -> list:
        """For every segment: (local offset, local length, index of its keys in the all-gathered local streams,
        SDPA keep-mask [1, 1, 1, P_i] of its real keys or None when it has no padding)."""
        t_local = sum(self.local_seqlens)
        plan, offset = [], 0
        for p, n, length in zip(self.seqlens, self.local_seqlens, self.lengths):
            keys = torch.cat([torch.arange(r * t_local + offset, r * t_local + offset + n) for r in range(self.context_size)])
            keep = None
            if length < p:
                keep = (gathered_order(p, self.context_size) < length).view(1, 1, 1, p).to(device)
            plan.append((offset, n, keys.to(device), keep))
            offset += n
        return plan
