"""Context parallelism on CPU (gloo): CP=2 gives the CP=1 scores, loss and every gradient, padded and packed.

Sequences of up to ~2,000 tokens (the tiny model, fp32). Each layout loads the same starting weights (saved by the
CP=1 run), runs one training step's forward+backward through megatron's schedule on a megatron DDP-wrapped model --
so the gradients are the ones DDP reduces over data x context ranks (``dp_cp_group``) and megatron's CP loss scaling
(schedules.py) is in play -- and writes the reduced gradients as a dist checkpoint in global layout.

The reference is CP=1 on the same two ranks (DP=2, both ranks the same batch, so the DP average is the gradient).
Layouts: CP=2 padded and packed, each pooling (avg, last, cls); CP=2 x TP=2 (sequence parallel) and CP=2 x PP=2 on
four ranks. Scores must also be identical on the two CP ranks of a replica.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.test_parallel_model import _plain, assert_rel_close

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
GROUP, N_MICRO = 3, 2  # 2 micro-batches of one query group of 3 passages
PAD_ID, VOCAB = 258, 259
LENGTHS = [(1990, 1203, 617), (1500, 1788, 33)]  # real tokens per row, per micro-batch


def _config(tp=1, pp=1, cp=1, sp=False, pooling="avg", packing=False):
    from megarank.config import load_config

    return load_config(TINY, [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.context_parallel_size={cp}", f"parallel.sequence_parallel={str(sp).lower()}",
        f"model.pooling={pooling}", f"data.packing={str(packing).lower()}", "parallel.use_distributed_optimizer=false",
    ])


def _micro_batches(packed: bool, multiple: int, seq_multiple: int) -> list:
    """The two micro-batches (same on every rank), right-padded to a multiple or packed, as the Batcher makes them."""
    from megarank.data.packing import pack_rows

    g = torch.Generator().manual_seed(0)
    batches = []
    for lengths in LENGTHS:
        rows = [torch.randint(0, VOCAB - 3, (n,), generator=g).tolist() for n in lengths]
        if packed:
            batches.append(pack_rows(rows, PAD_ID, multiple, seq_multiple))
            continue
        s = -(-max(lengths) // multiple) * multiple
        ids = torch.full((len(rows), s), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), s), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over the group, the positive first."""
    logits = scores.float().view(-1, GROUP)
    return torch.nn.functional.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def _loss_func(captured: list, scores):
    captured.append(scores.detach().clone())
    loss = listwise_loss(scores)
    return loss, {"loss": loss.detach().clone()}


def _forward_step(captured: list, data_iterator, model):
    from megarank.model.inputs import model_inputs

    args, kwargs = model_inputs(next(data_iterator), torch.device("cpu"))
    return model(*args, **kwargs), functools.partial(_loss_func, captured)


def _run(tag: str, root: Path, *, tp=1, pp=1, cp=1, sp=False, pooling="avg", packed=False, save_weights=False) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.data.packing import packing_multiple
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import wrap_ddp

    cfg = _config(tp, pp, cp, sp, pooling, packed)
    init_distributed(tp=tp, pp=pp, cp=cp, seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel, ddp_training=True)
    weights = root / "weights" / "model"
    if save_weights:
        save_model_weights(model, weights)
    else:
        load_model_weights(model, weights)
    ddp = wrap_ddp(model, cfg)
    multiple = packing_multiple(1, tp, cp) if (packed or cp > 1) else 1
    batches = _micro_batches(packed, multiple, 2 * cp if packed and cp > 1 else 1)
    captured: list = []
    ddp.zero_grad_buffer()
    reduced = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, captured), data_iterator=iter(batches), model=[ddp],
        num_microbatches=N_MICRO, seq_length=batches[0]["input_ids"].shape[1], micro_batch_size=GROUP,
        forward_only=False)
    # megatron's finalize_model_grads (model.config.finalize_model_grads_func, set by wrap_ddp and called by the
    # schedule): DDP's all-reduce over data x context ranks (dp_cp_group, averaged) and, under sequence parallel, the
    # norms' partial gradients summed over TP.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.main_grad)
    save_model_weights(model, root / f"grads-{tag}")
    if not captured:
        return {"scores": None, "loss": None}
    return {"scores": torch.cat(captured), "loss": torch.stack([r["loss"] for r in reduced]).mean()}


