"""LoRA adapters (megarank/model/adapters.py) on CPU with gloo: exact at start, equal at every layout, frozen base,
exact merge.

One 2-rank spawn does, in order (parallel state re-initialised between layouts, a fresh model each time):
  1. TP=1 (DP=2, both ranks identical): a LoRA model and a plain model built with the same seed score the same
     pairs bit for bit (B = 0); the adapters' B is then set to small random values (so A gets gradients too),
     the weights are saved, and one forward+backward through megatron's schedule gives the reference;
  2. TP=2, 3. TP=2 + sequence parallel, 4. PP=2 (1F1B): load those weights (a resharding proof for the adapter
     tensors), run the same step; gradients are written in global layout by copying them into the weights.
  5. TP=1 x DP=2 training: megatron DDP + the distributed optimizer for 3 steps at a large lr; the optimizer holds
     the trainable tensors only, every base tensor stays bit-identical, every trainable one moves; the trained
     global tensors merged with ``merge_lora`` into a plain model score what the adapted model scores.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from megarank.config import transformer_engine_available
from tests.dist_utils import run_distributed
from tests.test_parallel_model import GROUP, GROUPS_PER_MICRO, N_MICRO, SEQ, _batch, _forward_step, assert_rel_close

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
RANK, ALPHA = 4, 8.0
TRAIN_STEPS = 3


# ----------------------------------------------------------------------------------------------- in the ranks


def _config(tp: int = 1, pp: int = 1, sp: bool = False, rank: int = RANK):
    from megarank.config import load_config

    return load_config(TINY, [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.sequence_parallel={str(sp).lower()}", f"model.lora_rank={rank}", f"model.lora_alpha={ALPHA}",
        "train.lr=0.01", "train.lr_warmup_steps=0", f"train.steps={TRAIN_STEPS}", "train.weight_decay=0.0",
    ])


def _schedule(model, forward_only: bool = False) -> dict:
    """One pass over N_MICRO micro-batches through megatron's schedule for this PP size."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids, valid = _batch()
    captured: list = []
    reduced = get_forward_backward_func()(
        forward_step_func=functools.partial(_forward_step, captured),
        data_iterator=iter(list(zip(ids.chunk(N_MICRO), valid.chunk(N_MICRO)))), model=[model],
        num_microbatches=N_MICRO, seq_length=SEQ, micro_batch_size=GROUPS_PER_MICRO * GROUP, forward_only=forward_only)
    if not captured:
        return {"scores": None, "loss": None}
    return {"scores": torch.cat(captured), "loss": torch.stack([r["loss"] for r in reduced]).mean()}


def _scores(model) -> torch.Tensor:
    ids, valid = _batch()
    with torch.no_grad():
        return model.eval()(ids, valid)


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _start(root: Path) -> dict:
    """TP=1: B = 0 is the base model exactly; then random B, saved as every layout's starting point."""
    from megarank.checkpoint import save_model_weights
    from megarank.config import load_config
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    cfg = _config()
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    torch.manual_seed(7)
    plain = build_model(_config(rank=0).model, cfg.parallel)
    torch.manual_seed(7)
    model = build_model(cfg.model, cfg.parallel)
    exact = torch.equal(_scores(plain), _scores(model))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_model_weights(model, root / "weights" / "model")
    with_norm = load_config(TINY, ["model.lora_rank=4", "model.lora_train_final_norm=true",
                                   "model.lora_targets=[linear_fc2]"])
    norm_model = build_model(with_norm.model, with_norm.parallel)
    return {"b0_equals_base": exact, "trainable": sorted(_trainable(model)),
            "frozen": sum(not p.requires_grad for p in model.parameters()),
            "trainable_with_norm": sorted(_trainable(norm_model))}


