"""`megarank.Reranker`, the Python API: a step folder, a run folder and a Hugging Face folder (the source model and
its export, converted in memory) load the same weights and score the same (<= 1e-5, fp32) as the export under
`transformers`; scores come in input order, `rerank` sorts best first, a model in memory can be wrapped, bad
folders are one-line CheckpointErrors, `load_global_tensors` equals `load_model_weights` at TP=1 and TP=2, and the
README's "Use megarank from Python" block runs as written.

The tiny model: GQA 4/2 heads, Llama-3 RoPE scaling, temperature 2, vocabulary 301 converted with
--make-vocab-size-divisible-by 1 (301 stored rows: a TP=2 model has 302, so loading there relies on the
embedding's row mismatch being zero-filled).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint_tools.cli import main as convert
from tests.dist_utils import run_distributed
from tests.helpers_hf import make_hf_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
PAIRS = [("what is x?", "x is the 24th letter of the alphabet"), ("hello", "world"),
         ("a b c", "d e f g h i j k l m n o p"), ("é ü?", "naïve café \n with lines"), ("q", "")]
DIVISIBLE_BY_1 = ["model.make_vocab_size_divisible_by=1"]
# Long documents (hundreds of tokens, up to the model's max_length) for context-parallel scoring.
LONG_PAIRS = [("which letters come after x?", " ".join(f"y{i} z{i}" for i in range(300))),
              ("count", " ".join(str(i) for i in range(700)))]  # the HF side padded as the converted checkpoint was


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"hf": source HF folder, "step": converted checkpoint, "run": a run folder whose `latest` is a copy of it,
    "export": megatron-to-hf of it}."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("reranker_api")
    src = make_hf_llama(root / "hf", "llama_bidirec", seed=3, temperature=2.0, vocab_size=301)
    step = root / "mg"
    assert convert(["hf-to-megatron", str(src), str(step), "--make-vocab-size-divisible-by", "1", "--quiet"]) == 0
    assert convert(["megatron-to-hf", str(step), str(root / "export"), "--quiet"]) == 0
    run = root / "runs" / "quickstart" / "train"  # where the README's block looks, relative to `root`
    shutil.copytree(step, run / "step-3")
    (run / "latest").write_text("step-3\n")
    yield {"hf": src, "step": step, "run": run, "export": root / "export", "root": root}
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE")
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def rerankers(folders, one_rank):
    from megarank import Reranker

    out = {name: Reranker.from_checkpoint(folders[name], dtype="fp32") for name in ("step", "run", "export")}
    out["hf"] = Reranker.from_checkpoint(folders["hf"], dtype="fp32", overrides=DIVISIBLE_BY_1)
    return out


def transformers_scores(export, pair_tokenizer, pairs) -> torch.Tensor:
    """The export under transformers (its own modeling file), fed megarank's encoding of the pairs."""
    from transformers import AutoModelForSequenceClassification

    batch = pair_tokenizer([q for q, _ in pairs], [p for _, p in pairs])
    model = AutoModelForSequenceClassification.from_pretrained(str(export), trust_remote_code=True,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits[:, 0].float()


def tensors_of(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def test_step_run_and_hf_folders_load_the_same_weights_and_score_like_transformers(folders, rerankers):
    assert rerankers["run"].checkpoint == folders["run"] / "step-3", "a run folder resolves to its `latest` step"
    assert rerankers["hf"].checkpoint == folders["hf"]
    ref = tensors_of(rerankers["step"].model)
    for name in ("run", "hf"):  # the HF source converted in memory: the very tensors hf-to-megatron wrote
        got = tensors_of(rerankers[name].model)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    scores = {name: r.score(PAIRS) for name, r in rerankers.items()}
    ours = scores["step"]
    assert ours.dtype == torch.float32 and ours.shape == (len(PAIRS),) and ours.device.type == "cpu"
    assert ours.std() > 0
    for name, got in scores.items():
        assert (got - ours).abs().max().item() <= TOL, name
    theirs = transformers_scores(folders["export"], rerankers["step"].pair_tokenizer, PAIRS)
    assert (theirs - ours).abs().max().item() <= TOL, (theirs, ours)
    assert (rerankers["step"].dtype, rerankers["step"].dtype_reason) == ("fp32", "requested")


def test_a_run_folders_latest_file_means_the_run_folder(folders, rerankers, one_rank):
    """`runs/x/latest` (what a user tab-completes to) loads the step it names, not an error about a file."""
    from megarank import Reranker

    r = Reranker.from_checkpoint(folders["run"] / "latest", dtype="fp32")
    assert r.checkpoint == folders["run"] / "step-3"
    assert torch.equal(r.score(PAIRS), rerankers["run"].score(PAIRS))


def test_scores_come_in_input_order_whatever_the_batching(rerankers):
    from megarank import Reranker

    r = rerankers["step"]
    ref = r.score(PAIRS)
    assert torch.allclose(r.score(PAIRS[::-1]), ref.flip(0), atol=TOL, rtol=0)
    alone = torch.cat([r.score([p]) for p in PAIRS])
    assert (alone - ref).abs().max().item() <= TOL
    # a live model wrapped as is, with tiny padded batches: the same scores, in the same order
    live = Reranker(r.model, r.pair_tokenizer, r.cfg)
    live.batch_tokens, live.batch_size, live.packing = 0, 2, False
    assert (live.score(PAIRS) - ref).abs().max().item() <= TOL
    assert live.model_tokens > 0 and live.checkpoint is None
    assert r.score([]).shape == (0,)
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        r.score([("q", "p"), "not a pair"])


def test_rerank_sorts_best_first(rerankers):
    r = rerankers["step"]
    query = "what is x?"
    passages = [p for _, p in PAIRS]
    scores = r.score([(query, p) for p in passages]).tolist()
    ranked = r.rerank(query, passages)
    assert sorted(i for i, _ in ranked) == list(range(len(passages)))
    assert [s for _, s in ranked] == sorted(scores, reverse=True)
    assert all(s == scores[i] for i, s in ranked)
    top = r.rerank(query, passages, top_k=2)
    assert top == ranked[:2] and top[0].index == max(range(len(scores)), key=scores.__getitem__)
    assert r.rerank(query, []) == []


def test_evaluate_beir_scores_what_score_gives(rerankers):
    from megarank.data import read_beir, sample_data_dir

    r = rerankers["step"]
    result = r.evaluate_beir(sample_data_dir(), "test", top_k=5, max_queries=2)
    metrics, first_stage, scores = result  # unpacks like the old tuple
    assert set(metrics) == {"nDCG@10", "RR@10", "MRR@10", "R@5"} and set(first_stage) == set(metrics)  # recall capped at top_k
    assert len(scores) == 2 and all(len(docs) <= 5 for docs in scores.values())
    beir = read_beir(str(sample_data_dir()), "test")
    qid = next(iter(scores))
    docids = list(scores[qid])
    direct = r.score([(beir.queries[qid], beir.corpus[d]) for d in docids])
    assert (direct - torch.tensor([scores[qid][d] for d in docids])).abs().max().item() <= TOL


def test_a_folder_that_cannot_be_loaded_is_a_one_line_checkpoint_error(tmp_path, one_rank):
    from megarank import Reranker
    from megarank.checkpoint import CheckpointError

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "badhf").mkdir()
    (tmp_path / "badhf" / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    cases = {tmp_path / "missing": "does not exist", tmp_path / "notes": "is not a megarank checkpoint",
             tmp_path / "badhf": str(tmp_path / "badhf")}
    for path, needle in cases.items():
        with pytest.raises(CheckpointError) as e:
            Reranker.from_checkpoint(path)
        assert needle in str(e.value) and "\n" not in str(e.value), (path, str(e.value))


def test_load_global_tensors_checks_keys_shapes_and_values(folders, rerankers):
    from checkpoint_tools.import_hf import hf_to_megatron_in_memory
    from megarank.checkpoint import CheckpointError
    from megarank.checkpoint.weights import load_global_tensors

    model = rerankers["hf"].model
    _, tensors, _ = hf_to_megatron_in_memory(folders["hf"], overrides=DIVISIBLE_BY_1)
    ref = {k: v.clone() for k, v in tensors_of(model).items()}
    emb = "embedding.word_embeddings.weight"
    # fewer stored embedding rows than the model has (a model padded further): the rest is zero-filled
    load_global_tensors(model, {**tensors, emb: tensors[emb][:290]}, where="cut")
    got = tensors_of(model)
    assert torch.equal(got[emb][:290], ref[emb][:290]) and not got[emb][290:].any()
    for key in ref:
        if key != emb:
            assert torch.equal(got[key], ref[key]), key
    key = "decoder.layers.self_attention.linear_qkv.weight"
    bad = {"missing": ({k: v for k, v in tensors.items() if k != key}, f"no tensor {key}"),
           "shape": ({**tensors, key: tensors[key][:, :-1]}, f"tensor {key} has shape"),
           "nan": ({**tensors, key: tensors[key].clone().fill_(float("nan"))}, "NaN")}
    for name, (mapping, needle) in bad.items():
        with pytest.raises(CheckpointError, match=re.escape(needle)):
            load_global_tensors(model, mapping, where=f"case {name}")
    load_global_tensors(model, tensors, where="restore")  # leave the module's model as it was
    assert all(torch.equal(tensors_of(model)[k], ref[k]) for k in ref)


def test_readme_block_runs_as_written(folders, rerankers, monkeypatch):
    """The README's block, unchanged, from a folder where `runs/quickstart/train` is the tiny run folder."""
    from megarank import Reranker

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use megarank from Python"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and 'Reranker.from_checkpoint("runs/quickstart/train")' in blocks[0]
    monkeypatch.chdir(folders["root"])
    ns = {"__name__": "__main__"}
    exec(compile(blocks[0], "README block", "exec"), ns)
    auto = Reranker.from_checkpoint(folders["step"])  # the block's dtype="auto", on the same folder
    assert (ns["scores"] - auto.score(ns["pairs"])).abs().max().item() <= TOL
    # the block reranks the same two passages for the same query: its best is the higher of its two scores
    assert len(ns["ranked"]) == 1 and ns["best"] == ns["ranked"][0]
    assert abs(ns["best"].score - ns["scores"].max().item()) <= TOL


# ----------------------------------------------------------------------------------------------- in two ranks


def _two_ranks(step, hf, pairs) -> dict:
    """TP=2 from the step folder and from the HF folder (weights compared shard by shard), then TP=1 x DP=2."""
    from megarank import Reranker

    tp2 = ["parallel.tensor_model_parallel_size=2"]
    a = Reranker.from_checkpoint(step, dtype="fp32", overrides=tp2)
    b = Reranker.from_checkpoint(hf, dtype="fp32", overrides=tp2 + DIVISIBLE_BY_1)
    sa, sb = tensors_of(a.model), tensors_of(b.model)
    out = {"same_shards": sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa),
           "rows": tuple(sa["embedding.word_embeddings.weight"].shape), "tp2_step": a.score(pairs),
           "tp2_hf": b.score(pairs)}
    out["dp2"] = Reranker.from_checkpoint(step, dtype="fp32").score(pairs)  # new groups: TP=1, DP=2
    # Context parallelism: each pair's tokens split over the two ranks (packed, then padded batches).
    cp2 = ["parallel.context_parallel_size=2"]
    out["cp2"] = Reranker.from_checkpoint(step, dtype="fp32", overrides=cp2).score(pairs + LONG_PAIRS)
    out["cp2_padded"] = Reranker.from_checkpoint(step, dtype="fp32", overrides=cp2 + ["data.packing=false"]).score(
        pairs + LONG_PAIRS)
    return out


def test_tp2_dp2_and_cp2_load_the_same_shards_and_give_every_rank_every_score(folders, rerankers):
    ref = rerankers["step"].score(PAIRS)
    long_ref = rerankers["step"].score(PAIRS + LONG_PAIRS)
    results = run_distributed(_two_ranks, 2, str(folders["step"]), str(folders["hf"]), PAIRS, timeout=300)
    for rank, out in enumerate(results):
        assert out["same_shards"], rank
        assert out["rows"] == (151, 64), "302 padded rows at TP=2 (301 stored), half per rank"
        for name in ("tp2_step", "tp2_hf", "dp2"):
            assert (out[name] - ref).abs().max().item() <= TOL, (rank, name)
        for name in ("cp2", "cp2_padded"):
            assert (out[name] - long_ref).abs().max().item() <= TOL, (rank, name)


def test_a_checkpoint_trained_at_tp2_scores_in_one_process_unless_tp2_is_asked_for(folders, rerankers, tmp_path,
                                                                                    one_rank):
    """Its saved layout does not fit one process: the scorer falls back to TP 1 x PP 1 (checkpoints load at any
    layout) and scores as the TP 1 checkpoint does; a layout the caller asks for and the world cannot hold is one
    ConfigError, not a traceback from megatron's group set-up."""
    import yaml

    from megarank import Reranker
    from megarank.checkpoint import write_manifest
    from megarank.config import ConfigError

    step = tmp_path / "tp2-step"
    shutil.copytree(folders["step"], step)
    saved = yaml.safe_load((step / "config.yaml").read_text())
    saved["parallel"]["tensor_model_parallel_size"] = 2  # as a run trained at TP=2 records it
    (step / "config.yaml").write_text(yaml.safe_dump(saved))
    write_manifest(step)
    r = Reranker.from_checkpoint(step, dtype="fp32")
    assert r.cfg.parallel.tensor_model_parallel_size == 1
    assert torch.equal(r.score(PAIRS), rerankers["step"].score(PAIRS))
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        Reranker.from_checkpoint(step, dtype="fp32", overrides=["parallel.tensor_model_parallel_size=2"])
