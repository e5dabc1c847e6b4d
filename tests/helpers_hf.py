"""Tiny random Hugging Face Llama checkpoints (three input formats) and a tokenizer, for converter tests.

Sizes are chosen to catch layout bugs: GQA (4 heads, 2 KV heads), Llama-3 rope scaling, vocab 300 (needs padding
to 320 rows with make_vocab_size_divisible_by 64), and random norm weights (not all ones).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = {
    "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
}
FORMATS = ("causal_lm", "seq_cls", "llama_bidirec")
DIVISIBLE_BY = 64  # --make-vocab-size-divisible-by 64: vocab 300 -> 320 rows (lcm(64, tp) for TP 1 and 2)


def build_tokenizer(out_dir, adds_bos: bool = False) -> Path:
    """A byte-level tokenizer (ids 0-255 = bytes, 256/257/258 = BOS/EOS/PAD) saved with save_pretrained.

    ``adds_bos``: its post-processor puts BOS first whenever special tokens are added, as Llama 3's does (without
    it the tokenizer adds nothing, as SmolLM2's)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; give that character id b.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()
    assert set(chars.values()) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{specials[0]} $A", pair=f"{specials[0]} $A $B", special_tokens=[(specials[0], 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2])
    fast.padding_side = "right"
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def _randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def make_hf_llama(out_dir, fmt: str = "causal_lm", tied: bool = False, seed: int = 0, dtype=torch.float32,
                  shard: str | None = None, tokenizer: bool = True, pooling: str = "avg", temperature: float = 1.0,
                  adds_bos: bool = False, **overrides) -> Path:
    """Save a tiny random HF model in one of FORMATS (safetensors, optionally sharded) with a tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    from checkpoint_tools.hf_modeling.configuration_llama_bidirec import (
        LlamaBidirectionalConfig,
    )
    from checkpoint_tools.hf_modeling.modeling_llama_bidirec import (
        LlamaBidirectionalForSequenceClassification,
    )

    kw = {**TINY, **overrides, "tie_word_embeddings": tied}
    torch.manual_seed(seed)
    if fmt == "causal_lm":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif fmt == "seq_cls":
        model = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **kw))
    elif fmt == "llama_bidirec":
        model = LlamaBidirectionalForSequenceClassification(
            LlamaBidirectionalConfig(num_labels=1, pooling=pooling, temperature=temperature, **kw))
    else:
        raise ValueError(fmt)
    _randomize(model, seed)
    if tied and fmt == "causal_lm":
        model.tie_weights()
    model = model.to(dtype)
    out_dir = Path(out_dir)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer:
        build_tokenizer(out_dir, adds_bos=adds_bos)
    return out_dir


def read_safetensors_folder(folder) -> dict:
    """name -> tensor of every safetensors file in an HF folder (test helper; loads everything)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def edit_config(folder, **changes) -> None:
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))


def random_batch(vocab: int = 256, lengths=(23, 9, 16, 1), seed: int = 0):
    """Random ids [b, s] with right padding (pad id 258) and a bool mask (True = real); BOS (256) first."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + (-max(lengths) % 8)
    ids = torch.full((len(lengths), width), 258, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
        ids[i, 0] = 256
        mask[i, :n] = True
    return ids, mask


def megarank_scores_tp1(checkpoint, ids, mask):
    """megarank's scores [b] from a checkpoint folder, in this process at TP=1/PP=1, in the checkpoint's dtype."""
    from megarank import Reranker
    from megarank.checkpoint import load_checkpoint_config, resolve_checkpoint

    dtype = load_checkpoint_config(resolve_checkpoint(checkpoint)).model.dtype
    layout = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
              "parallel.sequence_parallel=false"]
    reranker = Reranker.from_checkpoint(checkpoint, dtype=dtype, overrides=layout)
    with torch.no_grad():
        return reranker.model(ids, mask)[:, 0]
