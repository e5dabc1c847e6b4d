"""hf-to-megatron: a Hugging Face Llama folder -> a megarank checkpoint folder (config.yaml, tokenizer/, model/).

Vocabulary padding: the embedding is stored with ``padded_vocab_size(vocab_size, make_vocab_size_divisible_by,
--tp)`` rows (megarank's rule: a multiple of lcm(divisible_by, tp), so the same size for every TP that divides
divisible_by), zero rows appended; config.yaml keeps the HF ``vocab_size``. A model at any TP loads it even when
its own padded size differs: megatron-core's ``VocabParallelEmbedding`` marks its sharded tensor
``allow_shape_mismatch``, so the overlapping rows are read and the rest zero-filled (tested with vocab 301,
divisible_by 1: 301 stored rows loaded by a TP=2 model of 302). Export cuts back to ``vocab_size``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import yaml

from checkpoint_tools import keymap
from checkpoint_tools.atomic import atomic_output_dir, check_destination
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import (
    ARCHITECTURE_KEYS,
    check_bidirectional,
    defaulted_keys,
    detect_format,
    folded_temperature,
    hf_architecture,
    hf_dtype,
    normalized_architecture,
    read_hf_config,
    unfold_temperature,
)
from checkpoint_tools.hf_reader import HFWeights
from checkpoint_tools.layout import fuse_qkv, pad_vocab
from checkpoint_tools.megatron_writer import (
    stacked_chunks,
    whole_chunk,
    write_torch_dist,
)
from checkpoint_tools.progress import Progress
from checkpoint_tools.tokenizer_files import copy_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_base_config(path):
    """The megarank Config to start from, and the model keys its YAML sets explicitly."""
    from megarank.config import Config, ConfigError, load_config

    if path is None:
        return Config(), set()
    try:
        cfg = load_config(str(path))
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return cfg, set((raw.get("model") or {}).keys())


def check_agreement(want, have, keys, want_name: str, have_name: str) -> None:
    """The architecture keys in ``keys`` must agree between two configs (ModelConfig or HF-derived dict); the
    error names the first that differs, with both values."""
    want, have = normalized_architecture(want), normalized_architecture(have)
    for key in ARCHITECTURE_KEYS:
        if key in keys and want[key] != have[key]:
            raise ConversionError(
                f"{want_name} has model.{key} = {want[key]} but {have_name} has {have[key]}; "
                "the requested config contradicts the checkpoint"
            )


def build_config(hf: dict, fmt: str, weights: HFWeights, src: Path, opts: dict):
    """The megarank Config of the converted checkpoint: architecture from HF, the rest from --config and flags."""
    from megarank.config import ConfigError, validate

    cfg, explicit = _load_base_config(opts.get("config"))
    arch = hf_architecture(hf, where=str(src / "config.json"))
    model_arch = dataclasses.replace(cfg.model, **arch)
    check_agreement(cfg.model, arch, explicit, str(opts.get("config")), str(src / "config.json"))
    m = model_arch
    if fmt == "llama_bidirec":
        # a megarank export folded its temperature T into score.weight: the head is unfolded again (plan_chunks)
        temperature = float(hf.get("temperature", 1.0)) * folded_temperature(hf, str(src / "config.json"))
        m = dataclasses.replace(m, pooling=hf.get("pooling", m.pooling), temperature=temperature)
    if fmt != "causal_lm" and "score.weight" in weights:
        m = dataclasses.replace(m, num_labels=weights.shape("score.weight")[0])
    for key in ("pooling", "temperature", "make_vocab_size_divisible_by"):
        if opts.get(key) is not None:
            m = dataclasses.replace(m, **{key: opts[key]})
    if "dtype" not in explicit and hf_dtype(hf):
        m = dataclasses.replace(m, dtype=hf_dtype(hf))
    cfg = dataclasses.replace(cfg, model=m)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"{src}: the converted config would be invalid: {e}") from None
    return cfg


def check_tensors(weights: HFWeights, m, fmt: str, src: Path) -> list:
    """Missing, unexpected and wrongly shaped tensors are errors (named); returns the ignored names."""
    expected = keymap.hf_shapes(m, with_score=fmt != "causal_lm")
    names = weights.names()
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{src}: tensor {missing[0]} is missing{more}")
    ignored = [n for n in names if n not in expected and keymap.is_ignored_hf(n)]
    unexpected = [n for n in names if n not in expected and not keymap.is_ignored_hf(n)]
    if unexpected:
        raise ConversionError(f"{src}: unexpected tensor {unexpected[0]} (shape {list(weights.shape(unexpected[0]))}); it has no place in a Llama reranker")
    for name, shape in expected.items():
        if weights.shape(name) != tuple(shape):
            raise ConversionError(f"{src}: tensor {name} has shape {list(weights.shape(name))} but config.json implies {list(shape)}")
    return ignored


def _storage_dtype(weights: HFWeights, names, cast):
    if cast is not None:
        return cast
    dtypes = {weights.dtype(n) for n in names}
    if len(dtypes) != 1:
        raise ConversionError(f"tensors {', '.join(names[:3])}... mix dtypes {sorted(map(str, dtypes))}; pass --dtype to store one")
    return dtypes.pop()


def plan_chunks(weights: HFWeights, m, padded_vocab: int, cast, seed: int, unfold: float = 1.0) -> list:
    """Every stored chunk of the megatron checkpoint, layer by layer, each computed from HF tensors on demand."""
    shapes = keymap.megatron_shapes(m, padded_vocab)
    d = keymap.head_dim(m)
    get = (lambda n: weights.get(n).to(cast)) if cast is not None else weights.get
    per_key = []
    for e in keymap.LAYER_ENTRIES:
        names = [n for i in range(m.num_layers) for n in keymap.hf_layer_names(e, i)]
        dtype = _storage_dtype(weights, names, cast)
        if e.combine == "qkv":
            produce = lambda i, part, e=e: fuse_qkv(*(get(n) for n in keymap.hf_layer_names(e, i)),
                                                    m.num_attention_heads, m.num_query_groups, d)
        else:  # copy, or gate_up stored as two row blocks (gate, then up) like megatron's SwiGLU factory saves it
            produce = lambda i, part, e=e: get(keymap.hf_layer_names(e, i)[part])
        per_key.append(stacked_chunks(e.megatron, shapes[e.megatron], dtype, produce, split_rows=len(e.hf) if e.combine == "gate_up" else 1))
    layer_major = []
    for i in range(m.num_layers):  # HF shards are layer-ordered: read them in order
        for chunks in per_key:
            step = len(chunks) // m.num_layers
            layer_major.extend(chunks[i * step:(i + 1) * step])

    emb = keymap.EMBEDDING
    emb_dtype = _storage_dtype(weights, list(emb.hf), cast)
    head = [whole_chunk(emb.megatron, shapes[emb.megatron], emb_dtype, lambda: pad_vocab(get(emb.hf[0]), padded_vocab))]
    norm = keymap.FINAL_NORM
    tail = [whole_chunk(norm.megatron, shapes[norm.megatron], _storage_dtype(weights, list(norm.hf), cast), lambda: get(norm.hf[0]))]
    score_shape = shapes[keymap.SCORE.megatron]
    if "score.weight" in weights:  # (check_tensors made sure it has score_shape)
        tail.append(whole_chunk("score.weight", score_shape, _storage_dtype(weights, ["score.weight"], cast),
                                lambda: unfold_temperature(get("score.weight"), unfold)))
    else:  # a base LM: a new head, normal(0, init_method_std), seeded so conversions are reproducible
        def new_head():
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(score_shape, generator=g, dtype=torch.float32) * m.init_method_std).to(emb_dtype)

        tail.append(whole_chunk("score.weight", score_shape, emb_dtype, new_head))
    return head + layer_major + tail


def import_warnings(hf: dict, fmt: str, m, where: str) -> list:
    """Things the user must know about the converted model (printed on stderr, one line each)."""
    out = [f"{where} has no {key}; using transformers' default {key} = {value}" for key, value in defaulted_keys(hf)]
    if fmt == "seq_cls" and m.pooling != "last":
        out.append(
            f"{where}: a LlamaForSequenceClassification head was trained on the last token's state of a causal model "
            f"(last-token pooling); it is reused here with {m.pooling} pooling and bidirectional attention, so its "
            "scores start from scratch: fine-tune, or pass --pooling last to keep its pooling"
        )
    return out


def hf_to_megatron(src, dst, *, tp: int = 1, pp: int = 1, pooling=None, temperature=None, config=None,
                   make_vocab_size_divisible_by=None, dtype=None, seed: int = 1234, allow_pickle: bool = False,
                   allow_causal: bool = False, overwrite: bool = False, quiet: bool = False) -> str:
    """Convert; returns the summary line. ``pp`` does not change anything (see the CLI help)."""
    from megarank.checkpoint import write_manifest, write_marker
    from megarank.config import padded_vocab_size, save_config

    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} does not exist or is not a folder")
    hf = read_hf_config(src)
    fmt = detect_format(hf, where=str(src / "config.json"))
    check_bidirectional(hf, fmt, allow_causal, str(src / "config.json"))
    dst = check_destination(src, dst, overwrite)
    weights = HFWeights(src, allow_pickle=allow_pickle)
    opts = {"config": config, "pooling": pooling, "temperature": temperature, "make_vocab_size_divisible_by": make_vocab_size_divisible_by}
    cfg = build_config(hf, fmt, weights, src, opts)
    m = cfg.model
    ignored = check_tensors(weights, m, fmt, src)
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    unfold = folded_temperature(hf, str(src / "config.json")) if fmt == "llama_bidirec" else 1.0
    chunks = plan_chunks(weights, m, padded, DTYPES[dtype] if dtype else None, seed, unfold)
    for line in import_warnings(hf, fmt, m, str(src / "config.json")):
        print(f"megarank-convert hf-to-megatron: warning: {line}", file=sys.stderr)

    progress = Progress("hf-to-megatron", len(chunks), sum(c.nbytes for c in chunks), quiet=quiet)
    with atomic_output_dir(dst) as tmp:
        write_torch_dist(tmp / "model", chunks, on_written=lambda c: progress.update(c.key, c.nbytes))
        save_config(cfg, tmp / "config.yaml")
        tokenizer = copy_tokenizer(src, tmp / "tokenizer")
        write_marker(tmp, kind="converted", source=str(src.absolute()), source_format=fmt, padded_vocab_size=padded)
        write_manifest(tmp)  # last: checksums of every file, checked by every load
    notes = [f"format {fmt}", f"vocab {m.vocab_size} padded to {padded}"]
    if ignored:
        notes.append(f"ignored {', '.join(ignored[:2])}{' ...' if len(ignored) > 2 else ''}")
    if fmt == "causal_lm" or "score.weight" not in weights:
        notes.append(f"new score head normal(0, {m.init_method_std}) seed {seed}")
    if unfold != 1.0:
        notes.append(f"score head unfolded from the export's folded temperature {unfold:g}")
    if not tokenizer:
        notes.append("no tokenizer files found in SRC")
    return f"{progress.summary()} -> {dst} ({'; '.join(notes)})"
