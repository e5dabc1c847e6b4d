"""Token-budget scoring batches (megarank/data/batcher.py) for `evaluate` / `rerank` and training-time evaluation.

The split itself (pure Python: order, the budget, the pair bound, a single long pair, packed costs), then scores on
the tiny model (fp32): budget batches give the fixed batches' scores at TP=1, packed, and at DP=2 (2 spawned gloo
ranks), where every rank must also make the same number of forwards (megarank/scoring/batched.py). The CLI's
``--batch-tokens`` / ``--dtype`` are in tests/test_evaluate.py (they need a trained checkpoint).
"""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megarank.data.batcher import Batcher, batch_cost, split_by_budget
from tests.dist_utils import run_distributed

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _split(order, lengths, batch_size, budget, packed=False, multiple=1) -> list:
    """The scoring split of the pairs ``order`` (indices into ``lengths``), as lists of indices."""
    spans = split_by_budget(((1, lengths[i], lengths[i]) for i in order), budget, batch_size or 0, packed, multiple)
    return [[order[k] for k in span] for span in spans]


def _check_split(batches, order, lengths, batch_size, budget, packed, multiple):
    """What every budget split must satisfy; returns the batches' costs."""
    assert [i for b in batches for i in b] == list(order), "every index once, in the given order"
    cap = batch_size or len(order)
    costs = []
    for k, b in enumerate(batches):
        assert 1 <= len(b) <= cap
        cost = batch_cost(len(b), max(lengths[i] for i in b), sum(lengths[i] for i in b), packed, multiple)
        assert cost <= budget or len(b) == 1, f"batch {k} costs {cost} > {budget} with {len(b)} pairs"
        if k + 1 < len(batches) and len(b) < cap:  # greedy: the next pair did not fit
            nxt = b + [batches[k + 1][0]]
            assert batch_cost(len(nxt), max(lengths[i] for i in nxt), sum(lengths[i] for i in nxt), packed,
                              multiple) > budget
        costs.append(cost)
    return costs


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("batch_size", [None, 0, 5])
def test_budget_split_keeps_order_budget_and_bound(packed, batch_size):
    rng = random.Random(7)
    lengths = [rng.randint(3, 300) for _ in range(400)]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for budget in (256, 1000, 4096):
        batches = _split(order, lengths, batch_size, budget, packed, 8)
        _check_split(batches, order, lengths, batch_size, budget, packed, 8)
        if not batch_size:  # short pairs go in larger batches
            assert len(batches[-1]) > len(batches[0])


def test_a_pair_longer_than_the_budget_is_a_batch_alone():
    lengths = [500, 40, 30, 20, 900]
    order = [4, 0, 1, 2, 3]
    batches = _split(order, lengths, None, 256, False, 8)
    assert batches[:2] == [[4], [0]], batches  # 904 and 504 padded tokens, each over 256, each alone
    assert batches[2:] == [[1, 2, 3]], batches  # 3 x 40 = 120 <= 256


def test_padded_cost_rounds_the_longest_and_packed_the_stream():
    assert batch_cost(3, 17, 40, packed=False, multiple=8) == 3 * 24
    assert batch_cost(3, 17, 40, packed=True, multiple=8) == 40
    assert batch_cost(3, 17, 41, packed=True, multiple=16) == 48
    assert batch_cost(2, 5, 9, packed=False, multiple=0) == 10  # no multiple = 1
    # the training split's cost is the same function of the groups' rows
    rows = [[17, 3], [20]]
    tok = SimpleNamespace(pad_id=0, pad_to_multiple_of=8)
    assert Batcher(tok).cost([n for g in rows for n in g]) == batch_cost(3, 20, 40, False, 8)
    assert Batcher(tok, packed=True).cost([n for g in rows for n in g]) == batch_cost(3, 20, 40, True, 8)


def test_without_a_budget_batches_are_fixed_size_chunks():
    assert _split(list(range(7)), [1] * 7, 3, 0) == [[0, 1, 2], [3, 4, 5], [6]]
    assert [list(r) for r in split_by_budget([(5, 9, 30)] * 7, 0, 3)] == [[0, 1, 2], [3, 4, 5], [6]]  # groups too


def _tokenizer():
    from megarank.config import load_config
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir

    cfg = load_config(TINY, [])
    return make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))


def test_scoring_batches_with_a_budget_sort_longest_first_and_pad_each_batch():
    from megarank.data import candidate_pairs, read_beir, read_run, sample_data_dir

    tok = _tokenizer()
    folder = sample_data_dir()
    beir = read_beir(str(folder), "test")
    run = read_run(str(folder / "candidates" / "test.run.tsv"))
    pairs = candidate_pairs(beir.queries, beir.corpus, run, 100)
    batcher = Batcher(tok)
    batches = list(batcher.scoring_batches(pairs, beir.queries, beir.corpus, None, batch_tokens=1024))
    seen = [p for chunk, _ in batches for p in chunk]
    assert sorted(seen) == sorted(pairs) and len(seen) == len(pairs)
    lengths = [n for chunk, b in batches for n in b["attention_mask"].sum(1).tolist()]
    assert lengths == sorted(lengths, reverse=True)
    for chunk, b in batches:
        assert b["input_ids"].shape[0] == len(chunk) and b["input_ids"].shape[1] % 8 == 0
        assert b["input_ids"].numel() <= 1024 or len(chunk) == 1
    assert len({len(c) for c, _ in batches}) > 1, "the budget should give batches of different sizes here"
    with pytest.raises(ValueError, match="batch_tokens must be >= 0"):
        next(batcher.scoring_batches(pairs, beir.queries, beir.corpus, 4, batch_tokens=-1))
    with pytest.raises(ValueError, match="batch_size must be >= 1 without a token budget"):
        next(batcher.scoring_batches(pairs, beir.queries, beir.corpus, None))


