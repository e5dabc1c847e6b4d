"""Batch shapes across pipeline stages and forward calls across data-parallel ranks (2 spawned gloo ranks).

- Pipeline parallel pads like one process does: each micro-batch to its own longest pair rounded up to
  ``data.pad_to_multiple_of``, also when that exceeds ``data.max_length`` (100 -> 104) and when micro-batches of
  one step differ in length; the stages exchange each activation's shape (megatron's ``variable_seq_lengths``),
  with ``batch_p2p_comm`` on and off. One ``train_step`` at PP=2 gives the loss, grad norm and gradients of
  the same step at PP=1, and ``score_batches`` at PP=2 gives the PP=1 scores.
- Evaluation makes the same number of forward calls on every data-parallel rank (an odd number of batches at
  DP=2) and still returns the scores of a plain per-batch forward.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
MAX_LENGTH = 100  # not a multiple of pad_to_multiple_of (8): a truncated pair pads to 104
GROUP = 5
RTOL = 1e-5


def _config(pp: int):
    from megarank.config import load_config

    return load_config(TINY, [f"parallel.pipeline_model_parallel_size={pp}", "parallel.use_distributed_optimizer=false",
                              f"data.max_length={MAX_LENGTH}", f"data.n_passages={GROUP}", "train.clip_grad=0",
                              "train.lr_warmup_steps=0"])


def _texts(n: int, length: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghij klmnop qrstuv wxyz"
    return ["".join(letters[i] for i in torch.randint(0, len(letters), (length + k,), generator=g)) for k in range(n)]


def _micro_batches(pair_tokenizer) -> list:
    """Two micro-batches of one query group each: long passages (cut to max_length) and short ones."""
    from megarank.data import Batcher

    long_group = ("a long query " * 3, _texts(GROUP, 200, 1))
    short_group = ("q", _texts(GROUP, 4, 2))
    return Batcher(pair_tokenizer).micro_batches([long_group, short_group], micro_batch_size=1)


def _eval_batches(pair_tokenizer) -> list:
    """Three batches of unequal lengths, as evaluation builds them (longest first), pairs named by index."""
    from megarank.data import Batcher

    passages = _texts(4, 150, 3) + _texts(4, 30, 4) + _texts(2, 3, 5)
    pairs = [("q", str(i)) for i in range(len(passages))]
    corpus = {str(i): p for i, p in enumerate(passages)}
    return list(Batcher(pair_tokenizer).scoring_batches(pairs, {"q": "what is it"}, corpus, batch_size=4))


def _count_forwards(model) -> list:
    calls = []
    real = model.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    model.forward = counted
    return calls


def _global_names(model, pp: int) -> dict:
    """{local parameter name: name at PP=1} (this stage's layers are numbered from its first global layer)."""
    from megatron.core import parallel_state

    offset = parallel_state.get_pipeline_model_parallel_rank() * model.config.num_layers // pp
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + offset)
        out[name] = ".".join(parts)
    return out


