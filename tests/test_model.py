"""The bidirectional Llama reranker on one CPU rank (docs/architecture.md, "The model"): attention direction, padding,
pooling, temperature, GQA, RoPE scaling, the SDPA core attention, bf16, checkpoints; TE/FP8 on GPU (marked).

All on the tiny config (2 layers, hidden 64, 4 heads, 2 KV heads, ffn 128, Llama-3 rope scaling), fp32.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megarank.config import load_config, transformer_engine_available

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PAD_ID = 258
SEQ = 16


pytestmark = pytest.mark.usefixtures("one_rank")  # tests/conftest.py


def build(*overrides: str, seed: int = 1234):
    """The tiny reranker with ``model.*=...`` overrides, weights from ``seed``, in eval mode."""
    from megarank.model import build_model

    cfg = load_config(TINY, list(overrides))
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.parallel)
    return model.eval()


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def batch(lengths=(16, 11, 5, 1), seq=SEQ, seed=0):
    """Random ids, right padding with PAD_ID; ``valid`` is True on real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(lengths), seq), generator=g)
    valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    ids[~valid] = PAD_ID
    return ids, valid


def run(model, ids, valid, hidden: bool = False):
    """Scores [b, 1] (and the final-norm hidden states [b, s, h] when ``hidden``)."""
    captured = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        dev = device_of(model)
        with torch.no_grad():
            scores = model(ids.to(dev), valid.to(dev))
    finally:
        hook.remove()
    if hidden:
        return scores, captured[0].transpose(0, 1)  # [s, b, h] -> [b, s, h]
    return scores


def copy_weights(src, dst):
    dst.load_state_dict(src.state_dict())
    return dst


# ----------------------------------------------------------------------------------------------- direction


def test_changing_the_last_real_token_changes_the_first_tokens_state():
    model = build()
    ids, valid = batch()
    _, before = run(model, ids, valid, hidden=True)
    changed = ids.clone()
    changed[0, 15] = (ids[0, 15] + 1) % 256  # last real token of a full-length row
    changed[1, 10] = (ids[1, 10] + 1) % 256  # last real token of a padded row
    _, after = run(model, changed, valid, hidden=True)
    for row in (0, 1):
        delta = (after[row, 0] - before[row, 0]).abs().max().item()
        assert delta > 1e-4, f"row {row}: the first token did not see the last one (max change {delta:.2e})"
    # rows that did not change are untouched: sequences in a batch do not see each other
    assert torch.equal(after[2:], before[2:])


