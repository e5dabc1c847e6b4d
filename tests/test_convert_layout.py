"""Layout transforms and the mapping registry: fused QKV in megatron's grouped GQA order, [gate; up], vocab
padding, the folded score head; every mapping converts both ways and its shapes are derived."""
import torch

from checkpoint_tools import keymap
from checkpoint_tools.layout import fuse_qkv, pad_vocab, split_qkv
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
    dims = keymap.Dims(layers=1, hidden=4, ffn=6, heads=2, groups=2, head_dim=2, vocab=5, padded_vocab=8, labels=1)
    fc1 = next(mp for mp in keymap.LAYER_MAPPINGS if isinstance(mp, keymap.GatedMLPMapping))
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    hf = {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up}
    stacked = fc1.to_megatron(hf, dims, layer=0)
    assert torch.equal(stacked, torch.cat([gate, up]))  # [gate; up]
    assert torch.equal(fc1.to_megatron_block(hf, dims, 1, layer=0), up)  # stored as two row blocks
    assert all(torch.equal(hf[k], v) for k, v in fc1.to_hf(stacked, dims, layer=0).items())
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


def _random_hf(dims, with_score=True):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape, _, _ in keymap.hf_entries(dims, with_score)}


def test_every_mapping_round_trips_and_derives_its_shape():
    dims = keymap.Dims(layers=2, hidden=8, ffn=12, heads=4, groups=2, head_dim=3, vocab=10, padded_vocab=16, labels=1,
                       folded_temperature=0.5)
    hf = _random_hf(dims)
    back = {}
    for mp in keymap.MAPPINGS:
        for layer in range(dims.layers) if mp.per_layer else [None]:
            t = mp.to_megatron(hf, dims, layer)
            shape = mp.megatron_shape(dims)
            assert tuple(t.shape) == (shape[1:] if mp.per_layer else shape), mp.megatron
            blocks = [mp.to_megatron_block(hf, dims, b, layer) for b in range(mp.blocks)]
            assert torch.equal(torch.cat(blocks), t), mp.megatron
            back.update(mp.to_hf(t, dims, layer))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    emb = keymap.EMBEDDING.to_megatron(hf, dims)
    assert emb.shape == (16, 8) and not emb[10:].any()
    assert torch.equal(keymap.SCORE.to_megatron(hf, dims), hf["score.weight"] * 0.5)  # head unfolded: HF head = head / T


def test_hf_entries_are_in_hf_file_order():
    dims = keymap.Dims(layers=2, hidden=8, ffn=12, heads=4, groups=2, head_dim=3, vocab=10, padded_vocab=16, labels=1)
    names = [name for name, _, _, _ in keymap.hf_entries(dims)]
    layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{s}.weight" for i in range(2) for s in layer]
    assert names == expected + ["model.norm.weight", "score.weight"]
    assert "score.weight" not in [name for name, _, _, _ in keymap.hf_entries(dims, with_score=False)]
