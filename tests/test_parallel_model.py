"""Tensor, sequence and pipeline parallelism on CPU (gloo) give the TP=1/PP=1 scores, loss and gradients.

One 2-rank spawn does, in order (parallel state re-initialised between steps, a fresh model each time):
  1. TP=1 (DP=2, both ranks identical): build the tiny model, save its weights with ``save_model_weights``
     (the shared starting point), run one forward+backward through megatron's schedule -> reference;
  2. TP=2, 3. TP=2 + sequence parallel, 4. PP=2 (1F1B): load those TP=1 weights with ``load_model_weights``
     (so each run is also a resharding proof), run the same step.
A 4-rank spawn runs TP=2 x PP=2 the same way. Every run writes its gradients in global (TP=1) layout by
copying ``p.grad`` into ``p.data`` and saving a dist checkpoint: megatron's sharded state dict un-shards the
fused QKV (grouped per KV head) and the [gate; up] ``linear_fc1`` correctly, so no layout code lives here.

Sequence parallel: the norm weights see only their rank's slice of the sequence, so their gradients are
partial sums. Megatron's ``finalize_model_grads`` all-reduces params marked ``sequence_parallel`` over TP;
it needs a DDP-wrapped model, so the test calls the function it delegates to,
``megatron.core.distributed.finalize_model_grads._allreduce_non_tensor_model_parallel_grads``, directly.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_distributed

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SEQ, GROUP, GROUPS_PER_MICRO, N_MICRO = 16, 5, 2, 2  # 2 micro-batches of 2 query groups x 5 passages
PAD_ID, VOCAB = 258, 259
RTOL = 1e-5  # fp32: max |diff| <= RTOL * max |reference|


# ----------------------------------------------------------------------------------------------- in the ranks


def _config(tp: int = 1, pp: int = 1, sp: bool = False):
    from megarank.config import load_config

    return load_config(
        TINY,
        [
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"parallel.sequence_parallel={str(sp).lower()}",
        ],
    )


def _batch():
    """Deterministic [b, s] ids and validity mask, right padding of varying length; same on every rank."""
    g = torch.Generator().manual_seed(0)
    b = N_MICRO * GROUPS_PER_MICRO * GROUP
    ids = torch.randint(0, VOCAB - 3, (b, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (b,), generator=g)
    lengths[0] = SEQ
    valid = torch.arange(SEQ)[None, :] < lengths[:, None]
    ids[~valid] = PAD_ID
    return ids, valid


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over groups of GROUP passages, the positive at index 0."""
    logits = scores.float().view(-1, GROUP)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def _loss_func(captured: list, scores: torch.Tensor):
    captured.append(scores.detach().clone())
    loss = listwise_loss(scores)
    return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place: report a clone


def _forward_step(captured: list, data_iterator, model):
    ids, valid = next(data_iterator)
    return model(ids, valid), functools.partial(_loss_func, captured)


def _train_step(model) -> dict:
    """One forward+backward over N_MICRO micro-batches through megatron's schedule for this PP size."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, valid = _batch()
    micro = list(zip(ids.chunk(N_MICRO), valid.chunk(N_MICRO)))
    captured: list = []
    reduced = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, captured),
        data_iterator=iter(micro),
        model=[model],
        num_microbatches=N_MICRO,
        seq_length=SEQ,
        micro_batch_size=GROUPS_PER_MICRO * GROUP,
        forward_only=False,
    )
    if not captured:  # not the last pipeline stage
        return {"scores": None, "loss": None}
    return {"scores": torch.cat(captured), "loss": torch.stack([r["loss"] for r in reduced]).mean()}


def _allreduce_sequence_parallel_grads(model) -> None:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    model.ddp_config = DistributedDataParallelConfig()  # read by the function; the model is not DDP-wrapped
    _allreduce_non_tensor_model_parallel_grads([model], model.config)


def _save_grads(model, directory) -> None:
    """Write the gradients as a dist checkpoint in global layout (overwrites the weights: model is done)."""
    from megarank.checkpoint import save_model_weights

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    save_model_weights(model, directory)


def _run_layout(tp: int, pp: int, sp: bool, weights_dir, grads_dir) -> dict:
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    cfg = _config(tp, pp, sp)
    init_distributed(tp=tp, pp=pp, seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel)
    if weights_dir is None:  # a checkpoint's model/ folder, which load_model_weights accepts as it is
        save_model_weights(model, grads_dir.parent / "weights" / "model")
    else:
        load_model_weights(model, weights_dir)
    out = _train_step(model)
    sp_params = [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    if sp:
        _allreduce_sequence_parallel_grads(model)
    _save_grads(model, grads_dir)
    qkv = [p for n, p in model.named_parameters() if n.endswith("linear_qkv.weight")]
    out.update(qkv_local_shape=tuple(qkv[0].shape) if qkv else None, sp_params=sp_params,
               n_local_layers=len(model.decoder.layers))
    return out


def _two_rank_runs(root: str) -> dict:
    root = Path(root)
    results = {"tp1": _run_layout(1, 1, False, None, root / "grads-tp1")}
    weights = root / "weights" / "model"
    results["tp2"] = _run_layout(2, 1, False, weights, root / "grads-tp2")
    results["tp2sp"] = _run_layout(2, 1, True, weights, root / "grads-tp2sp")
    results["pp2"] = _run_layout(1, 2, False, weights, root / "grads-pp2")
    return results


def _four_rank_run(root: str) -> dict:
    root = Path(root)
    return _run_layout(2, 2, False, root / "weights" / "model", root / "grads-tp2pp2")


# ----------------------------------------------------------------------------------------------- in pytest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    two = run_distributed(_two_rank_runs, 2, str(root))
    four = run_distributed(_four_rank_run, 4, str(root))
    return root, two, four


def _last_stage(per_rank: list) -> dict:
    """The result of a rank on the last pipeline stage (all of them agree; take the first)."""
    return next(r for r in per_rank if r["scores"] is not None)


def _plain(directory) -> dict:
    """Global tensors of a torch_dist checkpoint, read in this (non-distributed) process.

    (megatron's ``load_plain_tensors`` needs a process group; torch's DCP converter does not.)
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = Path(directory).with_suffix(".pt")
    if not target.exists():
        dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=True)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL):
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert diff <= rtol * scale + 1e-12, f"{what}: max |diff| {diff:.3g} > {rtol} x max |ref| {scale:.3g}"


