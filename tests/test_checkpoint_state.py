"""Optimizer and FP8 state in training checkpoints (gloo ranks on CPU, the tiny model, fp32).

- ``flat_range_boxes`` covers exactly a flat range of an N-D tensor, in order;
- the distributed optimizer's state is saved by each DP rank for its own shard, without megatron's gather
  (``get_parameter_state_dp_zero`` is made to fail), as the same global tensors megatron's 'fully_reshardable'
  format writes; it loads at another TP/DP, and older 'fully_reshardable' checkpoints load too (each checked by saving again and comparing the global tensors bit for bit);
- ``_extra_state`` (a TE-like module whose extra state holds tensors and bytes) survives save and load, and a
  checkpoint loads into a model without it (and the reverse), with the reason logged.
"""
import logging

import pytest
import torch

from megarank.training.optimizer_state import flat_range_boxes
from tests.dist_utils import run_distributed
from tests.training_harness import TINY, assert_bit_identical, read_plain_tensors


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 6), (2, 64, 128)])
def test_flat_range_boxes_cover_exactly_the_range_in_flat_order(shape):
    numel = int(torch.tensor(shape).prod())
    index = torch.arange(numel).view(shape)
    g = torch.Generator().manual_seed(0)
    ranges = [(0, numel), (0, 1), (numel - 1, numel), (3, 3)]
    ranges += [tuple(sorted(torch.randint(0, numel + 1, (2,), generator=g).tolist())) for _ in range(30)]
    for start, end in ranges:
        boxes = flat_range_boxes(shape, start, end)
        got = [index[tuple(slice(o, o + b) for o, b in zip(off, box))].reshape(-1) for off, box in boxes]
        got = torch.cat(got) if got else torch.empty(0, dtype=index.dtype)
        assert torch.equal(got, torch.arange(start, end)), (shape, start, end, boxes)
        assert len(boxes) <= 2 * len(shape) - 1


# ----------------------------------------------------------------------------------------------- optimizer


def _build(tp: int, distributed_optimizer: bool, seed: int = 3, dtype: str = "fp32"):
    from megarank.config import load_config
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import build_optimizer, wrap_ddp

    init_distributed(tp, 1, seed=seed)
    cfg = load_config(TINY, [f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}",
                             f"model.dtype={dtype}"])
    model = build_model(cfg.model, cfg.parallel)
    optimizer = build_optimizer(wrap_ddp(model, cfg), cfg)
    return model, optimizer


def _save(sd: dict, directory: str) -> None:
    import os

    from megatron.core import dist_checkpointing

    os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()  # the folder exists (and is empty) before any rank writes
    dist_checkpointing.save(sd, directory)


