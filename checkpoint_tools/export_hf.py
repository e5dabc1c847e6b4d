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

from checkpoint_tools import keymap
from checkpoint_tools.atomic import atomic_output_dir, check_destination
from checkpoint_tools.configs import DTYPES, check_agreement, dtype_name, load_requested_config, load_saved_config
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import export_config
from checkpoint_tools.hf_writer import DEFAULT_MAX_SHARD, Planned, write_sharded
from checkpoint_tools.lora_reader import open_weights
from checkpoint_tools.megatron_reader import MegatronWeights, resolve_checkpoint
from checkpoint_tools.progress import Progress
from checkpoint_tools.tokenizer_files import (
    copy_tokenizer,
    ensure_pad_token,
    prepare_reranker_tokenizer,
    tokenizer_files,
)
from megarank.checkpoint.layout import CONFIG_FILE, TOKENIZER_DIR

MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_llama_bidirec.py", "modeling_llama_bidirec.py", "tokenization_megarank.py")
HEAD_KEYS = ("pooling", "temperature", "num_labels")


def check_requested(saved, requested_path, ckpt: Path) -> None:
    """A --config whose model section contradicts the checkpoint's saved config is an error (named key)."""
    requested, explicit = load_requested_config(requested_path)
    where = f"{ckpt}/{CONFIG_FILE}"
    check_agreement(requested.model, saved.model, explicit, str(requested_path), where)
    for key in HEAD_KEYS:
        if key in explicit and getattr(requested.model, key) != getattr(saved.model, key):
            raise ConversionError(
                f"{requested_path} sets model.{key} = {getattr(requested.model, key)} but {where} has "
                f"{getattr(saved.model, key)}; the requested config contradicts the checkpoint"
            )


def export_dims(m, weights: MegatronWeights) -> keymap.Dims:
    """The mappings' sizes for an export: the stored padded vocabulary, and the training temperature folded
    into the exported head (vLLM never divides by ``temperature``: only a folded head scores the same everywhere)."""
    padded = weights.shapes.get(keymap.EMBEDDING.megatron, (m.vocab_size,))[0]
    return keymap.Dims.of(m, padded, folded_temperature=m.temperature)


def produce_tensors(weights: MegatronWeights, dims: keymap.Dims, cast):
    """Yield (HF name, tensor) in HF file order (keymap.hf_entries), reading one layer at a time; the score head's
    temperature is folded in fp32 before any cast."""
    conv = (lambda t: t.to(cast)) if cast is not None else (lambda t: t)

    def global_tensors(mappings):
        for mp in mappings:
            for name, t in mp.to_hf(weights.read_global(mp.megatron), dims).items():
                yield name, conv(t)

    yield from global_tensors(keymap.BEFORE_LAYERS)
    for i in range(dims.layers):
        layer = weights.read_layer(i)
        for mp in keymap.LAYER_MAPPINGS:
            for name, t in mp.to_hf(layer[mp.megatron], dims, i).items():
                yield name, conv(t)
    yield from global_tensors(keymap.AFTER_LAYERS)


def _tokenizer_source(ckpt: Path, cfg, tokenizer):
    for cand in (tokenizer, ckpt / TOKENIZER_DIR, cfg.data.tokenizer):
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
    weights = open_weights(ckpt, m)  # a LoRA checkpoint: its base with the adapters merged (lora_reader.py)
    weights.check_against(m)
    cast = DTYPES[dtype] if dtype else None
    dims = export_dims(m, weights)
    planned = [Planned(name, shape, cast or weights.dtypes[mp.megatron]) for name, shape, mp, _ in keymap.hf_entries(dims)]
    tok_src = _tokenizer_source(ckpt, cfg, tokenizer)

    progress = Progress("megatron-to-hf", len(planned), sum(p.nbytes for p in planned), quiet=quiet)
    notes = []
    with atomic_output_dir(dst) as tmp:
        write_sharded(tmp, planned, produce_tensors(weights, dims, cast), max_shard_size, on_written=lambda p: progress.update(p.name, p.nbytes))
        out_dtype = dtype_name(planned[0].dtype)
        (tmp / "config.json").write_text(json.dumps(export_config(m, out_dtype), indent=2) + "\n")
        if tok_src is not None:
            copy_tokenizer(tok_src, tmp)
            note = ensure_pad_token(tmp)
            if note:
                notes.append(note)
            notes.append(prepare_reranker_tokenizer(tmp, cfg.data.template, cfg.data.max_length,
                                                    cfg.data.max_query_length))
        else:
            notes.append("no tokenizer found (pass --tokenizer DIR); sentence-transformers needs one")
        for f in MODELING_FILES:  # after the tokenizer: this package's version wins over one an import carried
            shutil.copy2(MODELING_DIR / f, tmp / f)
    notes.insert(0, f"from {ckpt}")
    return f"{progress.summary()} -> {dst} ({'; '.join(notes)})"

