"""The Transformer Engine layer spec on CPU: megarank's wiring of megatron-core's TE spec, run end to end.

megatron-core 0.16.1 picks the modules of ``get_gpt_layer_with_transformer_engine_spec`` through one backend
object, ``TESpecProvider()`` (gpt_layer_specs.py:222), imported only when TE imports (``HAVE_TE``,
gpt_layer_specs.py:41-49). The tests below substitute a provider built from megatron-core's local modules
with the TE modules' contracts -- the pre-attention / pre-MLP RMSNorm fused in front of ``linear_qkv`` /
``linear_fc1`` with the weight in ``layer_norm_weight``, the norm type read from ``config.normalization`` --
so that megarank's ``te_layer_spec()``, its bidirectional mask override and ``block_spec(impl=
"transformer_engine")`` build a real model and run forward/backward on CPU. What TE's kernels compute is
checked on a GPU (benchmarks/gpu_check.sh); here it is everything megarank decides.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megarank.config import load_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PAD_ID = 258


pytestmark = pytest.mark.usefixtures("one_rank")  # tests/conftest.py


# ----------------------------------------------------------------------------------------------- a CPU "TE"


def _rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _fake_te_classes():
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megarank.model.norm import RMSNorm

    class FakeTELayerNormColumnParallelLinear(ColumnParallelLinear):
        """TELayerNormColumnParallelLinear's contract: norm (type from config.normalization, as TE's
        LayerNormLinear gets ``normalization=config.normalization``) + column-parallel linear; the norm
        weight is ``layer_norm_weight`` (the checkpoint key the local spec maps its norms to)."""

        def __init__(self, input_size, output_size, *, config, **kwargs):
            assert config.normalization == "RMSNorm", config.normalization
            super().__init__(input_size, output_size, config=config, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
            setattr(self.layer_norm_weight, "sequence_parallel", bool(config.sequence_parallel))
            self.eps = config.layernorm_epsilon

        def forward(self, x, *args, **kwargs):
            return super().forward(_rms_norm(x, self.layer_norm_weight, self.eps), *args, **kwargs)

    class FakeTENorm:
        """TENorm's contract: ``TENorm(config, hidden_size, eps)`` -> RMSNorm when config.normalization says so."""

        def __new__(cls, config, hidden_size, eps=1e-5):
            assert config.normalization == "RMSNorm", config.normalization
            return RMSNorm(config, hidden_size, eps=eps)

    class FakeTESpecProvider(LocalSpecProvider):
        def fuse_layernorm_and_linear(self) -> bool:
            return True

        def column_parallel_layer_norm_linear(self):
            return FakeTELayerNormColumnParallelLinear

        def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
            return FakeTENorm

        def core_attention(self):
            return DotProductAttention

    return FakeTESpecProvider, FakeTELayerNormColumnParallelLinear


@pytest.fixture
def fake_te(monkeypatch):
    """megatron-core's gpt_layer_specs as it is with TE installed, its TE provider replaced by the CPU one."""
    from megatron.core.models.gpt import gpt_layer_specs

    provider, fused_linear = _fake_te_classes()
    monkeypatch.setattr(gpt_layer_specs, "HAVE_TE", True)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", provider, raising=False)
    return fused_linear


def _build(cfg, impl: str, seed: int = 0):
    """The tiny reranker with the given spec, built the way build_model does (CPU TransformerConfig)."""
    from megarank.config import padded_vocab_size
    from megarank.model.reranker import LlamaReranker
    from megarank.model.spec import block_spec
    from megarank.model.transformer_config import make_transformer_config

    m = cfg.model
    config = make_transformer_config(m, cfg.parallel, impl, cuda=False)
    torch.manual_seed(seed)
    return LlamaReranker(
        config, block_spec(config, impl, "megatron"),
        padded_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1),
        rope_theta=m.rope_theta, rope_scaling=m.rope_scaling, pooling=m.pooling,
    )


def _local_to_te_keys(state: dict) -> dict:
    """The local spec's parameter names -> the TE spec's (the same checkpoint keys, see spec.py)."""
    out = {}
    for k, v in state.items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        k = k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        out[k] = v
    return out


def _batch(seq=16, lengths=(16, 11, 5, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(lengths), seq), generator=g)
    valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    ids[~valid] = PAD_ID
    return ids, valid


def _first_token_states(model, ids, valid):
    captured = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            scores = model(ids, valid)
    finally:
        hook.remove()
    return scores, captured[0].transpose(0, 1)


# ----------------------------------------------------------------------------------------------- tests


def test_te_spec_without_transformer_engine_is_one_line_install_error():
    """On main this was a TypeError (the `normalization` keyword) before TE was even looked for."""
    from megatron.core.models.gpt import gpt_layer_specs

    from megarank.model.spec import block_spec, te_layer_spec
    from megarank.model.transformer_config import make_transformer_config

    if gpt_layer_specs.HAVE_TE:
        pytest.skip("Transformer Engine is installed here")
    cfg = load_config(TINY)
    config = make_transformer_config(cfg.model, cfg.parallel, "transformer_engine", cuda=False)
    for call in (te_layer_spec, lambda: block_spec(config, "transformer_engine")):
        with pytest.raises(RuntimeError) as info:
            call()
        message = str(info.value)
        assert "install transformer-engine" in message and "model.transformer_impl" in message
        assert "\n" not in message


