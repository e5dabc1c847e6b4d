"""Packed micro-batches (megarank/data/packing.py, built by megarank/data/batcher.py) give the padded batches'
scores and gradients.

The batcher, pure Python: packed batches built straight from token ids equal the old pad-then-pack route on random
rows (training micro-batches, fixed and token budget, and scoring batches), the length-multiple rule, the token
budget's split of whole groups.

In one process (TP=PP=1, the tiny config, fp32): the packed layout itself (cu_seqlens, the end-padding segment),
scores and every parameter gradient of packed vs padded for each pooling and both local packed-attention
strategies, attention that never crosses a sequence boundary, RoPE that restarts in every sequence.

In 2 spawned gloo ranks, through megarank's own ``forward_step`` and a megatron DDP wrapper (so
``finalize_model_grads`` does the DP all-reduce and the sequence-parallel norm-grad all-reduce as in
training): DP=2 (different data on each rank), TP=2, TP=2 + SP (stream padded to a multiple of TP), PP=2
(variable_seq_lengths); in 4 ranks, TP=2 + SP x PP=2. At each layout the padded step runs first, then the packed step on the same model;
scores, loss and every rank's local (sharded) gradients must match to fp32 tolerance.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
PAD_ID, GROUP = 258, 5
RTOL = 1e-5  # fp32: max |diff| <= RTOL * max |reference|


def assert_rel_close(actual, expected, what: str, rtol: float = RTOL):
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert diff <= rtol * scale + 1e-12, f"{what}: max |diff| {diff:.3g} > {rtol} x max |ref| {scale:.3g}"


def padded_batch(lengths, seed: int = 0, multiple: int = 8) -> dict:
    """Random ids right-padded to the longest length rounded up to ``multiple``; a training batch dict."""
    g = torch.Generator().manual_seed(seed)
    seq = -(-max(lengths) // multiple) * multiple
    ids = torch.randint(0, 256, (len(lengths), seq), generator=g)
    valid = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    ids[~valid] = PAD_ID
    relevance = torch.zeros(len(lengths) // GROUP, GROUP)
    relevance[:, 0] = 1.0
    return {"input_ids": ids, "attention_mask": valid, "group_size": GROUP, "relevance": relevance}


# --------------------------------------------------------------------------------------------- one process




def _build(*overrides):
    from megarank.config import load_config
    from megarank.model import build_model

    torch.manual_seed(1234)
    return build_model(load_config(TINY, list(overrides)).model, load_config(TINY, []).parallel)


def _scores_and_grads(model, batch):
    from megarank.model.inputs import model_inputs

    model.zero_grad()
    args, kwargs = model_inputs(batch, "cpu")
    scores = model(*args, **kwargs)
    # A loss that weighs every score differently, so a permuted or mixed-up score shows in the gradients.
    (scores[:, 0] * torch.linspace(-1.0, 2.0, scores.shape[0])).sum().backward()
    return scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_pack_layout_and_end_padding_segment():
    from megarank.data.packing import pack_padded, pack_rows, packing_multiple
    from megarank.model.inputs import PackedSequences, model_inputs

    batch = padded_batch([5, 3, 7, 11])
    packed = pack_padded(batch, PAD_ID, multiple=16)
    layout = packed["packed_seq_params"]
    assert layout.cu_seqlens.tolist() == [0, 5, 8, 15, 26, 32] and layout.cu_seqlens.dtype == torch.int32
    p = model_inputs(packed, "cpu")[1]["packed_seq_params"]  # what the model gets: megatron's PackedSeqParams
    assert isinstance(p, PackedSequences)
    assert packed["input_ids"].shape == (1, 32) and packed["group_size"] == GROUP
    assert p.qkv_format == "thd" and p.seqlens == layout.seqlens == (5, 3, 7, 11, 6) and p.num_sequences == 4
    assert p.cu_seqlens_q.tolist() == [0, 5, 8, 15, 26, 32] and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_kv is p.cu_seqlens_q and p.max_seqlen_q == p.max_seqlen_kv == layout.max_seqlen == 11
    assert packed["attention_mask"].sum() == 26 and not packed["attention_mask"][0, 26:].any()
    assert torch.equal(packed["input_ids"][0, 5:8], batch["input_ids"][1, :3])
    assert (packed["input_ids"][0, 26:] == PAD_ID).all()
    assert pack_rows([[1, 2], [3]], PAD_ID, multiple=3)["packed_seq_params"].seqlens == (2, 1)  # no padding needed
    assert packing_multiple(8, 2) == 8 and packing_multiple(None, 3) == 3 and packing_multiple(6, 4) == 12
    with pytest.raises(ValueError, match="empty"):
        pack_rows([[1], []], PAD_ID)


# --------------------------------------------------------------------------------------------- the batcher


class _RowTokenizer:
    """A pair tokenizer stand-in: the pair (q, p) is the id row ``rows[p]``; pads as PairTokenizer does."""

    pad_id = PAD_ID

    def __init__(self, rows: dict, pad_to_multiple_of):
        self.rows, self.pad_to_multiple_of = rows, pad_to_multiple_of

    def encode(self, queries, passages):
        return [list(self.rows[p]) for p in passages]

    def lengths(self, queries, passages):
        return [len(self.rows[p]) for p in passages]

    def pad(self, rows):
        from megarank.data.tokenizer import PairTokenizer

        return PairTokenizer.pad(self, rows)

    def __call__(self, queries, passages):
        return self.pad(self.encode(queries, passages))


def _random_rows(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (n,), generator=g).tolist()
    return {f"p{i}": torch.randint(0, 256, (k,), generator=g).tolist() for i, k in enumerate(lengths)}


def _old_pad_then_pack(padded: dict, pad_id: int, multiple: int) -> dict:
    """The route megarank took before the batcher: a padded batch un-padded with .tolist() and packed, inline."""
    ids, valid = padded["input_ids"], padded["attention_mask"]
    rows = [ids[i, :n].tolist() for i, n in enumerate(valid.sum(1).tolist())]
    lengths = [len(r) for r in rows]
    real = sum(lengths)
    total = -(-real // multiple) * multiple
    segments = lengths + ([total - real] if total > real else [])
    stream = torch.full((1, total), pad_id, dtype=torch.long)
    stream[0, :real] = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    mask = torch.zeros((1, total), dtype=torch.bool)
    mask[0, :real] = True
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(segments, dtype=torch.int32).cumsum(0)
    return {"input_ids": stream, "attention_mask": mask, "seqlens": tuple(segments), "num_sequences": len(rows),
            "cu_seqlens": cu, "max_seqlen": max(segments),
            **{k: v for k, v in padded.items() if k not in ("input_ids", "attention_mask")}}


def _assert_same_packed(got: dict, ref: dict):
    from megarank.model.inputs import model_inputs

    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    layout = got["packed_seq_params"]
    assert layout.seqlens == ref["seqlens"] and layout.num_sequences == ref["num_sequences"]
    params = model_inputs(got, "cpu")[1]["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == params.cu_seqlens_kv.dtype == torch.int32
    assert torch.equal(params.cu_seqlens_q, ref["cu_seqlens"]) and torch.equal(params.cu_seqlens_kv, ref["cu_seqlens"])
    assert params.max_seqlen_q == params.max_seqlen_kv == ref["max_seqlen"]
    assert params.seqlens == ref["seqlens"] and params.num_sequences == ref["num_sequences"]
    extra = {k for k in ref if k not in ("input_ids", "attention_mask", "seqlens", "num_sequences", "cu_seqlens",
                                          "max_seqlen")}
    assert set(got) == extra | {"input_ids", "attention_mask", "packed_seq_params"}
    for key in extra:
        assert (torch.equal(got[key], ref[key]) and got[key].dtype == ref[key].dtype) if torch.is_tensor(ref[key]) \
            else got[key] == ref[key], key


@pytest.mark.parametrize("pad,tp", [(8, 1), (6, 4), (None, 3), (1, 1)])
def test_packed_from_ids_equals_the_old_pad_then_pack_route(pad, tp):
    """Training micro-batches (fixed and token budget) and scoring batches, on random rows: what the batcher packs
    straight from the ids is what padding, un-padding and packing gave, key for key and dtype for dtype."""
    from megarank.data.batcher import Batcher
    from megarank.data.packing import packing_multiple

    rows = _random_rows(60, seed=tp * 10 + (pad or 0))
    tok = _RowTokenizer(rows, pad)
    packed, padded = Batcher(tok, packed=True, tensor_parallel_size=tp), Batcher(tok, tensor_parallel_size=tp)
    assert packed.multiple == packing_multiple(pad, tp) and padded.multiple == (pad or 1)
    groups = [(f"q{g}", [f"p{g * 5 + j}" for j in range(5)]) for g in range(12)]
    for kw in ({"micro_batch_size": 5}, {"micro_batch_tokens": 300}):
        got = packed.micro_batches(groups, **kw)
        assert sum(len(b["relevance"]) for b in got) == len(groups) and (len(got) > 2)
        done = 0
        for b in got:  # the old route: the chunk's groups collated (padded), then packed
            chunk = groups[done : done + len(b["relevance"])]
            done += len(chunk)
            old = tok([q for q, ps in chunk for _ in ps], [p for _, ps in chunk for p in ps])
            relevance = torch.zeros(len(chunk), 5)
            relevance[:, 0] = 1.0
            old.update(group_size=5, relevance=relevance)
            if "micro_batch_tokens" in kw:
                old["loss_weight"] = len(chunk) * len(got) / len(groups)
            _assert_same_packed(b, _old_pad_then_pack(old, PAD_ID, packing_multiple(pad, tp)))
    # Padded, the batcher gives exactly what collating the groups gave (the tokenizer's padding).
    for k, b in enumerate(padded.micro_batches(groups, micro_batch_size=5)):
        chunk = groups[5 * k : 5 * k + 5]
        old = tok([q for q, ps in chunk for _ in ps], [p for _, ps in chunk for p in ps])
        assert set(b) == {"input_ids", "attention_mask", "group_size", "relevance"} and b["group_size"] == 5
        for key in ("input_ids", "attention_mask"):
            assert b[key].dtype == old[key].dtype and torch.equal(b[key], old[key]), key
    pairs = [("q", f"p{i}") for i in range(60)]
    for batch_size, budget in ((7, 0), (None, 250), (4, 400)):
        n = 0
        for chunk, b in packed.scoring_batches(pairs, {"q": "q"}, {p: p for _, p in pairs}, batch_size, budget):
            n += len(chunk)
            old = _old_pad_then_pack(tok(["q"] * len(chunk), [d for _, d in chunk]), PAD_ID, packing_multiple(pad, tp))
            _assert_same_packed(b, old)
        assert n == len(pairs)


def test_the_multiple_rule_and_what_every_batch_is_rounded_to():
    from megarank.data.batcher import Batcher

    rows = _random_rows(30, seed=5)
    for pad, tp, packed, multiple in ((8, 1, False, 8), (8, 4, False, 8), (None, 2, False, 1), (0, 1, False, 1),
                                      (8, 2, True, 8), (6, 4, True, 12), (None, 3, True, 3), (0, 1, True, 1)):
        batcher = Batcher(_RowTokenizer(rows, pad), packed=packed, tensor_parallel_size=tp)
        assert batcher.multiple == multiple, (pad, tp, packed)
        groups = [(f"q{g}", [f"p{g * 3 + j}" for j in range(3)]) for g in range(10)]
        pairs = [("q", p) for p in rows]
        batches = batcher.micro_batches(groups, micro_batch_size=3)
        batches += batcher.micro_batches(groups, micro_batch_tokens=200)
        batches += [b for _, b in batcher.scoring_batches(pairs, {"q": "q"}, {p: p for p in rows}, None, 300)]
        for b in batches:
            assert b["input_ids"].shape[1] % multiple == 0 and ("packed_seq_params" in b) == packed
            real = (b["packed_seq_params"].seqlens[: b["packed_seq_params"].num_sequences] if packed
                    else b["attention_mask"].sum(1).tolist())
            assert b["input_ids"].numel() == batcher.cost(real)  # what a budget counts is what the model runs


def test_batcher_refuses_unequal_empty_or_missing_sizes():
    from megarank.data.batcher import Batcher

    batcher = Batcher(_RowTokenizer(_random_rows(6, seed=1), 8), packed=True)
    for kw in ({"micro_batch_size": 2}, {"micro_batch_tokens": 100}):
        with pytest.raises(ValueError, match=r"same non-zero number of passages, got sizes \[2, 3\]"):
            batcher.micro_batches([("q", ["p0", "p1"]), ("q", ["p2", "p3", "p4"])], **kw)
        with pytest.raises(ValueError, match=r"same non-zero number of passages, got sizes \[0\]"):
            batcher.micro_batches([("q", [])], **kw)
        with pytest.raises(ValueError, match="empty list of query groups"):
            batcher.micro_batches([], **kw)
    for kw in ({}, {"micro_batch_size": 0}, {"micro_batch_tokens": -1, "micro_batch_size": 2}):
        with pytest.raises(ValueError, match="micro_batch_size >= 1 or train.micro_batch_tokens > 0"):
            batcher.micro_batches([("q", ["p0"])], **kw)


@pytest.mark.parametrize("strategy", ["bucket", "loop"])
@pytest.mark.parametrize("pooling", ["avg", "last", "cls"])
def test_packed_matches_padded_scores_and_gradients(one_rank, monkeypatch, strategy, pooling):
    import megarank.model.attention as attention
    from megarank.data.packing import pack_padded

    monkeypatch.setattr(attention, "PACKED_ATTENTION", strategy)
    model = _build(f"model.pooling={pooling}")
    lengths = [16, 11, 5, 1, 11, 12, 16, 3]  # equal lengths, a 1-token sequence, ragged buckets
    batch = padded_batch(lengths)
    ref_scores, ref_grads = _scores_and_grads(model, batch)
    # multiple=32: 75 real tokens + a 21-token padding segment at the end of the stream.
    packed = pack_padded(batch, PAD_ID, multiple=32)
    assert packed["packed_seq_params"].seqlens[-1] == 21
    scores, grads = _scores_and_grads(model, packed)
    assert scores.shape == ref_scores.shape == (len(lengths), 1)
    assert_rel_close(scores, ref_scores, "scores")
    for name, g in ref_grads.items():
        if "word_embeddings" not in name:
            assert g.abs().max() > 0, f"{name}: zero reference gradient"
        assert_rel_close(grads[name], g, f"grad {name}")


def test_attention_stays_inside_each_sequence_and_positions_restart(one_rank):
    from megarank.data.packing import pack_rows
    from megarank.model.inputs import model_inputs

    model = _build().eval()
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 14, 6))

    def scores(rows, multiple=8):
        args, kwargs = model_inputs(pack_rows(rows, PAD_ID, multiple), "cpu")
        with torch.no_grad():
            return model(*args, **kwargs)[:, 0]

    base = scores([a, b, c])
    changed = scores([a, [(t + 1) % 256 for t in b], c])  # another middle sequence: its neighbours keep their scores
    assert changed[1] != base[1]
    assert_rel_close(changed[[0, 2]], base[[0, 2]], "neighbours of a changed sequence")
    # The same sequence first, last or alone in a stream: the same score (positions restart at 0).
    assert_rel_close(scores([c, a, b])[[1, 2]], base[[0, 1]], "moved sequences")
    assert_rel_close(scores([b]), base[[1]], "a sequence alone")
    # The end-padding segment's tokens are never read.
    assert_rel_close(scores([a, b, c], multiple=64), base, "longer end padding")


def test_evaluation_scores_are_the_same_packed(one_rank):
    """data.packing in scoring: evaluate_beir's length-sorted batches packed give the padded scores."""
    from megarank.config import load_config
    from megarank.data import sample_data_dir
    from megarank.scoring.beir import evaluate_beir
    from megarank.training.data import make_pair_tokenizer, resolve_tokenizer_dir

    cfg = load_config(TINY, [])
    model = _build().eval()
    tok = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))
    folder = str(sample_data_dir())
    ref = evaluate_beir(model, tok, folder, "test", top_k=10, batch_size=7, max_queries=3)
    got = evaluate_beir(model, tok, folder, "test", top_k=10, batch_size=7, max_queries=3, packing=True)
    assert got[0] == pytest.approx(ref[0], abs=1e-6)
    pairs = [(q, d) for q, docs in ref[2].items() for d in docs]
    assert len(pairs) >= 10
    assert_rel_close(torch.tensor([got[2][q][d] for q, d in pairs]), torch.tensor([ref[2][q][d] for q, d in pairs]),
                     "evaluation scores")


