"""Converted checkpoints load in megarank at TP=1, TP=2 and PP=2, and the exported HF folder scores the same.

* HF side: ``AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True)`` (eager and
  sdpa attention) and ``sentence_transformers.CrossEncoder(export, trust_remote_code=True)``, offline.
* megarank side: the converted Megatron checkpoint loaded with ``load_model_weights`` into a model built at TP=1
  (in this process) and at TP=2 and PP=2 (one 2-rank gloo spawn), scored with ``megarank.scoring.batched.score_batches``.
* A checkpoint saved by megarank at TP=2 exports to the same HF tensors, bit for bit.
Cases: GQA with avg pooling; last pooling with temperature 2; a vocabulary (301, divisible_by 1) whose padded size
differs between TP=1 (301 rows) and TP=2 (302 rows), so loading at TP=2 relies on megatron's embedding accepting
a different stored size.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch

from checkpoint_tools.cli import main
from tests.dist_utils import run_distributed
from tests.helpers_hf import make_hf_llama, megarank_scores_tp1, random_batch, read_safetensors_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TOL = 1e-5
CASES = {
    "gqa_avg": ({"fmt": "llama_bidirec", "pooling": "avg"}, 64),
    "last_t2": ({"fmt": "seq_cls"}, 64),
    "odd_vocab": ({"fmt": "causal_lm", "vocab_size": 301}, 1),
}
SPAWNED = ("gqa_avg", "odd_vocab")
PAIRS = [("what is x?", "x is the 24th letter of the alphabet"), ("hello", "world"), ("a b c", "d e f g h i j k l m n o p")]


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE")
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    out = {}
    for name, (kw, divisible_by) in CASES.items():
        src = make_hf_llama(root / name / "hf", seed=11, **kw)
        mg, hf = root / name / "mg", root / name / "out"
        extra = ["--pooling", "last", "--temperature", "2"] if name == "last_t2" else []
        assert main(["hf-to-megatron", str(src), str(mg), "--make-vocab-size-divisible-by", str(divisible_by), "--quiet", *extra]) == 0
        assert main(["megatron-to-hf", str(mg), str(hf), "--quiet"]) == 0
        out[name] = (src, mg, hf)
    return out


def hf_scores(export, ids, mask, attn):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(export), trust_remote_code=True, attn_implementation=attn).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long()).logits[:, 0]


@pytest.mark.parametrize("case", list(CASES))
def test_exported_hf_model_scores_like_megarank(converted, case):
    _, mg, export = converted[case]
    ids, mask = random_batch()
    ours = megarank_scores_tp1(mg, ids, mask)
    for attn in ("eager", "sdpa"):
        theirs = hf_scores(export, ids, mask, attn)
        assert (theirs - ours).abs().max().item() <= TOL, (case, attn, theirs, ours)
    assert ours.std() > 0  # distinct scores: a degenerate model would hide errors


def test_crossencoder_loads_export_and_scores_like_megarank(converted):
    """Plain (query, passage) pairs: the export's chat template makes CrossEncoder build megarank's own input."""
    from sentence_transformers import CrossEncoder

    from megarank.checkpoint import load_checkpoint_config
    from megarank.data.tokenizer import PairTokenizer, load_tokenizer

    _, mg, export = converted["gqa_avg"]
    ce = CrossEncoder(str(export), trust_remote_code=True, device="cpu")
    scores = ce.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_tensor=True).float()
    cfg = load_checkpoint_config(mg)
    enc = PairTokenizer(load_tokenizer(mg / "tokenizer"), template=cfg.data.template)([q for q, _ in PAIRS], [p for _, p in PAIRS])
    ours = megarank_scores_tp1(mg, enc["input_ids"], enc["attention_mask"])
    assert (scores - ours).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------- in the ranks


def _score_tp2_pp2(ckpts: dict, ids, mask, save_root) -> dict:
    from megarank.checkpoint import (
        load_checkpoint_config,
        load_model_weights,
        save_model_weights,
    )
    from megarank.scoring.batched import score_batches
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    out = {}
    pairs = [(str(i), "d") for i in range(ids.shape[0])]
    for name, ckpt in ckpts.items():
        cfg = load_checkpoint_config(ckpt)
        for tp, pp in ((2, 1), (1, 2)):
            init_distributed(tp, pp)
            parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            model = build_model(cfg.model, parallel)
            load_model_weights(model, ckpt)
            scores = score_batches(model, [(pairs, {"input_ids": ids, "attention_mask": mask})])
            out[(name, tp, pp)] = torch.tensor([scores[p] for p in pairs])
            if tp == 2:  # what a TP=2 training run would save
                save_model_weights(model, f"{save_root}/{name}/model")
    return out


@pytest.fixture(scope="module")
def spawned(converted, tmp_path_factory):
    save_root = tmp_path_factory.mktemp("saved_tp2")
    ids, mask = random_batch()
    ckpts = {name: str(converted[name][1]) for name in SPAWNED}
    results = run_distributed(_score_tp2_pp2, 2, ckpts, ids, mask, str(save_root), timeout=300)
    return results[0], save_root, (ids, mask)


@pytest.mark.parametrize("case", SPAWNED)
def test_megarank_tp2_and_pp2_score_like_the_hf_export(converted, spawned, case):
    scores, _, (ids, mask) = spawned
    theirs = hf_scores(converted[case][2], ids, mask, "eager")
    for tp, pp in ((2, 1), (1, 2)):
        assert (scores[(case, tp, pp)] - theirs).abs().max().item() <= TOL, (case, tp, pp)


@pytest.mark.parametrize("case", SPAWNED)
def test_checkpoint_saved_at_tp2_exports_bit_exact(converted, spawned, tmp_path, case):
    _, save_root, _ = spawned
    _, mg, export = converted[case]
    saved = save_root / case
    for f in ("config.yaml", "megarank_checkpoint.json"):
        shutil.copy(mg / f, saved / f)
    shutil.copytree(mg / "tokenizer", saved / "tokenizer")
    assert main(["megatron-to-hf", str(saved), str(tmp_path / "out"), "--quiet"]) == 0
    a, b = read_safetensors_folder(export), read_safetensors_folder(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
