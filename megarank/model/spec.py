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


def te_layer_spec() -> ModuleSpec:
    try:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return _bidirectional(get_gpt_layer_with_transformer_engine_spec(normalization="RMSNorm"))
    except ImportError as e:  # pragma: no cover - GPU only
        raise RuntimeError(f"the Transformer Engine spec needs transformer-engine: pip install 'megarank[gpu]' ({e})") from e


def block_spec(config, impl: str, attention_backend: str = "sdpa", pp_rank=None) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: its share of layers plus the final norm."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        layer, final_norm = te_layer_spec(), TENorm
    else:
        layer, final_norm = local_layer_spec(attention_backend), RMSNorm
    n = get_num_layers_to_build(config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)