def test_te_layer_spec_uses_megatrons_signature_and_is_bidirectional(fake_te):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp

    from megarank.model.spec import te_layer_spec

    spec = te_layer_spec()
    sub = spec.submodules
    assert sub.self_attention.params["attn_mask_type"] == AttnMaskType.padding
    # the norms live inside the fused linears: nothing separate in front of attention / MLP
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
    assert sub.self_attention.submodules.linear_qkv is fake_te
    assert sub.mlp.submodules.linear_fc1 is fake_te
    # no TE activation module: the MLP applies config.activation_func to [gate; up] (use_te_activation_func=False)
    assert sub.mlp.submodules.activation_func is None
    # megatron's own spec object is left causal (the override works on a copy)
    from megatron.core.models.gpt import gpt_layer_specs

    assert gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec().submodules.self_attention.params[
        "attn_mask_type"] == AttnMaskType.causal


def test_te_block_runs_on_cpu_bidirectionally_and_matches_the_local_spec(fake_te):
    """block_spec(impl="transformer_engine") builds and runs; loaded with the local model's weights (renamed as
    the checkpoint maps them) it gives the local model's scores; attention is bidirectional; padding is inert."""
    cfg = load_config(TINY)
    local = _build(cfg, "local").eval()
    te = _build(cfg, "transformer_engine", seed=1).eval()
    assert te.config.use_te_activation_func is False and local.config.use_te_activation_func is True
    assert type(te.decoder.layers[0].self_attention.linear_qkv) is fake_te
    te.load_state_dict(_local_to_te_keys(local.state_dict()), strict=True)
    # the same checkpoint keys in both specs (so a checkpoint loads into either)
    def checkpoint_keys(model):
        return {v.key for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}

    assert checkpoint_keys(te) == checkpoint_keys(local)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in checkpoint_keys(local)  # layers stacked

    ids, valid = _batch()
    s_local, h_local = _first_token_states(local, ids, valid)
    s_te, h_te = _first_token_states(te, ids, valid)
    torch.testing.assert_close(s_te, s_local, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_te[valid], h_local[valid], rtol=1e-5, atol=1e-5)

    late = ids.clone()
    late[0, 15] = (late[0, 15] + 1) % 256  # the last real token of sequence 0
    _, h_late = _first_token_states(te, late, valid)
    assert not torch.allclose(h_late[0, 0], h_te[0, 0])  # the first token sees the last one
    padded = ids.clone()
    padded[~valid] = 7  # other pad ids
    s_pad, _ = _first_token_states(te, padded, valid)
    torch.testing.assert_close(s_pad, s_te, rtol=0, atol=0)

    te.train()
    te(ids, valid).sum().backward()
    for name, p in te.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_fused_swiglu_path_of_the_te_spec_matches_the_plain_one(fake_te, monkeypatch):
    """bias_swiglu_fusion: megatron's fused SwiGLU (bias_swiglu_impl, a torch.compile'd function; run eagerly
    here) in the TE spec's MLP gives the plain gated path's result, forward and backward."""
    import torch._dynamo
    from megatron.core.transformer import mlp as mlp_module

    calls = []
    fused_impl = mlp_module.bias_swiglu_impl
    monkeypatch.setattr(mlp_module, "bias_swiglu_impl", lambda *a, **k: calls.append(1) or fused_impl(*a, **k))

    cfg = load_config(TINY)
    te = _build(cfg, "transformer_engine").train()
    ids, valid = _batch()
    ref = te(ids, valid)
    (g_ref,) = torch.autograd.grad(ref.sum(), [te.decoder.layers[0].mlp.linear_fc1.weight])
    te.config.bias_activation_fusion = True  # what make_transformer_config sets with TE on CUDA
    with torch._dynamo.config.patch(disable=True):
        fused = te(ids, valid)
        (g_fused,) = torch.autograd.grad(fused.sum(), [te.decoder.layers[0].mlp.linear_fc1.weight])
    assert len(calls) == cfg.model.num_layers  # the fused function ran in every layer's MLP
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)


def test_fused_rope_path_calls_te_kernel_with_megatrons_layout(fake_te, monkeypatch):
    """apply_rope_fusion: megatron routes q and k to TE's fused_apply_rotary_pos_emb (rope_utils.py:286-287);
    with a reference implementation in its place the scores equal the unfused ones, with Llama-3 scaling."""
    from megatron.core.models.common.embeddings import rope_utils

    calls = []

    def reference_kernel(t, freqs, interleaved=False, **kwargs):
        calls.append((tuple(t.shape), tuple(freqs.shape), interleaved))
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", reference_kernel)
    cfg = load_config(TINY)
    te = _build(cfg, "transformer_engine").eval()
    ids, valid = _batch()
    with torch.no_grad():
        ref = te(ids, valid)
        te.config.apply_rope_fusion = True
        fused = te(ids, valid)
    assert calls and all(not c[2] for c in calls)  # rotate-half (Llama), never interleaved
    assert len(calls) == 2 * cfg.model.num_layers  # q and k of every layer
    torch.testing.assert_close(fused, ref, rtol=0, atol=0)