def test_config_rejects_a_negative_eval_batch_tokens():
    from megarank.config import ConfigError, load_config, validate

    validate(load_config(TINY, ["data.eval_batch_tokens=4096", "data.eval_batch_size=0"]), check_environment=False)
    with pytest.raises(ConfigError, match=r"data\.eval_batch_tokens must be >= 0 \(got -1"):
        validate(load_config(TINY, ["data.eval_batch_tokens=-1"]), check_environment=False)
    with pytest.raises(ConfigError, match=r"data\.eval_batch_size must be positive without data\.eval_batch_tokens"):
        validate(load_config(TINY, ["data.eval_batch_tokens=0", "data.eval_batch_size=0"]), check_environment=False)


# ------------------------------------------------------------------------------------------- scores, tiny model


def _model():
    from megarank.config import load_config
    from megarank.model import build_model

    torch.manual_seed(1234)
    cfg = load_config(TINY, [])
    return build_model(cfg.model, cfg.parallel).eval()


def _max_diff(a: dict, b: dict) -> float:
    assert {q: set(d) for q, d in a.items()} == {q: set(d) for q, d in b.items()}
    return max(abs(a[q][d] - b[q][d]) for q in a for d in a[q])


def _evaluate(model, tok, **kw):
    from megarank.data import sample_data_dir
    from megarank.scoring.beir import evaluate_beir

    return evaluate_beir(model, tok, str(sample_data_dir()), "test", top_k=100, **kw)




@pytest.mark.parametrize("packing", [False, True])
def test_budget_batches_give_the_fixed_batches_scores(one_rank, packing):
    model, tok = _model(), _tokenizer()
    ref = _evaluate(model, tok, batch_size=32)
    spread = max(s for d in ref[2].values() for s in d.values()) - min(s for d in ref[2].values() for s in d.values())
    assert spread > 1e-3, "scores must differ between documents for the comparison to mean something"
    for batch_size, budget in ((None, 700), (3, 2048), (None, 64)):  # 64: every pair alone (all are longer)
        got = _evaluate(model, tok, batch_size=batch_size, batch_tokens=budget, packing=packing)
        assert _max_diff(got[2], ref[2]) <= 1e-6, (batch_size, budget, packing)
        assert got[0] == pytest.approx(ref[0], abs=1e-9)


def _dp2_scores(budget: int):
    """One DP=2 rank: scores with fixed batches and with ``budget``, and the forwards each made."""
    from megarank.parallel.init import init_distributed

    init_distributed(tp=1, pp=1)
    model, tok = _model(), _tokenizer()
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    out = {}
    for name, kw in (("fixed", {"batch_size": 32}), ("budget", {"batch_size": None, "batch_tokens": budget}),
                     ("packed", {"batch_size": None, "batch_tokens": budget, "packing": True})):
        before = len(calls)
        out[name] = _evaluate(model, tok, **kw)[2]
        out[name + "_forwards"] = len(calls) - before
    return out


def test_dp2_budget_scores_and_equal_forward_counts():
    from megarank.data import candidate_pairs, read_beir, read_run, sample_data_dir

    # A budget that gives an odd number of batches, so that one rank makes the padding forward in the last round.
    tok = _tokenizer()
    folder = sample_data_dir()
    beir = read_beir(str(folder), "test")
    run = read_run(str(folder / "candidates" / "test.run.tsv"))
    pairs = candidate_pairs(beir.queries, beir.corpus, {q: d for q, d in run.items() if q in beir.qrels}, 100)
    batcher = Batcher(tok)  # padded: the "budget" run below
    budget = next(b for b in range(600, 4000, 50)
                  if len(list(batcher.scoring_batches(pairs, beir.queries, beir.corpus, None, batch_tokens=b))) % 2)
    ranks = run_distributed(_dp2_scores, 2, budget, timeout=240)
    for name in ("fixed", "budget", "packed"):
        assert ranks[0][name + "_forwards"] == ranks[1][name + "_forwards"], name
        assert _max_diff(ranks[0][name], ranks[1][name]) == 0.0, "every rank gets all the scores"
    assert _max_diff(ranks[0]["budget"], ranks[0]["fixed"]) <= 1e-6
    assert _max_diff(ranks[0]["packed"], ranks[0]["fixed"]) <= 1e-6
    n_batches = len(list(batcher.scoring_batches(pairs, beir.queries, beir.corpus, None, batch_tokens=budget)))
    assert ranks[0]["budget_forwards"] == (n_batches + 1) // 2


def test_bf16_model_loads_fp32_weights_as_their_bf16_rounding(one_rank, tmp_path):
    """--dtype bf16 on an fp32 checkpoint: torch_dist casts on load (DCP copy_ into the model's tensors)."""
    from megarank import checkpoint as ckpt
    from megarank.config import load_config
    from megarank.model import build_model

    model = _model()
    ckpt.save_model_weights(model, tmp_path / "ck" / "model")  # a folder with model/ is a checkpoint to load
    cfg = load_config(TINY, ["model.dtype=bf16"])
    bf16 = build_model(cfg.model, cfg.parallel)
    ckpt.load_model_weights(bf16, tmp_path / "ck")
    ref = model.state_dict()
    for k, v in bf16.state_dict().items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert v.dtype == torch.bfloat16, k
            assert torch.equal(v, ref[k].to(torch.bfloat16)), k
