"""Layer specs: which implementation each part of a transformer layer uses.

Both specs are megatron-core's GPT specs with one change: the self-attention mask type is ``padding``
(bidirectional, as megatron-core's BERT does), so attention sees every valid token in both directions.

* ``transformer_engine``: TE layers (fused norm+linear, FP8-capable); needs Transformer Engine and CUDA.
* ``local``: megatron-core's own layers, our sequence-parallel-capable RMSNorm, our single-function SwiGLU,
  and either SDPA or megatron's DotProductAttention as core attention. Runs on CPU.

Checkpoint keys are identical: the local spec maps ``input_layernorm`` / ``pre_mlp_layernorm`` to the TE keys
``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``.
"""
import copy

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megarank.config import transformer_engine_available
from megarank.model.attention import SDPACoreAttention
from megarank.model.mlp import SwiGLUActivation
from megarank.model.norm import RMSNorm


def resolve_impl(transformer_impl: str) -> str:
    """``auto`` -> ``transformer_engine`` when TE and CUDA are present, else ``local``."""
    if transformer_impl == "auto":
        return "transformer_engine" if transformer_engine_available() else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise RuntimeError(
            "model.transformer_impl=transformer_engine needs Transformer Engine and CUDA: "
            "pip install 'megarank[gpu]' (or run in an NGC PyTorch container), or set model.transformer_impl=local"
        )
    return transformer_impl


def _bidirectional(layer_spec: ModuleSpec) -> ModuleSpec:
    spec = copy.deepcopy(layer_spec)
    spec.submodules.self_attention.params = {**spec.submodules.self_attention.params, "attn_mask_type": AttnMaskType.padding}
    return spec


def local_layer_spec(attention_backend: str = "sdpa") -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = _bidirectional(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    attn = spec.submodules.self_attention.submodules
    attn.core_attention = SDPACoreAttention if attention_backend == "sdpa" else DotProductAttention
    # SwiGLU as one autograd function (needs use_te_activation_func=True, set for the local impl in
    # transformer_config.py; see mlp.py for why).
    spec.submodules.mlp.submodules.activation_func = SwiGLUActivation
    return spec


TE_MISSING = (
    "model.transformer_impl=transformer_engine needs Transformer Engine: install transformer-engine "
    "(pip install 'megarank[gpu]', or run in an NGC PyTorch container), or set model.transformer_impl=local"
)


def _te_backend():
    """megatron-core's Transformer Engine spec provider, or the one-line install error.

    ``gpt_layer_specs`` imports TE and ``TESpecProvider`` in one try block and records the outcome in its
    ``HAVE_TE`` flag (megatron-core 0.16.1 gpt_layer_specs.py:41-49); without TE the name ``TESpecProvider``
    does not exist there and ``get_gpt_layer_with_transformer_engine_spec`` would raise ``NameError``. Reading
    both from that module (not importing TE here) keeps TE lazy and gives tests one seam to substitute.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if not getattr(gpt_layer_specs, "HAVE_TE", False) or not hasattr(gpt_layer_specs, "TESpecProvider"):
        raise RuntimeError(TE_MISSING)
    return gpt_layer_specs


def te_layer_spec() -> ModuleSpec:
    """megatron-core's TE layer spec with bidirectional (padding-mask) self-attention.

    megatron-core 0.16.1 ``get_gpt_layer_with_transformer_engine_spec`` (gpt_layer_specs.py:171) takes
    ``num_experts, moe_grouped_gemm, qk_layernorm, multi_latent_attention, fp8, moe_use_legacy_grouped_gemm,
    qk_l2_norm, use_te_op_fuser, use_kitchen, use_te_activation_func, use_kitchen_attention,
    kitchen_attention_backend`` -- no ``normalization``. RMSNorm is chosen from the TransformerConfig instead:
    ``TELayerNormColumnParallelLinear`` passes ``normalization=config.normalization`` to TE's LayerNormLinear
    (extensions/transformer_engine.py:773-774) and ``TENorm`` builds ``te.pytorch.RMSNorm`` when
    ``config.normalization == "RMSNorm"`` (extensions/transformer_engine.py:453), which
    ``make_transformer_config`` always sets. The defaults give the dense Llama layer: the pre-attention and
    pre-MLP norms fused into ``linear_qkv`` / ``linear_fc1`` and ``use_te_activation_func=False`` (the MLP
    applies ``config.activation_func`` with the gated unit, or megatron's fused SwiGLU).
    """
    return _bidirectional(_te_backend().get_gpt_layer_with_transformer_engine_spec())


def te_final_norm():
    """The final norm of the TE block: the TE provider's norm (``TENorm``, RMSNorm from config.normalization)."""
    return _te_backend().TESpecProvider().layer_norm(rms_norm=True, for_qk=False)


def block_spec(config, impl: str, attention_backend: str = "sdpa", pp_rank=None) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its share of layers plus the final norm."""
    if impl == "transformer_engine":
        layer, final_norm = te_layer_spec(), te_final_norm()
    else:
        layer, final_norm = local_layer_spec(attention_backend), RMSNorm
    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)
