"""The scoring speed paths of the local model (issue 11) give the numbers of the paths they replace.

RoPE inside the SDPA core attention (``LlamaReranker.use_core_rope``) vs megatron's own RoPE in its attention
layer: scores and every parameter gradient, padded and packed (both packed attentions), fp32 and bf16; the
rotation's forward and backward against megatron's ``_apply_rotary_pos_emb_bshd`` under autograd; the fused
RMSNorm / no-grad SwiGLU against their reference formulas. Tiny config (tests/test_packing.py's helpers), one rank.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_packing import PAD_ID, TINY, _build, assert_rel_close, padded_batch

RTOL = 1e-6  # fp32; in practice the paths agree bit for bit


pytestmark = pytest.mark.usefixtures("one_rank")  # tests/conftest.py


def _scores_and_grads(model, batch):
    """tests/test_packing.py's helper on the model's own device (CUDA where the model was built there)."""
    from megarank.model.inputs import model_inputs

    device = next(model.parameters()).device
    model.zero_grad()
    args, kwargs = model_inputs(batch, device)
    scores = model(*args, **kwargs)
    (scores[:, 0] * torch.linspace(-1.0, 2.0, scores.shape[0], device=device)).sum().backward()
    return scores.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}


def _compare(model, batch, rtol=RTOL):
    assert model.use_core_rope(False) is False
    ref_scores, ref_grads = _scores_and_grads(model, batch)
    assert model.use_core_rope(True) is True
    scores, grads = _scores_and_grads(model, batch)
    assert_rel_close(scores, ref_scores, "scores", rtol)
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, f"grad {name}", rtol)


def test_core_rope_is_on_by_default_for_the_local_sdpa_spec():
    assert _build().core_rope is True
    assert _build("model.attention_backend=megatron").core_rope is False  # megatron's DotProductAttention


def test_core_rope_matches_megatron_rope_padded():
    _compare(_build(), padded_batch([16, 13, 7, 1, 24]))


@pytest.mark.parametrize("strategy", ["loop", "bucket"])
def test_core_rope_matches_megatron_rope_packed(monkeypatch, strategy):
    import megarank.model.attention as attention
    from megarank.data.packing import pack_padded

    monkeypatch.setattr(attention, "PACKED_ATTENTION", strategy)
    _compare(_build(), pack_padded(padded_batch([16, 13, 7, 1, 24]), PAD_ID, 8))


def test_core_rope_tables_grow_with_longer_sequences():
    model = _build()
    _compare(model, padded_batch([8, 3]))
    _compare(model, padded_batch([700, 5]))  # longer than the first table (512 positions)
    _compare(model, padded_batch([9, 2]))


def test_core_rope_matches_megatron_rope_bf16():
    model = _build("model.dtype=bf16")
    batch = padded_batch([16, 11, 5])
    device = next(model.parameters()).device
    ids, valid = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    model.use_core_rope(False)
    with torch.no_grad():
        ref = model(ids, valid)
    model.use_core_rope(True)
    with torch.no_grad():
        out = model(ids, valid)
    assert torch.equal(out, ref)


def test_rotate_half_matches_megatron_bshd_forward_and_backward():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megarank.model.attention import RotaryTables, RotateHalf

    rotary = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    freqs = rotary.get_emb(37)  # [s, 1, 1, d]: what megatron's attention receives
    x = torch.randn(37, 3, 4, 16, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(37, 3, 4, 16)
    ref = _apply_rotary_pos_emb_bshd(x, freqs)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    cos, sin = RotaryTables(rotary).get(37, "cpu", torch.float32)
    out = RotateHalf.apply(x, cos, sin)
    (grad,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref)
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_formula_forward_and_backward(dtype):
    from types import SimpleNamespace

    from megarank.model.norm import RMSNorm, reference_rms_norm

    torch.manual_seed(0)
    norm = RMSNorm(SimpleNamespace(params_dtype=dtype, sequence_parallel=False), 48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48) * 0.2 + 1)
    x = (torch.randn(7, 3, 48) * 3).to(dtype).requires_grad_()
    g = torch.randn(7, 3, 48).to(dtype)
    out = norm(x)
    grads = torch.autograd.grad(out, (x, norm.weight), g)
    ref = reference_rms_norm(x, norm.weight, 1e-5)
    ref_grads = torch.autograd.grad(ref, (x, norm.weight), g)
    assert out.dtype == ref.dtype
    assert_rel_close(out, ref, "rms_norm", RTOL)
    for got, want, what in zip(grads, ref_grads, ("dx", "dweight")):
        assert_rel_close(got, want, what, RTOL)


def test_swiglu_no_grad_in_place_equals_the_autograd_path():
    import torch.nn.functional as F

    from megarank.model.mlp import SwiGLU

    x = torch.randn(5, 2, 16, requires_grad=True)
    gate, up = x.detach().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    with torch.no_grad():
        no_grad = SwiGLU.apply(x)
    with torch.inference_mode():
        inference = SwiGLU.apply(x.detach())
    with_grad = SwiGLU.apply(x)
    assert torch.equal(no_grad, expected) and torch.equal(inference, expected) and torch.equal(with_grad, expected)
    (grad,) = torch.autograd.grad(with_grad, x, torch.ones_like(with_grad))
    (ref_grad,) = torch.autograd.grad((F.silu(x[..., :8]) * x[..., 8:]).sum(), x)
    assert_rel_close(grad, ref_grad, "swiglu grad", RTOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="megatron's activation recompute needs CUDA (its RNG tracker)")
@pytest.mark.parametrize("recompute", [["model.recompute_granularity=full", "model.recompute_num_layers=1"],
                                       ["model.recompute_granularity=selective"]])
def test_core_rope_under_activation_recompute(recompute):
    """Recompute re-runs the core attention in the backward: the tables are per length, not per call.
    GPU only: megatron's checkpointing forks the CUDA RNG tracker (tensor_parallel/random.py)."""
    model = _build(*recompute).train()
    _compare(model, padded_batch([16, 13, 7, 1, 24]))


