"""The tensor name map between Hugging Face Llama and a megarank checkpoint, as data.

Megatron keys are the global (TP=1/PP=1-shaped) keys of a megarank ``torch_dist`` checkpoint: every per-layer
tensor is stacked on a leading layer axis over all layers (``decoder.layers.*`` has shape ``[L, ...]``), and the
norms carry the Transformer Engine names (the local spec maps its ``input_layernorm`` / ``pre_mlp_layernorm`` to
them). HF names are those of ``LlamaForCausalLM`` / ``LlamaForSequenceClassification`` /
``LlamaBidirectionalForSequenceClassification`` (all keep the backbone under ``model.``).

``combine`` says how HF tensors become one megatron tensor (implemented in ``layout``):
    copy     one tensor, same shape
    qkv      q_proj, k_proj, v_proj -> linear_qkv, grouped per KV head (megatron's GQA order)
    gate_up  gate_proj, up_proj -> linear_fc1 = [gate; up]
    vocab    embed_tokens, zero rows appended up to the padded vocabulary (cut back on export)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HF_LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Entry:
    megatron: str
    hf: tuple  # HF names; per-layer entries are suffixes of HF_LAYER
    combine: str = "copy"


LAYER_ENTRIES = (
    Entry("decoder.layers.self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    Entry(
        "decoder.layers.self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    Entry("decoder.layers.self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    Entry("decoder.layers.mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    Entry("decoder.layers.mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    Entry("decoder.layers.mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)

EMBEDDING = Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")
FINAL_NORM = Entry("decoder.final_layernorm.weight", ("model.norm.weight",))
SCORE = Entry("score.weight", ("score.weight",))
GLOBAL_ENTRIES = (EMBEDDING, FINAL_NORM, SCORE)

# HF tensors a reranker does not use: the LM head (tied or not) and rotary caches some old exports saved.
IGNORED_HF = (re.compile(r"^lm_head\.weight$"), re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"))


def is_ignored_hf(name: str) -> bool:
    return any(p.match(name) for p in IGNORED_HF)


def hf_layer_names(entry: Entry, i: int) -> list:
    return [HF_LAYER.format(i=i) + suffix for suffix in entry.hf]


def megatron_keys() -> list:
    return [e.megatron for e in LAYER_ENTRIES] + [e.megatron for e in GLOBAL_ENTRIES]


# ------------------------------------------------------------------------------------------------ shapes


def head_dim(m) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def hf_shapes(m, with_score: bool = True) -> dict:
    """HF name -> shape for a megarank ModelConfig, in the order HF checkpoints list them."""
    h, f, d, n, g = m.hidden_size, m.ffn_hidden_size, head_dim(m), m.num_attention_heads, m.num_query_groups
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (n * d, h),
        "self_attn.k_proj.weight": (g * d, h),
        "self_attn.v_proj.weight": (g * d, h),
        "self_attn.o_proj.weight": (h, n * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        shapes.update({HF_LAYER.format(i=i) + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if with_score:
        shapes["score.weight"] = (m.num_labels, h)
    return shapes


def megatron_shapes(m, padded_vocab: int) -> dict:
    """Megatron key -> global shape (layers stacked on dim 0)."""
    h, f, d, n, g, L = m.hidden_size, m.ffn_hidden_size, head_dim(m), m.num_attention_heads, m.num_query_groups, m.num_layers
    return {
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, h),
        "decoder.layers.self_attention.linear_qkv.weight": (L, (n + 2 * g) * d, h),
        "decoder.layers.self_attention.linear_proj.weight": (L, h, n * d),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, h),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * f, h),
        "decoder.layers.mlp.linear_fc2.weight": (L, h, f),
        "embedding.word_embeddings.weight": (padded_vocab, h),
        "decoder.final_layernorm.weight": (h,),
        "score.weight": (m.num_labels, h),
    }
