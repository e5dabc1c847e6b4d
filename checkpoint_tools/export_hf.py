"""megatron-to-hf: a megarank checkpoint (converted or trained, any TP/PP) -> an HF reranker folder.

The folder is NVIDIA's released-reranker format: config.json (``LlamaBidirectionalForSequenceClassification``,
``model_type: llama_bidirec``, pooling, temperature, num_labels, auto_map, ``is_causal: false``), the
modeling/configuration files from ``hf_modeling/`` beside the weights, sharded safetensors + index (keys ``model.*``
and ``score.weight``, no ``lm_head``), and the tokenizer files made readable by transformers 4.x and 5.x, with the
trained input format as a chat template and a vLLM score template (``tokenizer_files.prepare_reranker_tokenizer``).

The training temperature T is folded into the head (``score.weight / T``, config ``temperature: 1.0``,
``megarank_folded_temperature: T``): vLLM never divides by ``temperature``, so only a folded head scores the same
everywhere. ``hf-to-megatron`` multiplies it back.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoint_tools import keymap
from checkpoint_tools.atomic import atomic_output_dir, check_destination
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import export_config, fold_temperature
from checkpoint_tools.hf_writer import DEFAULT_MAX_SHARD, Planned, write_sharded
from checkpoint_tools.import_hf import DTYPES, _load_base_config, check_agreement
from checkpoint_tools.layout import split_gate_up, split_qkv
from checkpoint_tools.megatron_reader import MegatronWeights, resolve_checkpoint
from checkpoint_tools.progress import Progress
from checkpoint_tools.tokenizer_files import (
    copy_tokenizer,
    ensure_pad_token,
    prepare_reranker_tokenizer,
    tokenizer_files,
)

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_llama_bidirec.py", "modeling_llama_bidirec.py", "tokenization_megarank.py")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HEAD_KEYS = ("pooling", "temperature", "num_labels")


def load_saved_config(ckpt: Path):
    from megarank.checkpoint import load_checkpoint_config
    from megarank.config import ConfigError

    try:
        return load_checkpoint_config(ckpt)
    except ConfigError as e:
        raise ConversionError(f"{ckpt}/config.yaml is not a valid megarank config: {e}") from None


def check_requested(saved, requested_path, ckpt: Path) -> None:
    """A --config whose model section contradicts the checkpoint's saved config is an error (named key)."""
    requested, explicit = _load_base_config(requested_path)
    where = f"{ckpt}/config.yaml"
    check_agreement(requested.model, saved.model, explicit, str(requested_path), where)
    for key in HEAD_KEYS:
        if key in explicit and getattr(requested.model, key) != getattr(saved.model, key):
            raise ConversionError(
                f"{requested_path} sets model.{key} = {getattr(requested.model, key)} but {where} has "
                f"{getattr(saved.model, key)}; the requested config contradicts the checkpoint"
            )


# HF order of one layer's tensors in the exported files
LAYER_ORDER = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def export_order(m) -> list:
    names = ["model.embed_tokens.weight"]
    for i in range(m.num_layers):
        names += [keymap.HF_LAYER.format(i=i) + s for s in LAYER_ORDER]
    return names + ["model.norm.weight", "score.weight"]


def layer_tensors(m, layer: dict, i: int) -> list:
    """megatron tensors of layer i -> [(HF name, tensor)] in LAYER_ORDER."""
    q, k, v = split_qkv(layer["decoder.layers.self_attention.linear_qkv.weight"], m.num_attention_heads, m.num_query_groups, keymap.head_dim(m))
    gate, up = split_gate_up(layer["decoder.layers.mlp.linear_fc1.weight"])
    by_suffix = {
        "input_layernorm.weight": layer["decoder.layers.self_attention.linear_qkv.layer_norm_weight"],
        "self_attn.q_proj.weight": q,
        "self_attn.k_proj.weight": k,
        "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": layer["decoder.layers.self_attention.linear_proj.weight"],
        "post_attention_layernorm.weight": layer["decoder.layers.mlp.linear_fc1.layer_norm_weight"],
        "mlp.gate_proj.weight": gate,
        "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": layer["decoder.layers.mlp.linear_fc2.weight"],
    }
    return [(keymap.HF_LAYER.format(i=i) + s, by_suffix[s]) for s in LAYER_ORDER]


