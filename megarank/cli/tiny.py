"""The built-in tiny base model: a random-weight HF ``LlamaForCausalLM`` with the byte-level tokenizer.

It stands in for Llama-3.2-1B in the quickstart and tests (no hub access): same architecture family
(GQA, Llama-3 RoPE scaling, RMSNorm, SwiGLU), shape from a megarank config's ``model`` section.
"""
import tempfile
from pathlib import Path
from typing import Optional

from megarank.config import ConfigError, ModelConfig, load_config
from megarank.files import atomic_output_dir

_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def hf_llama_config(m: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    rope = None
    if m.rope_scaling is not None:
        rope = {"rope_type": "llama3", "factor": m.rope_scaling.factor, "low_freq_factor": m.rope_scaling.low_freq_factor,
                "high_freq_factor": m.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": m.rope_scaling.original_max_position_embeddings,
                "rope_theta": m.rope_theta}
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        rope_scaling=rope, tie_word_embeddings=m.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def write_tiny_hf_model(out, config_path: Optional[str] = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny HF Llama (safetensors + config.json + tokenizer) to ``out`` atomically."""
    import torch
    from transformers import LlamaForCausalLM

    from megarank.data import build_tiny_tokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists (pass --overwrite to replace it)")
    model_cfg = load_config(str(config_path or _DEFAULT_CONFIG)).model
    with tempfile.TemporaryDirectory() as build:
        tokenizer = build_tiny_tokenizer(Path(build) / "tokenizer")
    if model_cfg.vocab_size != len(tokenizer):
        raise ConfigError(f"model.vocab_size ({model_cfg.vocab_size}) must equal the tiny tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(model_cfg, tokenizer))
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out