def _allreduce_sequence_parallel_grads(model) -> None:
    """What megatron's finalize_model_grads does for params marked ``sequence_parallel`` (norms, row adapters' B)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads

    model.ddp_config = DistributedDataParallelConfig()
    _allreduce_non_tensor_model_parallel_grads([model], model.config)


def _run_layout(tp: int, pp: int, sp: bool, root: Path, name: str) -> dict:
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    cfg = _config(tp, pp, sp)
    init_distributed(tp=tp, pp=pp, seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel)
    load_model_weights(model, root / "weights")
    out = _schedule(model)
    if sp:
        _allreduce_sequence_parallel_grads(model)
    with torch.no_grad():  # gradients in global layout: trainable tensors hold their gradient, frozen ones zero
        for p in model.parameters():
            p.copy_(p.grad) if p.requires_grad else p.zero_()
    save_model_weights(model, root / f"grads-{name}")
    a = [p for n, p in model.named_parameters() if n.endswith("linear_qkv_adapter.lora_a")]
    out["qkv_a_local_shape"] = tuple(a[0].shape) if a else None
    out["numel"] = {"total": sum(p.numel() for p in model.parameters()),
                    "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "adapters": sum(p.numel() for n, p in model.named_parameters() if "_adapter." in n)}
    return out


def _train_and_merge(root: Path) -> dict:
    """TP=1 x DP=2, DDP + distributed optimizer, 3 steps; then the merge check (on both ranks, same numbers)."""
    from megatron.core import dist_checkpointing

    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.checkpoint.weights import load_global_tensors
    from megarank.model import build_model
    from megarank.model.adapters import merge_lora
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import build_optimizer, inner_optimizers, wrap_ddp

    cfg = _config()
    init_distributed(tp=1, pp=1, seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel, ddp_training=True)
    load_model_weights(model, root / "weights")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(ddp, cfg)
    # What the distributed optimizer holds on this DP rank (its shard of the grad buffers' params, as fp32 main
    # params) and what DDP buckets: only params with requires_grad (distributed_data_parallel.py:112).
    held = sum(p.numel() for opt in inner_optimizers(optimizer) for g in opt.optimizer.param_groups for p in g["params"])
    bucketed = {id(p) for buffer in ddp.buffers for p in buffer.params}
    for _ in range(TRAIN_STEPS):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        _schedule(ddp)
        optimizer.step()
    main_grads = sum(p.main_grad.numel() for p in model.parameters() if p.requires_grad)
    adam_bytes = sum(t.numel() * t.element_size() for opt in inner_optimizers(optimizer)
                     for state in opt.optimizer.state.values() for k, t in state.items() if k != "step")
    after = model.state_dict()
    trainable = _trainable(model)
    unchanged_base = [k for k in before if k not in trainable and not torch.equal(before[k], after[k])]
    unmoved = [k for k in trainable if torch.equal(before[k], after[k])]
    save_model_weights(model, root / "trained" / "model")
    adapted = _scores(model)
    globals_ = dist_checkpointing.load_plain_tensors(str(root / "trained" / "model"))
    merged = merge_lora(globals_, cfg.model.lora_rank, cfg.model.lora_alpha)
    plain = build_model(_config(rank=0).model, cfg.parallel)
    load_global_tensors(plain, {k: v for k, v in globals_.items() if "_adapter." not in k}, "base tensors")
    base_scores = _scores(plain)
    load_global_tensors(plain, merged, "merged LoRA tensors")
    return {"main_grads": main_grads, "adam_bytes": adam_bytes, "held": held, "bucketed_trainable": bucketed == {id(p) for p in trainable.values()},
            "trainable_numel": sum(p.numel() for p in trainable.values()), "base_changed": unchanged_base, "trainable_unmoved": unmoved,
            "adapted": adapted, "merged": _scores(plain), "base": base_scores, "merged_keys": sorted(merged)}


def _two_rank_runs(root: str) -> dict:
    root = Path(root)
    results = {"start": _start(root)}
    results["tp1"] = _run_layout(1, 1, False, root, "tp1")
    results["tp2"] = _run_layout(2, 1, False, root, "tp2")
    results["tp2sp"] = _run_layout(2, 1, True, root, "tp2sp")
    results["pp2"] = _run_layout(1, 2, False, root, "pp2")
    results["train"] = _train_and_merge(root)
    return results


# ----------------------------------------------------------------------------------------------- in pytest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, run_distributed(_two_rank_runs, 2, str(root))


def _plain(directory) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = Path(directory).with_suffix(".pt")
    if not target.exists():
        dcp_to_torch_save(str(directory), str(target))
    return torch.load(target, weights_only=True)


def test_fresh_adapters_leave_the_base_model_exact(runs):
    _, two = runs
    for r in two:
        assert r["start"]["b0_equals_base"]
    start = two[0]["start"]
    # 2 layers x 4 targets x (A, B) + the score head train; the embedding, 2 x (2 norms + 4 linears) and the
    # final norm are frozen.
    assert len(start["trainable"]) == 2 * 4 * 2 + 1 and "score.weight" in start["trainable"]
    assert start["frozen"] == 1 + 2 * 6 + 1
    assert start["trainable_with_norm"] == sorted(
        [f"decoder.layers.{i}.mlp.linear_fc2_adapter.lora_{x}" for i in (0, 1) for x in "ab"]
        + ["decoder.final_layernorm.weight", "score.weight"])


@pytest.mark.parametrize("layout", ["tp2", "tp2sp", "pp2"])
def test_loss_scores_and_adapter_gradients_match_tp1(runs, layout):
    root, two = runs
    ref = two[0]["tp1"]
    seen = False
    for r in two:
        run = r[layout]
        if run["scores"] is None:
            continue
        seen = True
        assert_rel_close(run["scores"], ref["scores"], f"{layout} scores")
        assert_rel_close(run["loss"], ref["loss"], f"{layout} loss")
    assert seen
    expected, got = _plain(root / "grads-tp1"), _plain(root / f"grads-{layout}")
    assert set(got) == set(expected)
    trainable = [k for k in expected if k.endswith(("lora_a", "lora_b")) or k == "score.weight"]
    assert len(trainable) == 4 * 2 + 1  # stacked over layers
    for key in trainable:
        assert expected[key].abs().max() > 0, f"{key}: reference gradient is all zero"
        assert_rel_close(got[key], expected[key], f"{layout} grad {key}")
    if layout != "pp2":  # the column adapters' A really is split over TP
        assert all(r[layout]["qkv_a_local_shape"] == (RANK // 2, 64) for r in two)


def test_training_moves_only_adapters_and_head(runs):
    _, two = runs
    assert sum(r["train"]["held"] for r in two) == two[0]["train"]["trainable_numel"], \
        "the two DP ranks' optimizer shards together hold exactly the trainable tensors"
    for r in two:
        t = r["train"]
        assert t["bucketed_trainable"], "DDP buckets exactly the trainable tensors"
        assert t["base_changed"] == [], f"base tensors changed: {t['base_changed']}"
        assert t["trainable_unmoved"] == [], f"trainable tensors did not move: {t['trainable_unmoved']}"


def test_merged_weights_score_like_the_adapted_model(runs):
    _, two = runs
    t = two[0]["train"]
    assert not any("adapter" in k for k in t["merged_keys"])
    assert (t["adapted"] - t["base"]).abs().max() > 1e-3, "the adapters changed nothing: the merge check proves nothing"
    assert_rel_close(t["merged"], t["adapted"], "merged vs adapted scores")


def test_config_validation_names_the_lora_keys():
    from megarank.config import ConfigError, load_config, validate

    cfg = load_config(TINY, ["model.lora_rank=3", "parallel.tensor_model_parallel_size=2", "model.lora_dropout=1.0",
                             "model.lora_alpha=0", "model.lora_targets=[]"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=2, check_environment=False)
    for key in ("model.lora_rank (3) must be divisible by parallel.tensor_model_parallel_size (2)",
                "model.lora_dropout", "model.lora_alpha", "model.lora_targets", "set checkpoint.load"):
        assert key in str(e.value)
    no_base = load_config(TINY, ["model.lora_rank=4"])
    with pytest.raises(ConfigError, match="checkpoint.load"):
        validate(no_base, check_environment=False)
    validate(no_base, check_environment=False, training=False)  # scoring a LoRA checkpoint needs no checkpoint.load
    validate(load_config(TINY, ["model.lora_rank=4", "checkpoint.load=/some/base"]), check_environment=False)


def test_readme_8b_lora_dry_run_runs_as_written(capsys, monkeypatch):
    """The README's one-node 8B LoRA dry run validates the shipped config for 8 ranks and prints its layout."""
    import shlex

    from megarank.cli.launch import main

    root = Path(TINY).parents[1]
    lines = [line.strip() for line in (root / "README.md").read_text().splitlines()
             if line.strip().startswith("megarank launch --dry-run") and "llama3_1_8b_lora.yaml" in line]
    assert len(lines) == 1, lines
    monkeypatch.chdir(root)
    assert main(shlex.split(lines[0])[2:]) == 0
    out = capsys.readouterr().out
    assert "TP 1 x PP 1 x DP 8" in out and "lora_rank: 16" in out and "load: runs/l8b-base" in out
    readme = (root / "README.md").read_text()
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# memory per GPU"))
    memory = lines[start:next(i for i, line in enumerate(lines) if line.startswith("# resolved config"))]
    assert len(memory) == 5 and all(line in readme for line in memory), "the README shows the dry run's estimate"
    assert "yes (this config)" in memory[2] and memory[3].split()[-1] == "NO", "8B LoRA fits 80 GB, full does not"