def _run_layout(pp: int, start: dict | None, batch_p2p: bool = True) -> dict:
    from megatron.core import parallel_state

    from megarank.scoring.batched import score_batches
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir
    from megarank.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from megarank.training.step import train_step

    cfg = _config(pp)
    init_distributed(pp=pp, seed=cfg.train.seed)
    pair_tokenizer = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))
    model = build_model(cfg.model, cfg.parallel)
    model.config.batch_p2p_comm = batch_p2p
    names = _global_names(model, pp)
    params = dict(model.named_parameters())
    if start is not None:  # the PP=1 model's initial weights, this stage's share of them
        with torch.no_grad():
            for local, global_name in names.items():
                params[local].copy_(start[global_name])
    out = {"variable_seq_lengths": model.config.variable_seq_lengths,
           "start": {names[n]: p.detach().clone() for n, p in params.items()}}

    # Evaluation first (the step below changes the weights). At PP=1 the world is DP=2: 3 batches over 2 ranks.
    batches = _eval_batches(pair_tokenizer)
    calls = _count_forwards(model)
    out["eval_shapes"] = [tuple(b["input_ids"].shape) for _, b in batches]
    out["scores"] = score_batches(model, batches)
    out["eval_forwards"] = len(calls)
    if pp == 1:  # a plain forward per batch on this rank: the DP=1 scores
        with torch.no_grad():
            model.eval()
            out["direct_scores"] = {
                pair: s for pairs, b in batches
                for pair, s in zip(pairs, model(b["input_ids"], b["attention_mask"])[:, 0].tolist())}
            model.train()

    micro = _micro_batches(pair_tokenizer)
    out["train_shapes"] = [tuple(b["input_ids"].shape) for b in micro]
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(ddp, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    out["step"] = train_step(ddp, optimizer, scheduler, micro, cfg.train.loss)
    out["grads"] = {names[n]: p.main_grad.detach().clone() for n, p in params.items()}  # reduced over DP
    out["after"] = {names[n]: p.detach().clone() for n, p in params.items()}
    out["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


def _runs() -> dict:
    ref = _run_layout(1, None)
    return {"pp1": ref, "pp2": _run_layout(2, ref["start"]), "pp2-unbatched": _run_layout(2, ref["start"], False)}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_runs, 2, timeout=240)


def _union(per_rank: list, key: str) -> dict:
    """The global-named tensors of all pipeline stages."""
    return {name: t for r in per_rank for name, t in r[key].items()}


def test_batches_are_padded_per_batch_not_to_max_length(runs):
    ranks = runs
    for layout in ("pp1", "pp2"):
        r = ranks[0][layout]
        # the cut pairs pad to 104 (> max_length), the short micro-batch far below max_length
        assert r["train_shapes"][0] == (GROUP, 104) and r["train_shapes"][1][1] < 48, r["train_shapes"]
        assert [s[1] for s in r["eval_shapes"]][0] == 104 and r["eval_shapes"][-1][1] < 48, r["eval_shapes"]
        assert all(s[1] % 8 == 0 for s in r["train_shapes"] + r["eval_shapes"])
    assert ranks[0]["pp2"]["variable_seq_lengths"] and not ranks[0]["pp1"]["variable_seq_lengths"]


@pytest.mark.parametrize("layout", ["pp2", "pp2-unbatched"])
def test_pipeline_step_matches_one_stage(runs, layout):
    ranks = runs
    ref = ranks[0]["pp1"]["step"]
    last = [r[layout] for r in ranks if r[layout]["last_stage"]]
    assert len(last) == 1
    got = last[0]["step"]
    assert not ref["skipped"] and not got["skipped"]
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL)
    # clip_grad 0: the norm is still computed (megatron's step returns None then), on every stage alike
    assert ref["grad_norm"] > 0
    for r in ranks:
        assert r[layout]["step"]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
    for what in ("grads", "after"):
        expected, actual = ranks[0]["pp1"][what], _union([r[layout] for r in ranks], what)
        assert sorted(actual) == sorted(expected)
        for key, e in expected.items():
            if what == "grads":
                assert e.abs().max() > 0, f"{key}: reference gradient is all zero"
            torch.testing.assert_close(actual[key], e, rtol=RTOL, atol=1e-7, msg=lambda m: f"{what} {key}: {m}")


def test_pipeline_scores_match_one_stage(runs):
    ranks = runs
    ref = ranks[0]["pp1"]["direct_scores"]
    assert len(ref) == 10
    for r in ranks:
        for layout in ("pp2", "pp2-unbatched"):
            got = r[layout]["scores"]
            assert sorted(got) == sorted(ref)
            for pair, s in ref.items():
                assert got[pair] == pytest.approx(s, rel=RTOL, abs=1e-6), (layout, pair)


def test_every_data_parallel_rank_makes_the_same_number_of_forwards(runs):
    ranks = runs
    # 3 batches at DP=2: 2 forward calls on each rank (rank 1's second one is the dropped padding forward)
    assert [r["pp1"]["eval_forwards"] for r in ranks] == [2, 2]
    ref = ranks[0]["pp1"]["direct_scores"]
    for r in ranks:
        assert r["pp1"]["scores"] == pytest.approx(ref, rel=1e-6)
    # PP=2 (DP=1): every batch on both stages
    assert [r["pp2"]["eval_forwards"] for r in ranks] == [3, 3]
