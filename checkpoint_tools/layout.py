"""Tensor transforms between HF Llama and megatron-core: fused QKV (grouped GQA order), [gate; up], vocab padding,
the folded temperature of an exported score head. The converters apply them only through ``keymap``'s mappings."""
from __future__ import annotations

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """q [n*d, h], k/v [g*d, h] -> megatron linear_qkv [g*(n/g + 2)*d, h].

    Megatron groups rows per KV head: for each of the g groups, its n/g query heads, then that group's K head, then
    its V head. (With n == g this degenerates to per-head [q, k, v]; test GQA so an ordering bug cannot hide.)
    """
    hidden = q.shape[-1]
    per = heads // groups
    q = q.reshape(groups, per, head_dim, hidden)
    k = k.reshape(groups, 1, head_dim, hidden)
    v = v.reshape(groups, 1, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(groups * (per + 2) * head_dim, hidden)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Inverse of fuse_qkv: [g*(n/g + 2)*d, h] -> q [n*d, h], k [g*d, h], v [g*d, h] (contiguous copies)."""
    hidden = qkv.shape[-1]
    per = heads // groups
    grouped = qkv.reshape(groups, per + 2, head_dim, hidden)
    q = grouped[:, :per].reshape(heads * head_dim, hidden).contiguous()
    k = grouped[:, per].reshape(groups * head_dim, hidden).contiguous()
    v = grouped[:, per + 1].reshape(groups * head_dim, hidden).contiguous()
    return q, k, v


def split_gate_up(fc1: torch.Tensor):
    """linear_fc1 [2*ffn, h] = [gate; up] -> gate [ffn, h], up [ffn, h] (contiguous copies)."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    """[vocab, h] -> [rows, h] with zero rows appended (megatron pads the vocabulary for TP divisibility)."""
    vocab, hidden = embedding.shape
    if rows == vocab:
        return embedding
    out = torch.zeros(rows, hidden, dtype=embedding.dtype)
    out[:vocab] = embedding
    return out


def cut_vocab(embedding: torch.Tensor, vocab: int) -> torch.Tensor:
    """Inverse of pad_vocab: the first ``vocab`` rows."""
    return embedding[:vocab]


def fold_temperature(score_weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """score.weight / temperature, computed in fp32 and returned in the weight's dtype (exactly the weight when 1)."""
    if temperature == 1.0:
        return score_weight
    return (score_weight.float() / temperature).to(score_weight.dtype)


def unfold_temperature(score_weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Inverse of fold_temperature (the same scores; bit-exact only when temperature is 1 or a power of two)."""
    if temperature == 1.0:
        return score_weight
    return (score_weight.float() * temperature).to(score_weight.dtype)