@pytest.mark.gpu
@pytest.mark.skipif(not transformer_engine_available(), reason="needs CUDA and Transformer Engine")
def test_te_spec_lora_equals_local_spec_lora_in_bf16(tmp_path, one_rank):
    """Transformer Engine's fused norm + linear hands the adapters the normed input (return_layernorm_output) and
    the adapters' input gradients reach the layers below: scores and every trainable gradient match the local spec."""
    from megarank.checkpoint import load_model_weights, save_model_weights
    from megarank.config import load_config
    from megarank.model import build_model

    def build(impl):
        cfg = load_config(TINY, [f"model.transformer_impl={impl}", "model.dtype=bf16", f"model.lora_rank={RANK}",
                                 f"model.lora_alpha={ALPHA}"])
        torch.manual_seed(1)
        return build_model(cfg.model, cfg.parallel)

    local = build("local")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in local.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_model_weights(local, tmp_path / "model")
    te = build("transformer_engine")
    load_model_weights(te, tmp_path)
    assert te.decoder.layers[0].self_attention.linear_qkv.return_layernorm_output
    ids, valid = _batch()
    out = {}
    for name, model in (("local", local), ("te", te)):
        dev = next(model.parameters()).device
        scores = model.train()(ids.to(dev), valid.to(dev))
        scores.float().square().sum().backward()
        out[name] = (scores.detach().float().cpu(), {n: p.grad.float().cpu() for n, p in _trainable(model).items()})
    torch.testing.assert_close(out["te"][0], out["local"][0], rtol=2e-2, atol=2e-2)
    assert sorted(out["te"][1]) == sorted(out["local"][1])
    for name, expected in out["local"][1].items():
        assert expected.abs().max() > 0, name
        assert_rel_close(out["te"][1][name], expected, f"TE grad {name}", rtol=5e-2)