def hf_source_key(name: str) -> str:
    """The megatron key an HF tensor comes from (for its dtype)."""
    if name.startswith("model.layers."):
        suffix = name.split(".", 3)[3]
        return next(e.megatron for e in keymap.LAYER_ENTRIES if suffix in e.hf)
    return next(e.megatron for e in keymap.GLOBAL_ENTRIES if name in e.hf)


def produce_tensors(weights: MegatronWeights, m, cast):
    """Yield (HF name, tensor) in export order, reading one layer at a time."""
    conv = (lambda t: t.to(cast)) if cast is not None else (lambda t: t)
    emb = weights.read_global(keymap.EMBEDDING.megatron)
    yield "model.embed_tokens.weight", conv(emb[: m.vocab_size])  # cut the vocabulary padding
    del emb
    for i in range(m.num_layers):
        for name, t in layer_tensors(m, weights.read_layer(i), i):
            yield name, conv(t)
    yield "model.norm.weight", conv(weights.read_global(keymap.FINAL_NORM.megatron))
    # the temperature is folded into the head (in fp32, before any cast): every consumer then scores h.w/T
    yield "score.weight", conv(fold_temperature(weights.read_global(keymap.SCORE.megatron), m.temperature))


def _tokenizer_source(ckpt: Path, cfg, tokenizer):
    for cand in (tokenizer, ckpt / "tokenizer", cfg.data.tokenizer):
        if cand and tokenizer_files(cand):
            return Path(cand)
    if tokenizer:
        raise ConversionError(f"--tokenizer {tokenizer} holds no tokenizer files")
    return None


def megatron_to_hf(src, dst, *, config=None, tokenizer=None, dtype=None, max_shard_size: int = DEFAULT_MAX_SHARD,
                   overwrite: bool = False, quiet: bool = False) -> str:
    """Convert; returns the summary line."""
    ckpt = resolve_checkpoint(src)
    cfg = load_saved_config(ckpt)
    if config is not None:
        check_requested(cfg, config, ckpt)
    dst = check_destination(ckpt, dst, overwrite)
    m = cfg.model
    weights = MegatronWeights(ckpt)
    weights.check_against(m)
    cast = DTYPES[dtype] if dtype else None
    shapes = keymap.hf_shapes(m)
    planned = [Planned(n, tuple(shapes[n]), cast or weights.dtypes[hf_source_key(n)]) for n in export_order(m)]
    tok_src = _tokenizer_source(ckpt, cfg, tokenizer)

    progress = Progress("megatron-to-hf", len(planned), sum(p.nbytes for p in planned), quiet=quiet)
    notes = []
    with atomic_output_dir(dst) as tmp:
        write_sharded(tmp, planned, produce_tensors(weights, m, cast), max_shard_size, on_written=lambda p: progress.update(p.name, p.nbytes))
        out_dtype = DTYPE_NAMES[planned[0].dtype]
        (tmp / "config.json").write_text(json.dumps(export_config(m, out_dtype), indent=2) + "\n")
        if tok_src is not None:
            copy_tokenizer(tok_src, tmp)
            note = ensure_pad_token(tmp)
            if note:
                notes.append(note)
            notes.append(prepare_reranker_tokenizer(tmp, cfg.data.template, cfg.data.max_length))
        else:
            notes.append("no tokenizer found (pass --tokenizer DIR); sentence-transformers needs one")
        for f in MODELING_FILES:  # after the tokenizer: this package's version wins over one an import carried
            shutil.copy2(MODELING_DIR / f, tmp / f)
    notes.insert(0, f"from {ckpt}")
    return f"{progress.summary()} -> {dst} ({'; '.join(notes)})"

