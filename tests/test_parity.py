"""Parity with ``transformers``: megarank's scores on a converted tiny random Llama equal an independent reference
built from ``transformers.LlamaModel`` (docs/architecture.md, test tier 3).

The reference does not use this project's HF modeling file: it is stock ``LlamaModel`` loaded with the source
checkpoint's ``model.*`` weights, made bidirectional by passing a 4-D additive float mask (0 for real keys,
finfo.min for padding; a boolean 4-D mask would be wrong under eager attention), then mean pooling over valid
tokens (BOS included), the score head, and division by the temperature. GQA (4 heads / 2 KV heads), Llama-3 rope
scaling, random norm weights, right padding of varying length.
"""
from __future__ import annotations

import pytest
import torch

from checkpoint_tools.cli import main
from tests.helpers_hf import TINY, make_hf_llama, megarank_scores_tp1, random_batch, read_safetensors_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = 1e-5


def reference_scores(src, ids, mask, temperature: float, attn: str, score_weight=None):
    from transformers import LlamaConfig, LlamaModel

    weights = read_safetensors_folder(src)
    cfg = LlamaConfig(**{**TINY, "tie_word_embeddings": False}, attn_implementation=attn)
    model = LlamaModel(cfg).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")}, strict=True)
    b, s = ids.shape
    additive = torch.zeros(b, 1, s, s).masked_fill(~mask[:, None, None, :].expand(b, 1, s, s), torch.finfo(torch.float32).min)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=additive).last_hidden_state
    m = mask[..., None].float()
    pooled = (hidden * m).sum(1) / m.sum(1)
    head = score_weight if score_weight is not None else weights["score.weight"]
    return (pooled @ head.T)[:, 0] / temperature


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_megarank_matches_transformers_llama_reference(tmp_path, attn):
    src = make_hf_llama(tmp_path / "hf", "seq_cls", seed=5)
    mg = tmp_path / "mg"
    assert main(["hf-to-megatron", str(src), str(mg), "--temperature", "1.5", "--make-vocab-size-divisible-by", "64", "--quiet"]) == 0
    ids, mask = random_batch(lengths=(31, 5, 18, 2), seed=3)
    ours = megarank_scores_tp1(mg, ids, mask)
    ref = reference_scores(src, ids, mask, temperature=1.5, attn=attn)
    assert (ours - ref).abs().max().item() <= TOL, (ours, ref)
    # the reference really is bidirectional and padding-blind: a late token moves the score, a pad token does not
    late, pad = ids.clone(), ids.clone()
    late[0, 30] = (late[0, 30] + 1) % 256
    pad[1, 7] = 0
    assert not torch.allclose(reference_scores(src, late, mask, 1.5, attn)[0], ref[0])
    assert torch.equal(megarank_scores_tp1(mg, pad, mask)[1], ours[1])


def test_base_lm_import_matches_reference_with_new_head(tmp_path):
    src = make_hf_llama(tmp_path / "hf", "causal_lm", tied=True, seed=6)
    mg = tmp_path / "mg"
    assert main(["hf-to-megatron", str(src), str(mg), "--quiet"]) == 0
    from megatron.core import dist_checkpointing

    head = dist_checkpointing.load_plain_tensors(str(mg / "model"))["score.weight"]
    ids, mask = random_batch(seed=4)
    ref = reference_scores(src, ids, mask, temperature=1.0, attn="eager", score_weight=head)
    assert (megarank_scores_tp1(mg, ids, mask) - ref).abs().max().item() <= TOL
