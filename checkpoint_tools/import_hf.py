"""hf-to-megatron: a Hugging Face Llama folder -> a megarank checkpoint folder (config.yaml, tokenizer/, model/).

One plan serves both outputs: ``plan_import`` derives the Config and the list of stored chunks (each computed
from HF tensors through the ``keymap`` registry when asked), ``hf_to_megatron`` streams the chunks to the
``torch_dist`` writer, and ``hf_to_megatron_in_memory`` assembles the same chunks into global tensors, so the two
are identical by construction.

Vocabulary padding: the embedding is stored with ``padded_vocab_size(vocab_size, make_vocab_size_divisible_by,
--tp)`` rows (megarank's rule: a multiple of lcm(divisible_by, tp), so the same size for every TP that divides
divisible_by), zero rows appended; config.yaml keeps the HF ``vocab_size``. A model at any TP loads it even when
its own padded size differs: megatron-core's ``VocabParallelEmbedding`` marks its sharded tensor
``allow_shape_mismatch``, so the overlapping rows are read and the rest zero-filled (tested with vocab 301,
divisible_by 1: 301 stored rows loaded by a TP=2 model of 302). Export cuts back to ``vocab_size``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from checkpoint_tools import keymap
from checkpoint_tools.atomic import atomic_output_dir, check_destination
from checkpoint_tools.configs import (
    DTYPES, check_agreement, explicit_keys, keys_in_overrides, load_requested_config,
)
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import (
    check_bidirectional,
    defaulted_keys,
    detect_format,
    folded_temperature,
    hf_architecture,
    hf_dtype,
    read_hf_config,
)
from checkpoint_tools.hf_reader import HFWeights
from checkpoint_tools.megatron_writer import materialize, stacked_chunks, whole_chunk, write_torch_dist
from checkpoint_tools.progress import Progress
from checkpoint_tools.tokenizer_files import copy_tokenizer, tokenizer_files

if TYPE_CHECKING:
    import megarank.config

log = logging.getLogger("checkpoint_tools.import_hf")

# model keys a flag of the same name (or a dotted override) sets over the source's value
HEAD_FLAGS = ("pooling", "temperature", "make_vocab_size_divisible_by")


# ------------------------------------------------------------------------------------------------ config


def _source_config_json(src: Path) -> str:
    return str(src / "config.json")


def _requested_name(config, overrides) -> str:
    """How errors name the requested config: the --config path and/or the overrides."""
    parts = [str(config)] if config is not None else []
    if overrides:
        parts.append("overrides " + " ".join(overrides))
    return " + ".join(parts) or "the requested config"


def _source_head(m, hf: dict, fmt: str, weights: HFWeights, where: str):
    """``m`` with the source's head settings: a llama_bidirec's pooling and temperature (a megarank export folded
    its temperature T into score.weight: T comes back here, the head is unfolded by keymap.SCORE) and num_labels."""
    if fmt == "llama_bidirec":
        temperature = float(hf.get("temperature", 1.0)) * folded_temperature(hf, where)
        m = dataclasses.replace(m, pooling=hf.get("pooling", m.pooling), temperature=temperature)
    if fmt != "causal_lm" and "score.weight" in weights:
        m = dataclasses.replace(m, num_labels=weights.shape("score.weight")[0])
    return m


def _flag_values(opts: dict, requested_model, overrides) -> dict:
    """HEAD_FLAGS set by a flag, else by a dotted ``model.<key>`` override: these win over the source's values."""
    overridden = keys_in_overrides(overrides)
    out = {}
    for key in HEAD_FLAGS:
        value = opts.get(key)
        if value is None and key in overridden:
            value = getattr(requested_model, key)
        if value is not None:
            out[key] = value
    return out


