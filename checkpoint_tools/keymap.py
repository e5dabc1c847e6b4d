"""The Hugging Face Llama <-> megarank tensor map, stated once: a registry of mappings that convert both ways.

Megatron keys are the global (TP=1/PP=1-shaped) keys of a megarank ``torch_dist`` checkpoint: every per-layer
tensor is stacked on a leading layer axis over all layers (``decoder.layers.*`` has shape ``[L, ...]``), and the
norms carry the Transformer Engine names (the local spec maps its ``input_layernorm`` / ``pre_mlp_layernorm`` to
them). HF names are those of ``LlamaForCausalLM`` / ``LlamaForSequenceClassification`` /
``LlamaBidirectionalForSequenceClassification`` (all keep the backbone under ``model.``).

Each entry of ``MAPPINGS`` is one megatron tensor and the HF tensors it is made of, with both directions:
``to_megatron({hf name: tensor}) -> tensor`` and ``to_hf(tensor) -> {hf name: tensor}``. Only the HF shapes are
written down (as names of ``Dims`` fields); the megatron shapes are derived from them by each mapping. Import
(``import_hf``), export (``export_hf``), the readers' shape checks and ``verify`` all iterate this registry, so a
new tensor is one new entry. Modelled on Megatron-Bridge's ``MegatronParamMapping`` subclasses
(src/megatron/bridge/models/conversion/param_mapping.py: ``DirectMapping`` :890, ``QKVMapping`` :1654,
``GatedMLPMapping`` :2591, at commit 067f987), without their TP distribution: megarank checkpoints store global
tensors. As in torchtitan's state-dict adapters, one table read in both directions replaces a map and its inverse.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from checkpoint_tools.layout import (
    cut_vocab,
    fold_temperature,
    fuse_qkv,
    pad_vocab,
    split_gate_up,
    split_qkv,
    unfold_temperature,
)

HF_LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Dims:
    """The sizes the mappings need, and the temperature the HF score head has folded in (HF head = head / T)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    labels: int
    folded_temperature: float = 1.0

    @classmethod
    def of(cls, m, padded_vocab: int | None = None, folded_temperature: float = 1.0) -> Dims:
        """Dims of a megarank ModelConfig (``padded_vocab`` defaults to the unpadded vocabulary)."""
        return cls(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups,
                   m.head_dim, m.vocab_size, padded_vocab or m.vocab_size, m.num_labels, folded_temperature)

    @property
    def q_rows(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_rows(self) -> int:
        return self.groups * self.head_dim

    def resolve(self, spec: tuple) -> tuple:
        """A shape written as Dims field names, e.g. ``("q_rows", "hidden")`` -> ``(256, 64)``."""
        return tuple(getattr(self, name) for name in spec)


# ------------------------------------------------------------------------------------------------ mappings


@dataclass(frozen=True, eq=False)
class Mapping:
    """One megatron tensor and the HF tensors it is made of (``hf``: name -> shape as Dims field names).

    Per-layer mappings name HF tensors by their suffix after ``model.layers.{i}.``; their megatron tensor is one
    ``[i]`` slice of the stacked ``[L, ...]`` global tensor. ``blocks`` is the number of row blocks megatron stores
    the tensor as (one chunk each); ``to_megatron_block`` computes one of them from only the HF tensors it needs.
    """

    megatron: str
    hf: dict
    per_layer: bool = True
    blocks = 1

    def names(self, layer: int | None = None) -> list:
        """The full HF names (of layer ``layer`` for a per-layer mapping), in HF file order."""
        prefix = HF_LAYER.format(i=layer) if self.per_layer else ""
        return [prefix + name for name in self.hf]

    def hf_shapes(self, dims: Dims, layer: int | None = None) -> dict:
        return {full: dims.resolve(spec) for full, spec in zip(self.names(layer), self.hf.values())}

    def megatron_shape(self, dims: Dims) -> tuple:
        """The global shape; per-layer mappings have the layer axis first."""
        shape = self._megatron_shape(dims)
        return (dims.layers, *shape) if self.per_layer else shape

    def _megatron_shape(self, dims: Dims) -> tuple:
        (spec,) = self.hf.values()
        return dims.resolve(spec)

    def to_megatron(self, hf, dims: Dims, layer: int | None = None) -> torch.Tensor:
        """``hf`` maps full HF names to tensors (anything with ``[name]``); returns one layer's / the tensor."""
        blocks = [self.to_megatron_block(hf, dims, b, layer) for b in range(self.blocks)]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def to_megatron_block(self, hf, dims: Dims, block: int, layer: int | None = None) -> torch.Tensor:
        (name,) = self.names(layer)
        return hf[name]

    def to_hf(self, tensor: torch.Tensor, dims: Dims, layer: int | None = None) -> dict:
        """Full HF name -> tensor, in HF file order."""
        (name,) = self.names(layer)
        return {name: tensor}


class DirectMapping(Mapping):
    """One HF tensor, the same shape (Megatron-Bridge ``DirectMapping``)."""


class _StackedRows(Mapping):
    """A megatron tensor whose rows are its HF tensors' rows (however ordered): the row counts add up."""

    def _megatron_shape(self, dims: Dims) -> tuple:
        shapes = [dims.resolve(spec) for spec in self.hf.values()]
        return (sum(s[0] for s in shapes), *shapes[0][1:])


class QKVMapping(_StackedRows):
    """q_proj, k_proj, v_proj -> linear_qkv in megatron's grouped GQA order (``layout.fuse_qkv``): for each of g
    groups, its n/g query heads, then one K head, then one V head (Megatron-Bridge ``QKVMapping``, whose
    ``merge_qkv_weights`` builds the same order, param_mapping.py:3143)."""

    def to_megatron_block(self, hf, dims: Dims, block: int, layer: int | None = None) -> torch.Tensor:
        q, k, v = (hf[n] for n in self.names(layer))
        return fuse_qkv(q, k, v, dims.heads, dims.groups, dims.head_dim)

    def to_hf(self, tensor: torch.Tensor, dims: Dims, layer: int | None = None) -> dict:
        return dict(zip(self.names(layer), split_qkv(tensor, dims.heads, dims.groups, dims.head_dim)))


class GatedMLPMapping(_StackedRows):
    """gate_proj, up_proj -> linear_fc1 = [gate; up], stored as two row blocks (gate, then up) as megatron's
    SwiGLU sharded factory saves it (megatron-core 0.16.1 transformer/mlp.py:276; Megatron-Bridge
    ``GatedMLPMapping``)."""

    blocks = 2

    def to_megatron_block(self, hf, dims: Dims, block: int, layer: int | None = None) -> torch.Tensor:
        return hf[self.names(layer)[block]]

    def to_hf(self, tensor: torch.Tensor, dims: Dims, layer: int | None = None) -> dict:
        return dict(zip(self.names(layer), split_gate_up(tensor)))


class EmbeddingMapping(Mapping):
    """embed_tokens [vocab, h] -> [padded_vocab, h]: zero rows appended on import, cut off on export."""

    def _megatron_shape(self, dims: Dims) -> tuple:
        (spec,) = self.hf.values()
        return (dims.padded_vocab, *dims.resolve(spec)[1:])

    def to_megatron_block(self, hf, dims: Dims, block: int, layer: int | None = None) -> torch.Tensor:
        return pad_vocab(super().to_megatron_block(hf, dims, block, layer), dims.padded_vocab)

    def to_hf(self, tensor: torch.Tensor, dims: Dims, layer: int | None = None) -> dict:
        return super().to_hf(cut_vocab(tensor, dims.vocab), dims, layer)


class ScoreMapping(Mapping):
    """The reranker head. An HF head may have a temperature T folded in (a megarank export: HF head = head / T,
    computed in fp32); a base LM has none (import then makes a new one)."""

    def to_megatron_block(self, hf, dims: Dims, block: int, layer: int | None = None) -> torch.Tensor:
        return unfold_temperature(super().to_megatron_block(hf, dims, block, layer), dims.folded_temperature)

    def to_hf(self, tensor: torch.Tensor, dims: Dims, layer: int | None = None) -> dict:
        return super().to_hf(fold_temperature(tensor, dims.folded_temperature), dims, layer)


# ------------------------------------------------------------------------------------------------ the registry

LAYER_MAPPINGS = (
    DirectMapping("decoder.layers.self_attention.linear_qkv.layer_norm_weight", {"input_layernorm.weight": ("hidden",)}),
    QKVMapping("decoder.layers.self_attention.linear_qkv.weight", {
        "self_attn.q_proj.weight": ("q_rows", "hidden"),
        "self_attn.k_proj.weight": ("kv_rows", "hidden"),
        "self_attn.v_proj.weight": ("kv_rows", "hidden"),
    }),
    DirectMapping("decoder.layers.self_attention.linear_proj.weight", {"self_attn.o_proj.weight": ("hidden", "q_rows")}),
    DirectMapping("decoder.layers.mlp.linear_fc1.layer_norm_weight", {"post_attention_layernorm.weight": ("hidden",)}),
    GatedMLPMapping("decoder.layers.mlp.linear_fc1.weight", {
        "mlp.gate_proj.weight": ("ffn", "hidden"),
        "mlp.up_proj.weight": ("ffn", "hidden"),
    }),
    DirectMapping("decoder.layers.mlp.linear_fc2.weight", {"mlp.down_proj.weight": ("hidden", "ffn")}),
)
EMBEDDING = EmbeddingMapping("embedding.word_embeddings.weight", {"model.embed_tokens.weight": ("vocab", "hidden")}, per_layer=False)
FINAL_NORM = DirectMapping("decoder.final_layernorm.weight", {"model.norm.weight": ("hidden",)}, per_layer=False)
SCORE = ScoreMapping("score.weight", {"score.weight": ("labels", "hidden")}, per_layer=False)

# HF file order: the global tensors before the layers, then the layers, then these
BEFORE_LAYERS = (EMBEDDING,)
AFTER_LAYERS = (FINAL_NORM, SCORE)
GLOBAL_MAPPINGS = BEFORE_LAYERS + AFTER_LAYERS
# megatron key order (the order of megatron_shapes and of the reader's checks)
MAPPINGS = LAYER_MAPPINGS + (EMBEDDING, FINAL_NORM, SCORE)

# HF tensors a reranker does not use: the LM head (tied or not) and rotary caches some old exports saved.
IGNORED_HF = (re.compile(r"^lm_head\.weight$"), re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"))


def is_ignored_hf(name: str) -> bool:
    return any(p.match(name) for p in IGNORED_HF)


def megatron_keys() -> list:
    return [mp.megatron for mp in MAPPINGS]


def hf_entries(dims: Dims, with_score: bool = True) -> list:
    """[(HF name, shape, mapping, layer)] of every HF tensor, in the order HF checkpoints (and exports) list them."""
    def rows(mappings, layer=None):
        return [(name, shape, mp, layer) for mp in mappings if with_score or mp is not SCORE
                for name, shape in mp.hf_shapes(dims, layer).items()]

    out = rows(BEFORE_LAYERS)
    for i in range(dims.layers):
        out += rows(LAYER_MAPPINGS, i)
    return out + rows(AFTER_LAYERS)


def hf_shapes(m, with_score: bool = True) -> dict:
    """HF name -> shape for a megarank ModelConfig, in the order HF checkpoints list them."""
    return {name: shape for name, shape, _, _ in hf_entries(Dims.of(m), with_score)}


def megatron_shapes(m, padded_vocab: int) -> dict:
    """Megatron key -> global shape (layers stacked on dim 0)."""
    dims = Dims.of(m, padded_vocab)
    return {mp.megatron: mp.megatron_shape(dims) for mp in MAPPINGS}