def test_training_micro_batches_are_packed_when_configured():
    from megarank.config import load_config
    from megarank.training.data import make_group_source, make_micro_batcher, make_pair_tokenizer, resolve_tokenizer_dir

    for packing, tp in ((False, 1), (True, 1), (True, 4)):
        cfg = load_config(TINY, [f"data.packing={str(packing).lower()}", "data.pad_to_multiple_of=6"])
        cfg.parallel.tensor_model_parallel_size = tp  # only the stream's multiple reads it here
        tok = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))
        source = make_group_source(cfg)
        micro = make_micro_batcher(cfg, tok)([source.get(i, 0) for i in range(3)])
        assert len(micro) == 2 and all(b["group_size"] == 5 for b in micro)  # micro_batch_size 2: 2 + 1 groups
        if not packing:
            assert "packed_seq_params" not in micro[0] and micro[0]["input_ids"].shape[0] == 10
            continue
        for b, groups in zip(micro, (2, 1)):
            p = b["packed_seq_params"]
            assert b["input_ids"].shape[0] == 1 and p.num_sequences == 5 * groups
            assert b["input_ids"].shape[1] % (6 if tp == 1 else 12) == 0
            assert int(b["attention_mask"].sum()) == sum(p.seqlens[: p.num_sequences])


class _FixedLengthTokenizer:
    """A pair tokenizer stand-in whose pair i of a group has a length from ``lengths`` (for the split rules)."""

    pad_id, pad_to_multiple_of = PAD_ID, 4

    def __init__(self, lengths: dict):
        self.lengths = lengths

    def encode(self, queries, passages):
        return [[1] * self.lengths[q] for q in queries]

    def pad(self, rows):
        from megarank.data.tokenizer import PairTokenizer

        return PairTokenizer.pad(self, rows)


