"""Hugging Face ``config.json`` ⇄ megarank ``ModelConfig``: which inputs are accepted, and the exported config.

Accepted architectures (``architectures[0]`` of config.json):
    LlamaForCausalLM                              a base LM: new score head, the LM head is ignored
    LlamaForSequenceClassification                its ``score.weight`` becomes the reranker head
    LlamaBidirectionalForSequenceClassification   NVIDIA's ``llama_bidirec`` rerankers (pooling, temperature too)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from checkpoint_tools.errors import ConversionError

FORMATS = {
    "LlamaForCausalLM": "causal_lm",
    "LlamaForSequenceClassification": "seq_cls",
    "LlamaBidirectionalForSequenceClassification": "llama_bidirec",
}
LLAMA_MODEL_TYPES = ("llama", "llama_bidirec")
EXPORT_ARCHITECTURE = "LlamaBidirectionalForSequenceClassification"
EXPORT_MODEL_TYPE = "llama_bidirec"
AUTO_MAP = {
    "AutoConfig": "configuration_llama_bidirec.LlamaBidirectionalConfig",
    "AutoModel": "modeling_llama_bidirec.LlamaBidirectionalModel",
    "AutoModelForSequenceClassification": "modeling_llama_bidirec.LlamaBidirectionalForSequenceClassification",
}
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Exports divide score.weight by the training temperature and write temperature 1.0, because vLLM (and any tool
# that only reads weights) never divides by `temperature`; the folded value is recorded under this key so that
# import can restore the training parameterization (head * T, temperature T) with the same scores.
FOLDED_TEMPERATURE_KEY = "megarank_folded_temperature"
# ModelConfig fields that an HF config.json determines, compared between configs by the converters. Not
# megarank.checkpoint.ARCHITECTURE_KEYS (what a run must share with a checkpoint it loads): config.json has
# max_position_embeddings, and num_labels comes from score.weight's shape, not from config.json.
HF_ARCHITECTURE_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "vocab_size", "max_position_embeddings", "rope_theta", "rope_scaling", "norm_eps",
)


def read_hf_config(src) -> dict:
    path = Path(src) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json; expected a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return cfg


def detect_format(hf: dict, where="config.json") -> str:
    """One of FORMATS' values, or a one-sentence error for anything that is not a supported Llama."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    model_type = hf.get("model_type")
    if arch in FORMATS and model_type in LLAMA_MODEL_TYPES:
        return FORMATS[arch]
    raise ConversionError(
        f"{where}: architecture {arch or '(none)'} (model_type {model_type}) is not a supported Llama model; "
        f"megarank converts {', '.join(FORMATS)}"
    )


def _rope(hf: dict, where: str):
    """(rope_theta, RopeScalingConfig | None) from either transformers 5 ``rope_parameters`` or the 4.x keys."""
    from megarank.config import RopeScalingConfig

    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta, scaling = params["rope_theta"], params
    else:
        theta, scaling = hf.get("rope_theta", DEFAULTED_KEYS["rope_theta"]), hf.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConversionError(f"{where}: rope scaling type {kind!r} is not supported; megarank implements Llama-3 ('llama3') scaling only")
    return float(theta), RopeScalingConfig(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _reject_unsupported(hf: dict, where: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; megarank's Llama MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"{where}: {key}=true is not supported; megarank's Llama has no linear biases")


# Keys a Llama config.json may leave out, and the value transformers' LlamaConfig uses then (configuration_llama.py).
DEFAULTED_KEYS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048}


def defaulted_keys(hf: dict) -> list:
    """[(key, value)] for each DEFAULTED_KEYS entry config.json does not set (converters then use the default)."""
    out = []
    for key, value in DEFAULTED_KEYS.items():
        present = key in hf or (key == "rope_theta" and isinstance(hf.get("rope_parameters"), dict)
                                and "rope_theta" in hf["rope_parameters"])
        if not present:
            out.append((key, value))
    return out


def check_bidirectional(hf: dict, fmt: str, allow_causal: bool, where: str) -> None:
    """A llama_bidirec (NVIDIA / NeMo) config that says is_causal: true describes a causal model: refuse it unless
    the user asks for it (megarank would silently run those weights bidirectionally)."""
    if fmt == "llama_bidirec" and hf.get("is_causal") is True and not allow_causal:
        raise ConversionError(
            f"{where} says is_causal: true, but megarank rerankers attend bidirectionally; pass --allow-causal to "
            "import its weights anyway (they will then run with bidirectional attention)"
        )


REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def hf_architecture(hf: dict, where="config.json") -> dict:
    """The ModelConfig fields an HF config determines (a dict, so callers can compare/merge)."""
    missing = [k for k in REQUIRED_KEYS if not isinstance(hf.get(k), int)]
    if missing:
        raise ConversionError(f"{where} lacks an integer {missing[0]}, which every Llama config.json has")
    _reject_unsupported(hf, where)
    theta, scaling = _rope(hf, where)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return {
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": None if head_dim * heads == hf["hidden_size"] else head_dim,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", DEFAULTED_KEYS["max_position_embeddings"]),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", DEFAULTED_KEYS["rms_norm_eps"])),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def hf_dtype(hf: dict):
    """megarank dtype name of the HF checkpoint (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return DTYPE_NAMES.get(str(name).replace("torch.", "")) if name else None


def normalized_architecture(m) -> dict:
    """ModelConfig architecture fields with kv_channels made explicit, for comparisons."""
    fields = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m)
    out = {k: fields[k] for k in HF_ARCHITECTURE_KEYS}
    out["kv_channels"] = out["kv_channels"] or out["hidden_size"] // out["num_attention_heads"]
    if out["rope_scaling"] is not None and dataclasses.is_dataclass(out["rope_scaling"]):
        out["rope_scaling"] = dataclasses.asdict(out["rope_scaling"])
    return out


def folded_temperature(hf: dict, where: str) -> float:
    """The temperature a megarank export folded into its score.weight (1.0 for any other model)."""
    value = hf.get(FOLDED_TEMPERATURE_KEY, 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConversionError(f"{where}: {FOLDED_TEMPERATURE_KEY} must be a positive number, got {value!r}")
    return float(value)


def export_config(m, dtype: str, extra: dict | None = None) -> dict:
    """config.json of an exported reranker (NVIDIA's llama_bidirec format; loads with trust_remote_code).

    ``temperature`` is 1.0 because the exporter folds ``m.temperature`` into ``score.weight``."""
    d = m.head_dim
    rope_scaling = None
    if m.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(m.rope_scaling)}
    cfg = {
        "architectures": [EXPORT_ARCHITECTURE],
        "model_type": EXPORT_MODEL_TYPE,
        "auto_map": dict(AUTO_MAP),
        "pooling": m.pooling,
        "temperature": 1.0,  # folded into score.weight (see FOLDED_TEMPERATURE_KEY)
        FOLDED_TEMPERATURE_KEY: m.temperature,
        "is_causal": False,  # read by NeMo AutoModel and vLLM's llama_bidirec config handling
        "num_labels": m.num_labels,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps,
        # transformers 4.x keys; transformers 5 reads them into rope_parameters
        "rope_theta": m.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": False,  # a reranker has no LM head to tie
        "use_cache": False,
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype],  # transformers >= 4.56 name
    }
    cfg["torch_dtype"] = cfg["dtype"]  # the name transformers < 4.56 reads (5.x still accepts it)
    if m.num_labels == 1:
        cfg["id2label"] = {"0": "LABEL_0"}
        cfg["label2id"] = {"LABEL_0": 0}
    cfg.update(extra or {})
    return cfg