@pytest.mark.parametrize("pooling", ["avg", "last", "cls"])
def test_pad_tokens_and_padding_length_change_no_score(pooling):
    model = build(f"model.pooling={pooling}")
    ids, valid = batch()
    scores, hidden = run(model, ids, valid, hidden=True)

    other_pads = ids.clone()
    other_pads[~valid] = torch.randint(0, 256, (int((~valid).sum()),))
    scores2, hidden2 = run(model, other_pads, valid, hidden=True)
    assert torch.equal(scores2, scores)
    assert torch.equal(hidden2[valid], hidden[valid])

    longer_ids = F.pad(ids, (0, 8), value=PAD_ID)  # 8 more pad positions on the right
    longer_valid = F.pad(valid, (0, 8), value=False)
    scores3, hidden3 = run(model, longer_ids, longer_valid, hidden=True)
    assert (scores3 - scores).abs().max().item() <= 1e-6
    assert (hidden3[:, :SEQ][valid] - hidden[valid]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------- pooling, head


def test_pool_uses_valid_tokens_only():
    from megarank.model.pooling import pool

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    valid = torch.tensor([[True, True, True, False], [True, False, False, False]])
    hidden_with_junk = hidden.clone()
    hidden_with_junk[~valid] = 1e6
    torch.testing.assert_close(pool(hidden_with_junk, valid, "avg"), torch.stack([hidden[0, :3].mean(0), hidden[1, 0]]))
    torch.testing.assert_close(pool(hidden_with_junk, valid, "last"), torch.stack([hidden[0, 2], hidden[1, 0]]))
    torch.testing.assert_close(pool(hidden_with_junk, valid, "cls"), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, valid, "max")


@pytest.mark.parametrize("pooling", ["avg", "last", "cls"])
def test_score_is_head_of_pooled_final_norm_states(pooling):
    model = build(f"model.pooling={pooling}")
    ids, valid = batch()
    scores, hidden = run(model, ids, valid, hidden=True)
    lengths = valid.sum(1)
    if pooling == "avg":
        pooled = torch.stack([hidden[i, : lengths[i]].mean(0) for i in range(len(ids))])
    elif pooling == "last":
        pooled = torch.stack([hidden[i, lengths[i] - 1] for i in range(len(ids))])
    else:
        pooled = hidden[:, 0]
    expected = pooled @ model.score.weight.detach().t()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert model.score.bias is None and model.score.weight.shape == (1, 64)


def test_temperature_divides_scores():
    base = build()
    warm = copy_weights(base, build("model.temperature=2.5"))
    ids, valid = batch()
    torch.testing.assert_close(run(warm, ids, valid), run(base, ids, valid) / 2.5, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- attention


def test_gqa_shapes():
    model = build()
    layer = model.decoder.layers[0]
    heads, groups, head_dim, hidden = 4, 2, 16, 64
    # fused QKV, grouped per KV head: groups x (heads/groups queries + 1 key + 1 value) x head_dim rows
    assert layer.self_attention.linear_qkv.weight.shape == ((heads + 2 * groups) * head_dim, hidden)
    assert layer.self_attention.linear_proj.weight.shape == (hidden, heads * head_dim)
    assert layer.mlp.linear_fc1.weight.shape == (2 * 128, hidden)  # [gate; up]
    core = layer.self_attention.core_attention
    assert (core.heads_per_partition, core.groups_per_partition) == (heads, groups)


def test_sdpa_core_attention_matches_explicit_softmax_with_repeated_kv():
    """GQA without materialised K/V repeats, megatron's [s, b, n, d] layout and True = masked out."""
    from megatron.core.transformer.enums import AttnMaskType

    from megarank.model.attention import SDPACoreAttention

    model = build()
    core = SDPACoreAttention(model.config, layer_number=1, attn_mask_type=AttnMaskType.padding, attention_type="self")
    s, b, n, g, d = 6, 2, 4, 2, 16
    q, k, v = torch.randn(s, b, n, d), torch.randn(s, b, g, d), torch.randn(s, b, g, d)
    masked = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    masked[1, ..., 4:] = True
    out = core(q, k, v, masked)

    k_rep, v_rep = (t.repeat_interleave(n // g, dim=2) for t in (k, v))  # [s, b, n, d]
    logits = torch.einsum("qbnd,kbnd->bnqk", q, k_rep) / math.sqrt(d)
    probs = logits.masked_fill(masked, float("-inf")).softmax(-1)
    expected = torch.einsum("bnqk,kbnd->qbnd", probs, v_rep).reshape(s, b, n * d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_sdpa_backend_equals_megatron_dot_product_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megarank.model.attention import SDPACoreAttention

    sdpa = build("model.attention_backend=sdpa")
    megatron = copy_weights(sdpa, build("model.attention_backend=megatron", seed=7))
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPACoreAttention)
    assert type(megatron.decoder.layers[0].self_attention.core_attention) is DotProductAttention
    ids, valid = batch()
    s1, h1 = run(sdpa, ids, valid, hidden=True)
    s2, h2 = run(megatron, ids, valid, hidden=True)
    assert (s1 - s2).abs().max().item() <= 1e-5
    assert (h1[valid] - h2[valid]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------- RoPE


def _hf_llama3_inv_freq(model_cfg):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rs = model_cfg.rope_scaling
    hf = LlamaConfig(
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_query_groups,
        max_position_embeddings=131072,
        rope_theta=model_cfg.rope_theta,
        rope_scaling={"rope_type": "llama3", **dataclasses.asdict(rs)},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    assert attention_factor == 1.0
    return inv_freq


@pytest.mark.parametrize("factor", [32.0, 8.0])
def test_llama3_rope_scaling_matches_transformers(factor):
    cfg = load_config(TINY, [f"model.rope_scaling.factor={factor}"])
    scaled = build(f"model.rope_scaling.factor={factor}")
    unscaled = build("model.rope_scaling=null")
    inv_freq = scaled.rotary_pos_emb.inv_freq.cpu()
    assert inv_freq.shape == (8,)  # head_dim / 2
    assert not torch.allclose(inv_freq, unscaled.rotary_pos_emb.inv_freq.cpu())
    torch.testing.assert_close(inv_freq, _hf_llama3_inv_freq(cfg.model), rtol=1e-6, atol=0)
    # rotate-half layout: the table the layers get is [pos * inv_freq, pos * inv_freq]
    emb = scaled.rotary_pos_emb(SEQ).cpu().reshape(SEQ, -1)
    angles = torch.arange(SEQ, dtype=torch.float32)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(emb, torch.cat([angles, angles], dim=-1))
    # and the forward actually depends on it
    ids, valid = batch()
    unscaled.load_state_dict(scaled.state_dict())
    assert not torch.allclose(run(scaled, ids, valid), run(unscaled, ids, valid), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------- precision, checkpoint


def test_bf16_forward_backward_gives_finite_grads():
    model = build("model.dtype=bf16").train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids, valid = batch(lengths=(8, 5), seq=8)
    dev = device_of(model)
    scores = model(ids.to(dev), valid.to(dev))
    assert scores.dtype == torch.bfloat16 and scores.shape == (2, 1)
    loss = F.cross_entropy(scores.float().view(1, 2), torch.zeros(1, dtype=torch.long, device=dev))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["score.weight"].abs().sum() > 0 and grads["embedding.word_embeddings.weight"].abs().sum() > 0


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    from megarank.checkpoint import CheckpointError, load_model_weights, save_model_weights

    saved = build(seed=1)
    save_model_weights(saved, tmp_path / "model")
    loaded = build(seed=2)
    assert not torch.equal(loaded.score.weight, saved.score.weight)
    load_model_weights(loaded, tmp_path)  # the checkpoint folder or its model/ both work
    a, b = saved.state_dict(), loaded.state_dict()
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")]
    assert len(tensors) == 15
    for key in tensors:
        assert torch.equal(a[key], b[key]), key
    ids, valid = batch()
    assert torch.equal(run(saved, ids, valid), run(loaded, ids, valid))
    with pytest.raises(CheckpointError, match="not a megarank checkpoint"):
        load_model_weights(loaded, tmp_path / "nowhere")


def test_local_spec_resolves_without_transformer_engine():
    from megarank.model.spec import resolve_impl

    assert resolve_impl("local") == "local"
    if not transformer_engine_available():
        assert resolve_impl("auto") == "local"
        with pytest.raises(RuntimeError, match="Transformer Engine"):
            resolve_impl("transformer_engine")


# ----------------------------------------------------------------------------------------------- GPU (TE, FP8)

needs_te = pytest.mark.skipif(not transformer_engine_available(), reason="needs CUDA and Transformer Engine")


@pytest.mark.gpu
@needs_te
def test_te_spec_equals_local_spec_in_bf16(tmp_path):
    from megarank.checkpoint import load_model_weights, save_model_weights

    local = build("model.transformer_impl=local", "model.dtype=bf16")
    save_model_weights(local, tmp_path / "model")
    te = build("model.transformer_impl=transformer_engine", "model.dtype=bf16", seed=99)
    load_model_weights(te, tmp_path)  # same checkpoint keys in both specs
    assert "TE" in type(te.decoder.layers[0].self_attention.linear_qkv).__name__
    ids, valid = batch()
    s_local, h_local = run(local, ids, valid, hidden=True)
    s_te, h_te = run(te, ids, valid, hidden=True)
    valid = valid.to(h_te.device)
    torch.testing.assert_close(h_te[valid].float(), h_local[valid].float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s_te.float(), s_local.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_te
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_hybrid_forward_backward_runs(recipe):
    model = build(
        "model.transformer_impl=transformer_engine", "model.dtype=bf16", "model.fp8=hybrid", f"model.fp8_recipe={recipe}"
    ).train()
    assert model.config.fp8 == "hybrid"
    ids, valid = batch(lengths=(16, 12, 9, 16), seq=16)  # 64 tokens: FP8 GEMMs want multiples of 16
    dev = device_of(model)
    for _ in range(2):  # delayed scaling uses the amax history from the step before
        model.zero_grad(set_to_none=True)
        scores = model(ids.to(dev), valid.to(dev))
        loss = F.cross_entropy(scores.float().view(1, -1), torch.zeros(1, dtype=torch.long, device=dev))
        loss.backward()
    assert torch.isfinite(scores).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
@needs_te
def test_fp8_backward_with_24_real_tokens_runs_once_packed_to_a_multiple_of_16():
    """24 tokens (an odd multiple of 8) pass TE's forward-only check but crash the FP8 weight-gradient GEMM on Hopper
    (its leading dimension is the token count; cublaslt_gemm.cu asserts lda % 16). validate() requires
    data.pad_to_multiple_of to be a multiple of 16 with FP8, and the packed stream is padded to it (packing.py)."""
    from megarank.config import ConfigError, validate
    from megarank.data.packing import pack_rows, packing_multiple
    from megarank.model.inputs import model_inputs

    overrides = ["model.transformer_impl=transformer_engine", "model.dtype=bf16", "model.fp8=hybrid",
                 "model.fp8_recipe=tensorwise", "data.pad_to_multiple_of=16"]
    cfg = load_config(TINY, overrides)
    validate(cfg)
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of"):
        validate(load_config(TINY, overrides[:-1] + ["data.pad_to_multiple_of=8"]))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (10, 9, 5)]  # 24 real tokens
    batch = pack_rows(rows, PAD_ID, packing_multiple(cfg.data.pad_to_multiple_of, 1))
    assert batch["input_ids"].shape == (1, 32)
    model = build(*overrides).train()
    args, kwargs = model_inputs(batch, device_of(model))
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        scores = model(*args, **kwargs)
        loss = F.cross_entropy(scores.float().view(1, -1), torch.zeros(1, dtype=torch.long, device=scores.device))
        loss.backward()
    assert scores.shape[0] == 3 and torch.isfinite(scores).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.gpu
@needs_te
def test_te_in_fp32_cannot_train_packed_and_scores_padded_with_the_same_scores(tmp_path):
    """TE in fp32 has no attention backend for packed (THD) input (flash/fused need 16-bit, unfused refuses THD:
    TE attention/dot_product_attention/utils.py): validate() refuses training that way; a scorer switches to padded
    batches (megarank/scoring/reranker.py) and gives the scores of the local spec."""
    from megarank import Reranker
    from megarank.checkpoint import save_model_weights, write_manifest
    from megarank.config import ConfigError, save_config, validate

    te_fp32 = ["model.transformer_impl=transformer_engine", "model.dtype=fp32", "data.packing=true"]
    with pytest.raises(ConfigError, match="data.packing"):
        validate(load_config(TINY, te_fp32))
    pairs = [("what is a reranker", "a model that scores query passage pairs"), ("q", "p " * 40), ("long " * 30, "x")]
    local = Reranker.from_config(TINY, ["model.transformer_impl=local", "model.dtype=fp32"])
    ckpt = tmp_path / "ckpt"
    save_model_weights(local.model, ckpt / "model")
    save_config(local.cfg, ckpt / "config.yaml")
    write_manifest(ckpt)
    te = Reranker.from_checkpoint(ckpt, dtype="fp32", overrides=["model.transformer_impl=transformer_engine"])
    assert "TE" in type(te.model.decoder.layers[0].self_attention.linear_qkv).__name__
    assert te.cfg.data.packing is False, "the scorer falls back to padded batches"
    assert Reranker.from_config(TINY, te_fp32).cfg.data.packing is False  # random weights: the same fallback
    torch.testing.assert_close(te.score(pairs), local.score(pairs), rtol=1e-4, atol=1e-4)


def test_swiglu_function_matches_megatron_glu():
    """The local spec's single-function SwiGLU (megarank/model/mlp.py) equals upstream's chunk/silu/mul."""
    from megarank.model.mlp import SwiGLUActivation

    model = build()
    mlp = model.decoder.layers[0].mlp
    assert isinstance(mlp.activation_func, SwiGLUActivation) and model.config.use_te_activation_func
    x = torch.randn(5, 3, 2 * 128, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 3, 128, dtype=torch.float64)
    ours = mlp.activation_func(x)
    (g_ours,) = torch.autograd.grad(ours, x, grad)
    gate, up = torch.chunk(x, 2, dim=-1)
    ref = F.silu(gate) * (up + 0.0)  # megatron-core 0.16.1 MLP.forward's glu()
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(mlp.activation_func, (x[:2, :1].detach().requires_grad_(),))
    # the TE spec's MLP has no activation module: its config must keep upstream's gated path
    from megarank.model.transformer_config import make_transformer_config

    cfg = load_config(TINY)
    assert make_transformer_config(cfg.model, cfg.parallel, "transformer_engine").use_te_activation_func is False


@pytest.mark.parametrize("pooling", ["avg", "last"])
def test_layers_get_contiguous_gradients(pooling):
    """Pooling reads [s, b, h] through a transpose; the gradient must still reach the layers in [s, b, h]
    order (else every linear's backward copies it: a ~1-4% CPU step-time cost, see reranker._ContiguousGrad)."""
    model = build(f"model.pooling={pooling}").train()
    layouts = []
    for layer in model.decoder.layers:
        layer.mlp.linear_fc2.register_full_backward_hook(lambda m, gi, go: layouts.append(go[0].is_contiguous()))
    ids, valid = batch()
    dev = device_of(model)
    model(ids.to(dev), valid.to(dev)).sum().backward()
    assert layouts == [True, True]