@pytest.mark.parametrize("packed", [True, False])
def test_token_budget_split_keeps_whole_groups_in_order(packed):
    from megarank.data.batcher import Batcher

    lengths = {"a": 10, "b": 30, "c": 7, "d": 100, "e": 5}
    groups = [(q, ["p1", "p2"]) for q in "abcde"]
    tok = _FixedLengthTokenizer(lengths)
    batcher = Batcher(tok, packed=packed)
    assert batcher.multiple == 4
    micro = batcher.micro_batches(groups, micro_batch_tokens=64)
    sizes = [len(b["relevance"]) for b in micro]
    assert sum(sizes) == 5
    # The greedy rule, recomputed: a group joins while the micro-batch's cost stays within the budget.
    expected, current = [], []
    for q in "abcde":
        rows = [lengths[q]] * 2
        if current and batcher.cost(current + rows) > 64:
            expected.append(len(current) // 2)
            current = []
        current += rows
    expected.append(len(current) // 2)
    assert sizes == expected and len(sizes) > 1
    d_batch = next(b for b in micro if (b["attention_mask"].sum() == 200))  # "d" is over the budget: alone
    assert len(d_batch["relevance"]) == 1
    for b in micro:
        assert b["group_size"] == 2 and b["loss_weight"] == pytest.approx(len(b["relevance"]) * len(micro) / 5)
        assert ("packed_seq_params" in b) == packed
        if len(b["relevance"]) > 1:
            assert b["input_ids"].numel() <= 64
    assert sum(b["loss_weight"] for b in micro) == pytest.approx(len(micro))
    even = Batcher(_FixedLengthTokenizer({"a": 10, "b": 10}), packed=packed).micro_batches(groups[:2],
                                                                                           micro_batch_tokens=39)
    assert [b["loss_weight"] for b in even] == [1.0, 1.0]  # equal groups per micro-batch: exactly 1.0
    fixed = batcher.micro_batches(groups, micro_batch_size=2)  # a fixed split: no loss weights
    assert [len(b["relevance"]) for b in fixed] == [2, 2, 1] and not any("loss_weight" in b for b in fixed)


def test_token_budget_step_has_the_fixed_split_loss_and_gradients(one_rank):
    """3 groups in token-budget micro-batches of 2 + 1 groups: the loss and gradients of one 3-group
    micro-batch (the mean over groups); without the loss weights they would differ."""
    from megarank.config import load_config
    from megarank.data.batcher import Batcher
    from megarank.model import build_model
    from megarank.training.data import make_group_source, make_pair_tokenizer, resolve_tokenizer_dir
    from megarank.training.optimizer import wrap_ddp

    cfg = load_config(TINY, ["parallel.use_distributed_optimizer=false"])
    tok = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))
    groups = [make_group_source(cfg).get(i, 0) for i in range(3)]
    torch.manual_seed(0)
    ddp = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg)
    ref_micro = Batcher(tok).micro_batches(groups, micro_batch_size=3)  # one padded micro-batch of the 3 groups
    assert len(ref_micro) == 1 and "loss_weight" not in ref_micro[0]
    ref = _step(ddp, ref_micro)
    lengths = [[len(r) for r in tok.encode([g.query] * len(g.passages), list(g.passages))] for g in groups]
    for packed in (True, False):
        batcher = Batcher(tok, packed=packed)
        assert batcher.multiple == 8
        budget = batcher.cost(lengths[0] + lengths[1])  # the first two groups fit, all three do not
        assert batcher.cost(lengths[0] + lengths[1] + lengths[2]) > budget
        micro = batcher.micro_batches(groups, micro_batch_tokens=budget)
        assert [len(b["relevance"]) for b in micro] == [2, 1]
        got = _step(ddp, micro)
        assert_rel_close(got["loss"], ref["loss"], f"packed={packed} loss")  # logged: the mean over micro-batches
        for name, g in ref["grads"].items():
            assert_rel_close(got["grads"][name], g, f"packed={packed} grad {name}")
        for b in micro:
            b["loss_weight"] = 1.0
        unweighted = _step(ddp, micro)
        assert (unweighted["loss"] - ref["loss"]).abs() > 1e-4