def _two_rank(root: str) -> dict:
    root = Path(root)
    out = {}
    for pooling in ("avg", "last", "cls"):
        out[f"cp1-{pooling}"] = _run(f"cp1-{pooling}", root, pooling=pooling, save_weights=pooling == "avg")
        out[f"cp2-{pooling}"] = _run(f"cp2-{pooling}", root, cp=2, pooling=pooling)
        out[f"cp2-packed-{pooling}"] = _run(f"cp2-packed-{pooling}", root, cp=2, pooling=pooling, packed=True)
    return out


def _four_rank(root: str) -> dict:
    root = Path(root)
    return {"cp2-tp2sp": _run("cp2-tp2sp", root, cp=2, tp=2, sp=True, packed=True),
            "cp2-pp2": _run("cp2-pp2", root, cp=2, pp=2)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    two = run_distributed(_two_rank, 2, str(root), timeout=900)
    four = run_distributed(_four_rank, 4, str(root), timeout=900)
    return root, two, four


def _grads_match(root: Path, tag: str, ref: str):
    expected_all, got_all = _plain(root / f"grads-{ref}"), _plain(root / f"grads-{tag}")
    assert set(got_all) == set(expected_all)
    for key, expected in expected_all.items():
        actual = got_all[key]
        if "word_embeddings" in key:  # padded to a multiple of 64 x TP: compare the real vocabulary rows
            actual, expected = actual[:VOCAB], expected[:VOCAB]
        assert expected.abs().max() > 0, f"{key}: reference gradient is all zero"
        assert_rel_close(actual, expected, f"{tag} grad {key}")


@pytest.mark.parametrize("pooling", ["avg", "last", "cls"])
@pytest.mark.parametrize("layout", ["cp2", "cp2-packed"])
def test_cp2_equals_cp1(runs, layout, pooling):
    root, two, _ = runs
    ref = two[0][f"cp1-{pooling}"]
    for rank in (0, 1):  # both CP ranks score every sequence identically
        got = two[rank][f"{layout}-{pooling}"]
        assert_rel_close(got["scores"], ref["scores"], f"{layout} {pooling} scores (rank {rank})")
        assert_rel_close(got["loss"], ref["loss"], f"{layout} {pooling} loss (rank {rank})")
    assert torch.equal(two[0][f"{layout}-{pooling}"]["scores"], two[1][f"{layout}-{pooling}"]["scores"])
    _grads_match(root, f"{layout}-{pooling}", f"cp1-{pooling}")


@pytest.mark.parametrize("layout", ["cp2-tp2sp", "cp2-pp2"])
def test_cp2_with_tp_and_pp(runs, layout):
    root, two, four = runs
    ref = two[0]["cp1-avg"]
    last = [r[layout] for r in four if r[layout]["scores"] is not None]
    assert last, "no rank returned scores"
    for got in last:
        assert_rel_close(got["scores"], ref["scores"], f"{layout} scores")
        assert_rel_close(got["loss"], ref["loss"], f"{layout} loss")
    _grads_match(root, layout, "cp1-avg")


def test_split_is_dual_chunk_swap():
    """The split megatron's get_batch_on_this_cp_rank and TE's thd_get_partitioned_indices make (TE's own test:
    cu_seqlens [0, 8, 16], CP 2 -> rank 0 [0, 1, 6, 7, 8, 9, 14, 15], rank 1 [2, 3, 4, 5, 10, 11, 12, 13])."""
    from megarank.parallel.context import PackedShard, chunk_positions

    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert PackedShard.of((8, 8), (8, 8), 2, 0, None).index.tolist() == [0, 1, 6, 7, 8, 9, 14, 15]
    assert PackedShard.of((8, 8), (8, 8), 2, 1, None).index.tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="multiple of 2 x CP = 4"):
        chunk_positions(6, 2, 0)
