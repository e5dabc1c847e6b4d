"""Layout transforms and the key map: fused QKV in megatron's grouped GQA order, [gate; up], vocab padding."""
import torch

from checkpoint_tools import keymap
from checkpoint_tools.layout import fuse_qkv, pad_vocab, split_gate_up, split_qkv
from megarank.config import ModelConfig


def _heads(n, d, h, base):
    """[n*d, h] whose rows of head j are all equal to base + j (so the fused order is readable)."""
    return torch.cat([torch.full((d, h), float(base + j)) for j in range(n)])


def test_fused_qkv_is_grouped_per_kv_head():
    n, g, d, h = 6, 2, 3, 5  # 3 query heads per KV group
    q, k, v = _heads(n, d, h, 0), _heads(g, d, h, 100), _heads(g, d, h, 200)
    fused = fuse_qkv(q, k, v, n, g, d)
    assert fused.shape == ((n + 2 * g) * d, h)
    order = fused[::d, 0].tolist()
    # group 0: q0 q1 q2 k0 v0, group 1: q3 q4 q5 k1 v1
    assert order == [0, 1, 2, 100, 200, 3, 4, 5, 101, 201]
    q2, k2, v2 = split_qkv(fused, n, g, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_mha_and_gate_up_and_vocab():
    q, k, v = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, 2, 2, 4), 2, 2, 4), (q, k, v)))
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    g2, u2 = split_gate_up(torch.cat([gate, up]))
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    emb = torch.randn(5, 3)
    padded = pad_vocab(emb, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], emb) and not padded[5:].any()


def test_shapes_cover_every_key():
    m = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, vocab_size=300)
    shapes = keymap.megatron_shapes(m, 320)
    assert set(shapes) == set(keymap.megatron_keys())
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (3, (4 + 2 * 2) * 16, 64)
    hf = keymap.hf_shapes(m)
    assert len(hf) == 1 + 3 * 9 + 2 and hf["model.layers.2.self_attn.k_proj.weight"] == (32, 64)
    assert keymap.is_ignored_hf("lm_head.weight") and keymap.is_ignored_hf("model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not keymap.is_ignored_hf("model.layers.3.self_attn.q_proj.bias")