@pytest.mark.parametrize("packing", [True, False])
def test_training_loop_uses_the_token_budget(packing):
    from megarank.config import ConfigError, load_config, validate
    from megarank.training.data import make_group_source, make_micro_batcher, make_pair_tokenizer, resolve_tokenizer_dir

    cfg = load_config(TINY, [f"data.packing={str(packing).lower()}", "train.micro_batch_tokens=1500"])
    tok = make_pair_tokenizer(cfg, resolve_tokenizer_dir(cfg))
    source = make_group_source(cfg)
    micro = make_micro_batcher(cfg, tok)([source.get(i, 0) for i in range(4)])
    assert sum(len(b["relevance"]) for b in micro) == 4 and len(micro) >= 2
    for b in micro:
        assert ("packed_seq_params" in b) == packing
        assert b["input_ids"].numel() <= 1500 or len(b["relevance"]) == 1
    assert sum(b["loss_weight"] for b in micro) == pytest.approx(len(micro))
    with pytest.raises(ConfigError, match="train.micro_batch_tokens"):
        validate(load_config(TINY, ["train.micro_batch_tokens=-1"]), world_size=1)


def test_validate_refuses_packing_where_the_attention_cannot_pack():
    """megatron-core's DotProductAttention (model.attention_backend=megatron, local spec) asserts that no
    packed_seq_params reach it: validate() says so in one sentence naming both keys."""
    from megarank.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match="data.packing needs model.attention_backend sdpa"):
        validate(load_config(TINY, ["model.attention_backend=megatron"]), world_size=1)
    validate(load_config(TINY, ["model.attention_backend=megatron", "data.packing=false"]), world_size=1)
    validate(load_config(TINY, []), world_size=1)  # the default: packed, SDPA core attention


