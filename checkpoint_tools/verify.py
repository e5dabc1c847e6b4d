"""verify: score a few built-in query/passage pairs with the HF model and with megarank on the converted checkpoint.

Both run on CPU in fp32. The HF side is the HF weights in this package's ``LlamaBidirectionalForSequenceClassification``
with the checkpoint's pooling/temperature (less the temperature a megarank export folded into its head) (a base LM has no score head: the converted checkpoint's new head is used
on both sides, and the output says so). Texts are encoded as megarank does (docs/architecture.md): one string from the
config's template, BOS prepended, no EOS, right padding; random ids when no tokenizer is available.
"""
from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_tools import keymap
from checkpoint_tools.configs import check_agreement, load_saved_config
from checkpoint_tools.errors import ConversionError
from checkpoint_tools.hf_config import (
    HF_ARCHITECTURE_KEYS,
    detect_format,
    export_config,
    folded_temperature,
    hf_architecture,
    read_hf_config,
)
from checkpoint_tools.hf_reader import HFWeights
from checkpoint_tools.megatron_reader import MegatronWeights, resolve_checkpoint
from checkpoint_tools.tf32 import TF32_OVERRIDE
from checkpoint_tools.tokenizer_files import copy_tokenizer, tokenizer_files

PAIRS = [
    ("what is the capital of france?", "Paris is the capital and largest city of France."),
    ("what is the capital of france?", "The Eiffel Tower was completed in 1889."),
    ("how do plants make food?", "Photosynthesis converts light energy into chemical energy stored in sugars."),
    ("how do plants make food?", "A bicycle has two wheels and is powered by pedals."),
    ("who wrote hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
]


def encode_pairs(tokenizer_dir, template: str, vocab_size: int, max_length: int = 128, pairs=PAIRS):
    """input_ids [b, s] and attention_mask [b, s] (bool, True = real token), right-padded."""
    rows = []
    if tokenizer_dir is not None:
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:  # tokenizer files only: AutoTokenizer must not run SRC's code
            copy_tokenizer(tokenizer_dir, tmp)
            tok = AutoTokenizer.from_pretrained(tmp)
        for q, p in pairs:
            ids = tok(template.format(query=q, passage=p), add_special_tokens=False)["input_ids"]
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            rows.append((bos + ids)[:max_length])
    else:
        g = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (max_length, 17, 40, 9, 64)[: len(pairs)]]
    width = max(len(r) for r in rows)
    width += -width % 8
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def hf_reranker(src: Path, m, score_from=None, folded: float = 1.0):
    """This package's HF reranker class loaded with SRC's weights in fp32 (score head from SRC or ``score_from``).

    It divides by the checkpoint's temperature, less what SRC already folded into its head (a megarank export)."""
    from checkpoint_tools.hf_modeling.configuration_llama_bidirec import (
        LlamaBidirectionalConfig,
    )
    from checkpoint_tools.hf_modeling.modeling_llama_bidirec import (
        LlamaBidirectionalForSequenceClassification,
    )

    cfg = export_config(m, "fp32")
    for key in ("architectures", "model_type", "auto_map", "dtype"):
        cfg.pop(key)
    cfg["temperature"] = m.temperature / folded
    model = LlamaBidirectionalForSequenceClassification(LlamaBidirectionalConfig(**cfg)).eval()
    weights = HFWeights(src)
    names = keymap.hf_shapes(m, with_score=score_from is None)
    state = {n: weights.get(n).float() for n in names}
    if score_from is not None:
        state["score.weight"] = score_from.float()
    model.load_state_dict(state, strict=True)
    return model


def megarank_scores(ckpt: Path, cfg, ids, mask) -> torch.Tensor:
    """megarank's scores [b, num_labels] of the encoded pairs: the checkpoint (whose saved config is ``cfg``)
    loaded by ``megarank.Reranker`` on one rank, TP=PP=1, the local spec, fp32, run on ``ids`` / ``mask``."""
    from megarank import Reranker
    from megarank.checkpoint import CheckpointError
    from megarank.parallel.init import device

    layout = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
              "parallel.sequence_parallel=false", "model.transformer_impl=local", "model.attention_dropout=0.0",
              "model.hidden_dropout=0.0"]
    try:
        reranker = Reranker.from_checkpoint(ckpt, dtype="fp32", overrides=layout)
    except CheckpointError as e:  # a damaged or refused checkpoint file: one line, like the other commands
        raise ConversionError(str(e)) from None
    with torch.no_grad():
        return reranker.model(ids.to(device()), mask.to(device())).float().cpu()


def verify_tf32_note() -> str:
    """Empty, or why this process's fp32 CUDA matmuls may be TF32 despite ``allow_tf32 = False``."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the torch default; verify compares fp32 scores
    if torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32:  # latched by the override at import
        return (f"warning: {TF32_OVERRIDE} was set when torch was imported, so CUDA fp32 matmuls run in TF32 and "
                f"the scores may differ by ~1e-3; run verify with {TF32_OVERRIDE}=0")
    return ""


def verify(src_hf, dst_megatron, tol: float = 1e-4, quiet: bool = False) -> float:
    """Max |score_hf - score_megarank| over the built-in pairs; prints a table; raises nothing on a large diff."""
    note = verify_tf32_note()
    if note and not quiet:
        print(note)
    src = Path(src_hf)
    hf = read_hf_config(src)
    fmt = detect_format(hf, where=str(src / "config.json"))
    ckpt = resolve_checkpoint(dst_megatron)
    cfg = load_saved_config(ckpt)
    arch = hf_architecture(hf, str(src / "config.json"))
    check_agreement(cfg.model, arch, HF_ARCHITECTURE_KEYS, f"{ckpt}/config.yaml", str(src / "config.json"))
    score_from, folded = None, 1.0
    if fmt == "llama_bidirec":
        folded = folded_temperature(hf, str(src / "config.json"))
    if fmt == "causal_lm":
        score_from = MegatronWeights(ckpt).read_global("score.weight")
    tok_dir = next((d for d in (src, ckpt / "tokenizer") if tokenizer_files(d)), None)
    ids, mask = encode_pairs(tok_dir, cfg.data.template, cfg.model.vocab_size)
    with torch.no_grad():
        hf_scores = hf_reranker(src, cfg.model, score_from, folded)(input_ids=ids, attention_mask=mask.long()).logits.float()
    mr_scores = megarank_scores(ckpt, cfg, ids, mask)
    diff = (hf_scores - mr_scores).abs().max().item()
    if not quiet:
        head = " (score head: the converted checkpoint's new head)" if score_from is not None else ""
        print(f"verify {src} vs {ckpt}: {len(ids)} pairs, {'tokenizer ' + str(tok_dir) if tok_dir else 'random ids'}{head}")
        for i in range(len(ids)):
            print(f"  pair {i}: hf {hf_scores[i].tolist()}  megarank {mr_scores[i].tolist()}")
        print(f"max abs diff {diff:.3e} (tolerance {tol:.1e}): {'OK' if diff <= tol else 'FAILED'}")
    return diff