def build_config(hf: dict, fmt: str, weights: HFWeights, src: Path, opts: dict):
    """The megarank Config of the converted checkpoint: architecture from HF, the rest from --config / overrides
    and flags."""
    from megarank.config import ConfigError, validate

    overrides = tuple(opts.get("overrides") or ())
    cfg, explicit = load_requested_config(opts.get("config"), overrides)
    where = _source_config_json(src)
    arch = hf_architecture(hf, where=where)
    check_agreement(cfg.model, arch, explicit, _requested_name(opts.get("config"), overrides), where)
    m = _source_head(dataclasses.replace(cfg.model, **arch), hf, fmt, weights, where)
    m = dataclasses.replace(m, **_flag_values(opts, cfg.model, overrides))
    if "dtype" not in explicit and hf_dtype(hf):
        m = dataclasses.replace(m, dtype=hf_dtype(hf))
    cfg = dataclasses.replace(cfg, model=m, data=_trained_input(src, cfg.data, explicit_keys(opts.get("config"), overrides, "data")))
    try:
        validate(cfg)
    except ConfigError as e:
        raise ConversionError(f"{src}: the converted config would be invalid: {e}") from None
    return cfg


def _trained_input(src: Path, data, explicit: set):
    """A megarank export records the input it was trained on in tokenizer_config.json (``megarank_template``,
    ``model_max_length`` = data.max_length and ``megarank_max_query_length``: checkpoint_tools/tokenizer_files.py
    ``prepare_reranker_tokenizer``); carry them back into the data section unless --config / overrides set them
    (a query budget is not carried over a max_length set there), so the imported model is fed what the export's
    consumers feed it. Other tokenizers' ``model_max_length`` is a context limit, not a
    training choice: left alone."""
    path = src / "tokenizer_config.json"
    try:
        tok = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return data
    if not isinstance(tok, dict) or not isinstance(tok.get("megarank_template"), str):
        return data
    found = {"template": tok["megarank_template"]}
    if isinstance(tok.get("model_max_length"), int):
        found["max_length"] = tok["model_max_length"]
    if isinstance(tok.get("megarank_max_query_length"), int) and "max_length" not in explicit:
        found["max_query_length"] = tok["megarank_max_query_length"]
    return dataclasses.replace(data, **{k: v for k, v in found.items() if k not in explicit})


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


# ------------------------------------------------------------------------------------------------ tensors


def check_tensors(weights: HFWeights, dims: keymap.Dims, fmt: str, src: Path) -> list:
    """Missing, unexpected and wrongly shaped tensors are errors (named); returns the ignored names."""
    expected = {name: shape for name, shape, _, _ in keymap.hf_entries(dims, with_score=fmt != "causal_lm")}
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


class _Source:
    """HF tensors by name for the mappings (``source[name]``), read from disk on each access, optionally cast."""

    def __init__(self, weights: HFWeights, cast):
        self.weights, self.cast = weights, cast

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.weights.get(name)
        return t.to(self.cast) if self.cast is not None else t

    def storage_dtype(self, names: list):
        """The one dtype the megatron tensor made of ``names`` is stored in."""
        if self.cast is not None:
            return self.cast
        dtypes = {self.weights.dtype(n) for n in names}
        if len(dtypes) != 1:
            raise ConversionError(f"tensors {', '.join(names[:3])}... mix dtypes {sorted(map(str, dtypes))}; pass --dtype to store one")
        return dtypes.pop()


def _layer_chunks(source: _Source, dims: keymap.Dims) -> list:
    """The stacked tensors' chunks, layer-major (HF shards are layer-ordered: they are then read in order)."""
    per_key = []
    for mp in keymap.LAYER_MAPPINGS:
        dtype = source.storage_dtype([n for i in range(dims.layers) for n in mp.names(i)])
        produce = lambda i, block, mp=mp: mp.to_megatron_block(source, dims, block, i)
        per_key.append(stacked_chunks(mp.megatron, mp.megatron_shape(dims), dtype, produce, split_rows=mp.blocks))
    out = []
    for i in range(dims.layers):
        for chunks in per_key:
            step = len(chunks) // dims.layers
            out.extend(chunks[i * step:(i + 1) * step])
    return out