def test_a_scorer_on_attention_that_cannot_pack_scores_padded_batches_with_the_same_scores(one_rank):
    """Reranker.from_config / from_checkpoint on such a model (here megatron's DotProductAttention; on a GPU,
    Transformer Engine in fp32) switch to padded batches instead of refusing the config; scores as the SDPA spec's."""
    from megarank import Reranker

    pairs = [("what is a reranker", "a model that scores pairs"), ("q", "p " * 40), ("long " * 30, "x")]
    megatron = Reranker.from_config(TINY, ["model.attention_backend=megatron", "data.packing=true"])
    assert megatron.cfg.data.packing is False
    sdpa = Reranker.from_config(TINY, ["data.packing=true"])
    assert sdpa.cfg.data.packing is True
    assert_rel_close(megatron.score(pairs), sdpa.score(pairs), "scores", 1e-5)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (4, True)])
def test_packed_streams_meet_the_sp_and_fp8_divisibility_that_validate_checks(tp, sp):
    """Whenever validate() accepts a layout, every packed stream the data code can make (a multiple of
    packing_multiple) splits evenly over TP under sequence parallelism and gives every FP8 GEMM on a rank a
    token count the FP8 GEMMs accept on Hopper (a multiple of 16, the weight-gradient GEMM's leading dimension:
    transformer_engine/common/gemm/cublaslt_gemm.cu, on the local SP shard). Real lengths 1..600."""
    from types import SimpleNamespace

    from megarank.config import ConfigError, load_config, validate
    from megarank.data.batcher import Batcher

    accepted = 0
    for pad in (1, 4, 8, 16, 32):
        for fp8 in (None, "hybrid"):
            cfg = load_config(TINY, [f"parallel.tensor_model_parallel_size={tp}",
                                     f"parallel.sequence_parallel={str(sp).lower()}", f"data.pad_to_multiple_of={pad}",
                                     "model.num_attention_heads=8", "model.num_query_groups=4", "model.dtype=bf16",
                                     f"model.fp8={fp8 or 'null'}", "model.transformer_impl=auto"])
            try:
                validate(cfg, check_environment=False)
            except ConfigError:
                continue
            accepted += 1
            tok = SimpleNamespace(pad_id=PAD_ID, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
            batcher = Batcher(tok, packed=True, tensor_parallel_size=tp)  # as the training loop builds it
            for n in range(1, 601):
                stream = batcher.batch([[1] * n])["input_ids"].shape[1]
                local = stream // tp if sp else stream
                assert not sp or stream % tp == 0, (pad, fp8, stream)
                assert not fp8 or local % 16 == 0, (pad, fp8, stream)
    assert accepted >= 4  # some layouts with and without FP8 were accepted and checked


def test_buckets_bound_the_padding_they_add():
    from megarank.model import attention

    seqlens = (354, 120, 591, 350, 30, 512, 340, 7)
    plan = attention._buckets(seqlens, "cpu")
    covered = torch.cat([index[rows] for index, rows, _, _ in plan]).sort().values
    assert torch.equal(covered, torch.arange(sum(seqlens)))  # every token in exactly one valid slot
    for index, rows, width, keep in plan:
        n = index.numel() // width
        real = n * width if keep is None else int(keep.sum())
        assert n * width - real <= attention.BUCKET_WASTE * n * width


# --------------------------------------------------------------------------------------------- 2 ranks


def _micro_batches(seed: int) -> list:
    """2 micro-batches of 2 groups x 5 passages with lengths 2..40 (padded to a multiple of 8)."""
    g = torch.Generator().manual_seed(seed)
    return [padded_batch(torch.randint(2, 41, (2 * GROUP,), generator=g).tolist(), seed=seed * 10 + i)
            for i in range(2)]


def _forward_step(captured: list, data_iterator, model):
    from megatron.core import parallel_state

    from megarank.training.step import forward_step, loss_function

    out, loss_func = forward_step(data_iterator, model, loss_function("listwise"))
    if parallel_state.is_pipeline_last_stage():
        captured.append(out.detach().clone())
    return out, loss_func


def _step(ddp, micro: list) -> dict:
    """megarank's forward_step under megatron's schedule; -> scores, loss and this rank's reduced gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ddp.zero_grad_buffer()
    captured: list = []
    reduced = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, captured), data_iterator=iter(micro), model=[ddp],
        num_microbatches=len(micro), seq_length=micro[0]["input_ids"].shape[1],
        micro_batch_size=micro[0]["input_ids"].shape[0], forward_only=False)
    grads = {n: p.main_grad.clone() for n, p in ddp.module.named_parameters()}
    if not captured:
        return {"scores": None, "loss": None, "grads": grads}
    return {"scores": torch.cat(captured), "loss": torch.stack([r["loss"] for r in reduced]).mean(), "grads": grads}


def _layout(tp: int, pp: int, sp: bool) -> dict:
    from megatron.core import parallel_state

    from megarank.config import load_config
    from megarank.data.packing import pack_padded, packing_multiple
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import wrap_ddp

    cfg = load_config(TINY, [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                             f"parallel.sequence_parallel={str(sp).lower()}", "parallel.use_distributed_optimizer=false"])
    init_distributed(tp=tp, pp=pp, seed=cfg.train.seed)
    ddp = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg)
    micro = _micro_batches(seed=1 + parallel_state.get_data_parallel_rank())  # DP ranks see different data
    padded = _step(ddp, micro)
    multiple = packing_multiple(cfg.data.pad_to_multiple_of, tp)
    packed_micro = [pack_padded(b, PAD_ID, multiple) for b in micro]
    packed = _step(ddp, packed_micro)
    return {"padded": padded, "packed": packed, "dp": parallel_state.get_data_parallel_world_size(),
            "stream": [b["input_ids"].shape[1] for b in packed_micro]}


def _all_layouts() -> dict:
    return {"dp2": _layout(1, 1, False), "tp2": _layout(2, 1, False), "tp2sp": _layout(2, 1, True),
            "pp2": _layout(1, 2, False)}


def _tp2_sp_pp2() -> dict:
    return {"tp2sp_pp2": _layout(2, 2, True)}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_all_layouts, 2, timeout=240)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_tp2_sp_pp2, 4, timeout=300)


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2sp", "pp2", "tp2sp_pp2"])
def test_packed_matches_padded_at_layout(request, layout):
    runs = [r[layout] for r in request.getfixturevalue("four_ranks" if layout == "tp2sp_pp2" else "two_ranks")]
    assert any(r["packed"]["scores"] is not None for r in runs)
    for rank, run in enumerate(runs):
        ref, got = run["padded"], run["packed"]
        assert all(t % 8 == 0 for t in run["stream"])
        if ref["scores"] is not None:
            assert got["scores"].shape == ref["scores"].shape == (4 * GROUP, 1)
            assert_rel_close(got["scores"], ref["scores"], f"{layout} rank {rank} scores")
            assert_rel_close(got["loss"], ref["loss"], f"{layout} rank {rank} loss")
        for name, g in ref["grads"].items():
            if "word_embeddings" not in name:
                assert g.abs().max() > 0, f"{layout} rank {rank} {name}: zero reference gradient"
            assert_rel_close(got["grads"][name], g, f"{layout} rank {rank} grad {name}")
    if layout == "dp2":  # really different data on the two ranks, and the gradients all-reduced over them
        assert runs[0]["dp"] == 2 and not torch.equal(runs[0]["padded"]["scores"], runs[1]["padded"]["scores"])
        for name, g in runs[0]["packed"]["grads"].items():
            assert torch.equal(g, runs[1]["packed"]["grads"][name]), name