@pytest.mark.parametrize("layout", ["padded", "packed_bucket"])
def test_masked_gqa_repeats_kv_as_cuda_needs_and_scores_the_same(monkeypatch, layout):
    """On CUDA, SDPA with a mask and enable_gqa falls back to the math kernel (transformers' use_gqa_in_sdpa), so the
    core attention repeats K/V there. The CUDA rule is forced here on the CPU: same scores and gradients, and every
    masked call really ran without enable_gqa on repeated K/V."""
    import torch.nn.functional as F

    import megarank.model.attention as attention
    from megarank.data.packing import pack_padded

    assert attention.gqa_natively("cpu", masked=True) and attention.gqa_natively("cuda", masked=False)
    assert not attention.gqa_natively("cuda", masked=True)
    monkeypatch.setattr(attention, "PACKED_ATTENTION", "bucket")  # packed buckets pass a mask too
    batch = padded_batch([16, 13, 7, 1, 24])
    if layout == "packed_bucket":
        batch = pack_padded(batch, PAD_ID, 8)
    model = _build()
    heads, groups = model.config.num_attention_heads, model.config.num_query_groups
    assert groups < heads, "the tiny config must use GQA for this test to mean anything"
    ref_scores, ref_grads = _scores_and_grads(model, batch)

    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask is not None, kw.get("enable_gqa", False), k.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention, "gqa_natively", lambda device_type, masked: not masked)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    scores, grads = _scores_and_grads(model, batch)
    masked = [c for c in calls if c[0]]
    assert masked and all(not gqa and kv_heads == heads for _, gqa, kv_heads in masked), calls
    assert_rel_close(scores, ref_scores, "scores", RTOL)
    for name, g in ref_grads.items():
        assert_rel_close(grads[name], g, f"grad {name}", RTOL)


@pytest.mark.parametrize("overrides, forks", [([], 0), (["model.attention_dropout=0.1"], 1)])
def test_attention_dropout_draws_from_megatrons_model_parallel_rng(monkeypatch, overrides, forks):
    """As megatron's DotProductAttention: dropout inside get_cuda_rng_tracker().fork() (TP ranks hold different
    heads) unless sequence parallel; no fork when there is no dropout or in eval."""
    from megatron.core import tensor_parallel

    from megarank.config import load_config
    from megarank.model import build_model

    cfg = load_config(TINY, overrides)
    torch.manual_seed(1234)
    model = build_model(cfg.model, cfg.parallel)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    count, fork = [0], tracker.fork

    def counting_fork(*a, **kw):
        count[0] += 1
        return fork(*a, **kw)

    monkeypatch.setattr(tracker, "fork", counting_fork)
    batch = padded_batch([16, 13, 7])
    model.train()
    _scores_and_grads(model, batch)
    assert count[0] == forks * cfg.model.num_layers, count
    count[0] = 0
    model.eval()
    with torch.no_grad():
        from megarank.model.inputs import model_inputs

        args, kwargs = model_inputs(batch, "cpu")
        model(*args, **kwargs)
    assert count[0] == 0
    # Sequence parallel (needs TP > 1 to build): megatron drops out with the default generator there too.
    import contextlib

    from megarank.model.attention import SDPACoreAttention

    core = next(m for m in model.modules() if isinstance(m, SDPACoreAttention))
    monkeypatch.setattr(core.config, "sequence_parallel", True)
    assert isinstance(core._dropout_rng(0.1), contextlib.nullcontext)