def _save_work(out: str, dtype: str = "fp32"):
    """DP=2 with the distributed optimizer: 2 steps on fixed gradients, then save the weights, the optimizer
    in megarank's format (gathering forbidden) and in megatron's 'fully_reshardable' format."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megarank import checkpoint as ckpt
    from megarank.training.optimizer import inner_optimizers
    from megarank.training.optimizer_state import optimizer_sharded_state_dict

    model, optimizer = _build(1, True, dtype=dtype)
    assert any(isinstance(o, DistributedOptimizer) for o in inner_optimizers(optimizer))
    torch.manual_seed(11)  # the same gradients on both DP ranks
    for _ in range(2):
        for p in model.parameters():
            p.main_grad.copy_(torch.randn_like(p) * 1e-2)
        optimizer.step()
    ckpt.save_model_weights(model, f"{out}/model")

    def no_gather(*args, **kwargs):
        raise AssertionError("the optimizer save gathered the state (get_parameter_state_dp_zero)")

    real = DistributedOptimizer.get_parameter_state_dp_zero
    DistributedOptimizer.get_parameter_state_dp_zero = no_gather
    try:
        sd = optimizer_sharded_state_dict(optimizer, model, is_loading=False)
        _save(sd, f"{out}/new")
    finally:
        DistributedOptimizer.get_parameter_state_dp_zero = real
    old = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=False,
                                       metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    _save(old, f"{out}/old")
    # the saved boxes are views of this rank's optimizer tensors: nothing was copied for the save
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    tensors = [t for o in inner_optimizers(optimizer) for s in o.optimizer.state.values() for t in s.values()]
    tensors += [p for o in inner_optimizers(optimizer) for g in o.optimizer.param_groups for p in g["params"]]
    storages = {t.untyped_storage().data_ptr() for t in tensors if torch.is_tensor(t)}
    return all(t.data.untyped_storage().data_ptr() in storages for t in nested_values(sd["param_state"]))


def _load_work(out: str, tp: int, distributed_optimizer: bool, src: str, dst: str, dtype: str = "fp32"):
    """Load weights and optimizer state from ``src`` at this layout, save the optimizer again into ``dst``."""
    from megatron.core import dist_checkpointing

    from megarank import checkpoint as ckpt
    from megarank.training.optimizer import inner_optimizers
    from megarank.training.optimizer_state import optimizer_sharded_state_dict, restore_optimizer_state

    model, optimizer = _build(tp, distributed_optimizer, seed=99, dtype=dtype)
    ckpt.load_model_weights(model, f"{out}/model")
    keys = set(dist_checkpointing.load_tensors_metadata(f"{out}/{src}"))
    loaded = dist_checkpointing.load(optimizer_sharded_state_dict(optimizer, model, True, saved_keys=keys), f"{out}/{src}")
    restore_optimizer_state(optimizer, loaded)
    _save(optimizer_sharded_state_dict(optimizer, model, is_loading=False), f"{out}/{dst}")
    steps = [s["step"] for o in inner_optimizers(optimizer) for s in o.optimizer.state.values()]
    return [float(s) for s in steps], len({id(s) for s in steps})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("optim")
    views = run_distributed(_save_work, 2, str(out))
    assert views == [True, True], "the optimizer save must hand megatron views of the optimizer's tensors"
    return out


def _optimizer_tensors(directory) -> dict:
    return {k: v for k, v in read_plain_tensors(directory).items() if k.startswith("optimizer.state.")}


def test_distributed_optimizer_state_is_saved_without_gather_as_megatrons_model_space_tensors(saved):
    new, old = _optimizer_tensors(saved / "new"), _optimizer_tensors(saved / "old")
    assert new and all(".exp_avg." in k or ".exp_avg_sq." in k for k in new), sorted(new)
    # fp32: the main params are the model weights (model/), so only the moments are written
    assert sorted(new) == sorted(k for k in old if ".param." not in k)
    assert_bit_identical(new, {k: old[k] for k in new}, "optimizer state vs megatron's fully_reshardable")
    assert any(v.abs().sum() > 0 for v in new.values())


@pytest.mark.parametrize("target", ["tp2", "dp1", "dp1-old-format"])
def test_the_optimizer_state_loads_at_another_layout_and_saves_back_identically(saved, target):
    world, tp, distopt, src = {"tp2": (2, 2, True, "new"), "dp1": (1, 1, True, "new"),
                               "dp1-old-format": (1, 1, True, "old")}[target]
    results = run_distributed(_load_work, world, str(saved), tp, distopt, src, f"re-{target}")
    for steps, distinct in results:
        assert set(steps) == {2.0}, "Adam's step count is restored"
        assert distinct == len(steps), "each parameter has its own step counter (AdamW adds to it in place)"
    assert_bit_identical(_optimizer_tensors(saved / "new"), _optimizer_tensors(saved / f"re-{target}"),
                         f"optimizer state after a load at {target}")


def test_bf16_fp32_master_weights_are_saved_and_load_from_either_format(tmp_path):
    """bf16 training keeps fp32 master weights in the optimizer: saved as ``fp32_param`` (the plain mixed-precision
    optimizer's name); megatron's 'fully_reshardable' checkpoints call them ``param`` and load as well."""
    assert run_distributed(_save_work, 2, str(tmp_path), "bf16") == [True, True]
    new, old = _optimizer_tensors(tmp_path / "new"), _optimizer_tensors(tmp_path / "old")
    masters = {k: v for k, v in new.items() if ".fp32_param." in k}
    assert masters and all(v.dtype == torch.float32 for v in masters.values())
    assert_bit_identical(masters, {k: old[k.replace(".fp32_param.", ".param.")] for k in masters}, "fp32 masters")
    for src in ("new", "old"):
        run_distributed(_load_work, 1, str(tmp_path), 1, True, src, f"re-{src}", "bf16")
        assert_bit_identical(new, _optimizer_tensors(tmp_path / f"re-{src}"), f"bf16 state loaded from {src}")


# ----------------------------------------------------------------------------------------------- FP8 extra state


def _fake_te(module, layer: int):
    """Give a linear layer a TE-like ``_extra_state``: FP8 scales, an amax history and opaque bytes."""

    class FakeTELinear(type(module)):
        def get_extra_state(self):
            return self.fp8_meta

        def set_extra_state(self, state):
            # as TE does (transformer_engine/pytorch/module/base.py set_extra_state): None means "nothing saved";
            # megatron passes None for an _extra_state a state dict lacks
            if state is not None:
                self.fp8_meta = state

    module.__class__ = FakeTELinear
    g = torch.Generator().manual_seed(100 + layer)
    module.fp8_meta = {"scale": torch.rand(3, generator=g), "amax_history": torch.rand(16, 3, generator=g),
                       "recipe": f"delayed-{layer}".encode()}


def _extra_work(out: str):
    from megarank import checkpoint as ckpt
    from megarank.config import load_config
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("megarank.checkpoint").addHandler(handler)
    logging.getLogger("megarank.checkpoint").setLevel(logging.INFO)
    init_distributed(1, 1)
    cfg = load_config(TINY)

    def model(te: bool, seed: int):
        torch.manual_seed(seed)
        m = build_model(cfg.model, cfg.parallel)
        if te:
            for i, layer in enumerate(m.decoder.layers):
                _fake_te(layer.self_attention.linear_proj, i if seed == 1 else 50 + i)
        return m

    def meta(m):
        return [layer.self_attention.linear_proj.fp8_meta for layer in m.decoder.layers]

    te = model(True, 1)
    step_te = ckpt.save_training_checkpoint(f"{out}/te", 1, te, None, {"step": 1}, cfg)
    plain = model(False, 2)
    step_plain = ckpt.save_training_checkpoint(f"{out}/plain", 1, plain, None, {"step": 1}, cfg)

    te2 = model(True, 3)
    ckpt.load_training_checkpoint(step_te, te2, None)
    plain2 = model(False, 4)
    ckpt.load_training_checkpoint(step_te, plain2, None)  # TE checkpoint -> local spec
    te3 = model(True, 5)
    before = meta(te3)
    ckpt.load_training_checkpoint(step_plain, te3, None)  # local checkpoint -> TE spec
    return {"saved": meta(te), "loaded": meta(te2), "untouched": all(a is b for a, b in zip(before, meta(te3))),
            "extra_dirs": [(step_te / "extra_state").is_dir(), (step_plain / "extra_state").is_dir()],
            "log": records}


def test_fp8_extra_state_round_trips_and_either_side_may_lack_it(tmp_path):
    (result,) = run_distributed(_extra_work, 1, str(tmp_path))
    assert result["extra_dirs"] == [True, False], "only a model with extra state writes extra_state/"
    for saved, loaded in zip(result["saved"], result["loaded"]):
        assert saved["recipe"] == loaded["recipe"]
        assert torch.equal(saved["scale"], loaded["scale"]) and torch.equal(saved["amax_history"], loaded["amax_history"])
    assert result["untouched"], "a checkpoint without extra state leaves the model's own state alone"
    log = "\n".join(result["log"])
    assert "loaded FP8 scaling state (_extra_state)" in log
    assert "that this model has no place for (local spec): not used" in log
    assert "has no FP8 scaling state (_extra_state; saved by the local spec or converted)" in log