def _global_chunk(source: _Source, dims: keymap.Dims, mp: keymap.Mapping):
    return whole_chunk(mp.megatron, mp.megatron_shape(dims), source.storage_dtype(mp.names()),
                       lambda: mp.to_megatron(source, dims))


def _new_score_chunk(dims: keymap.Dims, dtype, seed: int, std: float):
    """A base LM's head: normal(0, init_method_std), seeded so conversions are reproducible."""
    shape = keymap.SCORE.megatron_shape(dims)

    def new_head():
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype)

    return whole_chunk(keymap.SCORE.megatron, shape, dtype, new_head)


def plan_chunks(weights: HFWeights, dims: keymap.Dims, cast, seed: int, init_std: float) -> list:
    """Every stored chunk of the megatron checkpoint in write order, each computed from HF tensors on demand."""
    source = _Source(weights, cast)
    layers = _layer_chunks(source, dims)
    before = [_global_chunk(source, dims, mp) for mp in keymap.BEFORE_LAYERS]
    after = []
    for mp in keymap.AFTER_LAYERS:
        if mp is keymap.SCORE and not all(n in weights for n in mp.names()):  # a base LM (check_tensors allowed it)
            dtype = source.storage_dtype(keymap.EMBEDDING.names())
            after.append(_new_score_chunk(dims, dtype, seed, init_std))
        else:
            after.append(_global_chunk(source, dims, mp))
    return before + layers + after


# ------------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class ImportPlan:
    """Everything a conversion produces, before anything is written."""

    src: Path
    fmt: str
    cfg: object  # megarank.config.Config
    dims: keymap.Dims
    chunks: list
    ignored: list
    new_head: bool
    warnings: list

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        return self.src if tokenizer_files(self.src) else None


def read_source(src, allow_causal: bool = False):
    """(folder, config.json dict, format) of an HF folder import accepts."""
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"{src} does not exist or is not a folder")
    hf = read_hf_config(src)
    fmt = detect_format(hf, where=_source_config_json(src))
    check_bidirectional(hf, fmt, allow_causal, _source_config_json(src))
    return src, hf, fmt


def plan_import(src: Path, hf: dict, fmt: str, *, tp: int = 1, config=None, overrides=(), pooling=None,
                temperature=None, make_vocab_size_divisible_by=None, dtype=None, seed: int = 1234,
                allow_pickle: bool = False) -> ImportPlan:
    """Read the weights' headers, derive the Config and plan every chunk (reads no tensor data)."""
    weights = HFWeights(src, allow_pickle=allow_pickle)
    opts = {"config": config, "overrides": overrides, "pooling": pooling, "temperature": temperature,
            "make_vocab_size_divisible_by": make_vocab_size_divisible_by}
    cfg = build_config(hf, fmt, weights, src, opts)
    m = cfg.model
    unfold = folded_temperature(hf, _source_config_json(src)) if fmt == "llama_bidirec" else 1.0
    dims = keymap.Dims.of(m, m.padded_vocab(tp), unfold)
    ignored = check_tensors(weights, dims, fmt, src)
    chunks = plan_chunks(weights, dims, DTYPES[dtype] if dtype else None, seed, m.init_method_std)
    new_head = fmt == "causal_lm" or "score.weight" not in weights
    return ImportPlan(src, fmt, cfg, dims, chunks, ignored, new_head, import_warnings(hf, fmt, m, _source_config_json(src)))