@pytest.mark.parametrize("layout", ["tp1", "tp2", "tp2sp", "pp2"])
def test_memory_estimate_counts_what_the_built_models_hold(runs, layout):
    """megarank/training/memory.py against the models of each layout: parameters per GPU of the fullest stage,
    trained ones, with and without the adapters (measured: numel of each rank's parameters)."""
    from megarank.training.memory import stage_params

    _, two = runs
    tp, pp = {"tp1": (1, 1), "tp2": (2, 1), "tp2sp": (2, 1), "pp2": (1, 2)}[layout]
    cfg = _config(tp, pp)
    counts = [r[layout]["numel"] for r in two]
    fullest = max(counts, key=lambda c: (c["total"], c["trained"]))
    got = stage_params(cfg.model, tp, pp, lora=True)
    assert (got.total, got.trained) == (fullest["total"], fullest["trained"])
    assert stage_params(cfg.model, tp, pp, lora=False).total == fullest["total"] - fullest["adapters"]


def test_memory_estimate_counts_the_gradient_buffer_and_adam_state(runs):
    """Measured in the DDP + distributed optimizer run (TP=1 x DP=2, fp32): the fp32 main_grad of every trained
    parameter, and Adam's moments summed over the two ranks' shards."""
    from megarank.training.memory import estimate

    _, two = runs
    e = estimate(_config(), data_parallel=2, lora=True)
    for r in two:
        assert r["train"]["main_grads"] * 4 == e.gradients
    assert sum(r["train"]["adam_bytes"] for r in two) == e.params.trained * 8
    assert e.optimizer == -(-e.params.trained * 8 // 2)