def _grads_match(root: Path, layout: str):
    ref, got = _plain(root / "grads-tp1"), _plain(root / f"grads-{layout}")
    assert set(got) == set(ref)
    for key, expected in ref.items():
        actual = got[key]
        if "word_embeddings" in key:  # padded to a multiple of 64 x TP: compare the real vocabulary rows
            actual, expected = actual[:VOCAB], expected[:VOCAB]
        assert actual.shape == expected.shape, key
        assert expected.abs().max() > 0, f"{key}: reference gradient is all zero"
        assert_rel_close(actual, expected, f"{layout} grad {key}")


def test_reference_runs_are_identical_on_both_dp_ranks(runs):
    _, two, _ = runs
    a, b = (r["tp1"] for r in two)
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["loss"], b["loss"])
    assert a["scores"].shape == (N_MICRO * GROUPS_PER_MICRO * GROUP, 1)
    assert torch.isfinite(a["loss"]) and a["loss"] > 0


@pytest.mark.parametrize("layout", ["tp2", "tp2sp", "pp2"])
def test_scores_and_loss_match_tp1(runs, layout):
    _, two, _ = runs
    ref = two[0]["tp1"]
    for rank_result in two:
        run = rank_result[layout]
        if run["scores"] is None:
            continue
        assert_rel_close(run["scores"], ref["scores"], f"{layout} scores")
        assert_rel_close(run["loss"], ref["loss"], f"{layout} loss")
    assert _last_stage([r[layout] for r in two]) is not None


@pytest.mark.parametrize("layout", ["tp2", "tp2sp", "pp2"])
def test_gradients_match_tp1(runs, layout):
    root, _, _ = runs
    _grads_match(root, layout)


def test_layouts_really_are_split(runs):
    _, two, _ = runs
    ref_rows = two[0]["tp1"]["qkv_local_shape"][0]  # (4 heads + 2 x 2 kv heads) x 16 = 128
    assert ref_rows == 128
    assert all(r["tp2"]["qkv_local_shape"][0] == ref_rows // 2 for r in two)
    assert [r["pp2"]["n_local_layers"] for r in two] == [1, 1]
    assert [r["pp2"]["scores"] is None for r in two] == [True, False]
    # Every norm weight is marked for the sequence-parallel grad all-reduce, and only under SP.
    sp_params = two[0]["tp2sp"]["sp_params"]
    assert sorted(sp_params) == sorted(n for n in _norm_names(2)) and two[0]["tp2"]["sp_params"] == []


def _norm_names(num_layers: int) -> list[str]:
    names = ["decoder.final_layernorm.weight"]
    for i in range(num_layers):
        names += [f"decoder.layers.{i}.input_layernorm.weight", f"decoder.layers.{i}.pre_mlp_layernorm.weight"]
    return names


def test_tp2_pp2_four_ranks_forward_backward(runs):
    root, two, four = runs
    ref = two[0]["tp1"]
    last = [r for r in four if r["scores"] is not None]
    assert len(last) == 2  # the two TP ranks of the last stage
    for run in last:
        assert_rel_close(run["loss"], ref["loss"], "tp2pp2 loss")
        assert_rel_close(run["scores"], ref["scores"], "tp2pp2 scores")
    assert all(r["n_local_layers"] == 1 for r in four)
    _grads_match(root, "tp2pp2")