def hf_to_megatron_in_memory(
    src, overrides=()
) -> tuple["megarank.config.Config", dict[str, torch.Tensor], Optional[Path]]:
    """``hf-to-megatron SRC`` without writing anything: (the Config it saves as config.yaml, {megatron key: global
    tensor} of exactly what it writes into ``model/``, the folder holding SRC's tokenizer files or None).

    Accepts what the CLI accepts with its default flags (``llama_bidirec`` exports, their folded temperature
    multiplied back, ``LlamaForSequenceClassification``, ``LlamaForCausalLM`` with a new seeded head). ``overrides``
    are dotted ``section.key=value`` strings applied like a ``--config`` YAML that sets them (architecture keys
    must agree with config.json), except that ``model.pooling`` / ``model.temperature`` /
    ``model.make_vocab_size_divisible_by`` win over the source's values, as the flags of those names do. Tensors
    keep the source dtypes, layers stacked on dim 0; the whole model is in memory at once.
    """
    src, hf, fmt = read_source(src)
    plan = plan_import(src, hf, fmt, overrides=tuple(overrides))
    for line in plan.warnings:
        log.warning("%s", line)
    return plan.cfg, materialize(plan.chunks), plan.tokenizer_dir


# ------------------------------------------------------------------------------------------------ on disk


def _write_checkpoint(plan: ImportPlan, tmp: Path, progress: Progress) -> list:
    """config.yaml, tokenizer/, model/, the marker and the manifest (last); returns the tokenizer files copied."""
    from megarank.checkpoint import write_manifest
    from megarank.checkpoint.layout import CONFIG_FILE, MODEL_DIR, TOKENIZER_DIR, write_marker
    from megarank.config import save_config

    write_torch_dist(tmp / MODEL_DIR, plan.chunks, on_written=lambda c: progress.update(c.key, c.nbytes))
    save_config(plan.cfg, tmp / CONFIG_FILE)
    tokenizer = copy_tokenizer(plan.src, tmp / TOKENIZER_DIR)
    write_marker(tmp, kind="converted", source=str(plan.src.absolute()), source_format=plan.fmt,
                 padded_vocab_size=plan.dims.padded_vocab)
    write_manifest(tmp)  # last: checksums of every file, checked by every load
    return tokenizer


def _summary_notes(plan: ImportPlan, tokenizer: list, seed: int) -> list:
    m = plan.cfg.model
    notes = [f"format {plan.fmt}", f"vocab {m.vocab_size} padded to {plan.dims.padded_vocab}"]
    if plan.ignored:
        notes.append(f"ignored {', '.join(plan.ignored[:2])}{' ...' if len(plan.ignored) > 2 else ''}")
    if plan.new_head:
        notes.append(f"new score head normal(0, {m.init_method_std}) seed {seed}")
    if plan.dims.folded_temperature != 1.0:
        notes.append(f"score head unfolded from the export's folded temperature {plan.dims.folded_temperature:g}")
    if not tokenizer:
        notes.append("no tokenizer files found in SRC")
    return notes


def hf_to_megatron(src, dst, *, tp: int = 1, pp: int = 1, pooling=None, temperature=None, config=None,
                   make_vocab_size_divisible_by=None, dtype=None, seed: int = 1234, allow_pickle: bool = False,
                   allow_causal: bool = False, overwrite: bool = False, quiet: bool = False, overrides=()) -> str:
    """Convert; returns the summary line. ``pp`` does not change anything (see the CLI help)."""
    src, hf, fmt = read_source(src, allow_causal)
    dst = check_destination(src, dst, overwrite)
    plan = plan_import(src, hf, fmt, tp=tp, config=config, overrides=overrides, pooling=pooling,
                       temperature=temperature, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                       dtype=dtype, seed=seed, allow_pickle=allow_pickle)
    for line in plan.warnings:
        print(f"megarank-convert hf-to-megatron: warning: {line}", file=sys.stderr)

    progress = Progress("hf-to-megatron", len(plan.chunks), sum(c.nbytes for c in plan.chunks), quiet=quiet)
    with atomic_output_dir(dst) as tmp:
        tokenizer = _write_checkpoint(plan, tmp, progress)
    return f"{progress.summary()} -> {dst} ({'; '.join(_summary_notes(plan, tokenizer, seed))})"
