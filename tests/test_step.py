"""``train_step``'s NaN/Inf guard, grad norm and host syncs (2 spawned gloo ranks, DP=2), and the LR schedule.

- A step whose loss is NaN, or Inf with finite gradients, or finite with NaN gradients, on ONE data-parallel
  rank is skipped on both: weights, Adam state and the schedule stay bit-identical; with and without the
  distributed optimizer.
- The grad norm is reported with clipping off (megatron's step returns None there) and equals an fp64 norm
  of the reduced gradients.
- The step's host syncs (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()`` of a tensor) do not grow
  with the number of parameters.
- ``build_scheduler``: step k of a W-step warm-up trains at lr * k / W (step 1 not at 0), then the decay.
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.dist_utils import run_distributed

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
GROUPS, GROUP, SEQ = 2, 5, 24


def _config(*overrides):
    from megarank.config import load_config

    return load_config(TINY, ["train.clip_grad=0", "train.lr_warmup_steps=0", f"data.n_passages={GROUP}",
                              *overrides])


def _micro_batches(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        b = GROUPS * GROUP
        ids = torch.randint(0, 256, (b, SEQ), generator=g)
        lengths = torch.randint(4, SEQ + 1, (b,), generator=g)
        mask = torch.arange(SEQ)[None, :] < lengths[:, None]
        relevance = torch.zeros(GROUPS, GROUP)
        relevance[:, 0] = 1.0
        out.append({"input_ids": ids, "attention_mask": mask, "group_size": GROUP, "relevance": relevance})
    return out


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: finite loss, NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _install_losses(poison_rank: int) -> dict:
    """Losses that go bad on one data-parallel rank only, as train_step callables (scores, relevance, teacher)."""
    import torch.distributed as dist

    from megarank.training.loss import group_loss

    def real(s, r, t=None):
        return group_loss("listwise", s, r, t)

    mine = dist.get_rank() == poison_rank
    return {
        "nan_loss": lambda s, r, t: real(s, r) * (float("nan") if mine else 1.0),
        # d(loss + inf)/d(scores) is finite: only the loss says this step is bad
        "inf_loss": lambda s, r, t: real(s, r) + (float("inf") if mine else 0.0),
        "nan_grad": lambda s, r, t: real(_NanGrad.apply(s) if mine else s, r),
    }


def _build(cfg):
    from megarank.model import build_model
    from megarank.parallel.init import init_distributed
    from megarank.training.optimizer import build_optimizer, build_scheduler, wrap_ddp

    init_distributed(seed=cfg.train.seed)
    model = build_model(cfg.model, cfg.parallel)
    ddp = wrap_ddp(model, cfg)
    optimizer = build_optimizer(ddp, cfg)
    return model, ddp, optimizer, build_scheduler(optimizer, cfg)


def _snapshot(model, optimizer) -> dict:
    from megarank.training.optimizer import inner_optimizers

    snap = {f"w.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, opt in enumerate(inner_optimizers(optimizer)):
        for j, state in enumerate(opt.optimizer.state.values()):
            for k, v in state.items():
                if torch.is_tensor(v):
                    snap[f"s.{i}.{j}.{k}"] = v.detach().clone()
        for j, group in enumerate(opt.optimizer.param_groups):
            for k, p in enumerate(group["params"]):
                snap[f"m.{i}.{j}.{k}"] = p.detach().clone()
    return snap


def _guard_runs(distributed_optimizer: bool) -> dict:
    from megarank.training.step import train_step

    cfg = _config(f"parallel.use_distributed_optimizer={str(distributed_optimizer).lower()}")
    model, ddp, optimizer, scheduler = _build(cfg)
    poisoned = _install_losses(poison_rank=1)
    out = {"first": train_step(ddp, optimizer, scheduler, _micro_batches(0), "listwise")}
    if not distributed_optimizer:  # the full reduced gradients are in the DDP buffers
        out["fp64_norm"] = math.sqrt(sum(p.main_grad.double().pow(2).sum().item() for p in model.parameters()))
    before = _snapshot(model, optimizer)
    out["bad"] = {name: train_step(ddp, optimizer, scheduler, _micro_batches(1), poisoned[name])
                  for name in ("nan_loss", "inf_loss", "nan_grad")}
    after = _snapshot(model, optimizer)
    out["unchanged"] = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    out["n_state"] = sum(k.startswith("s.") for k in before)
    out["scheduler_steps"] = scheduler.num_steps
    out["last"] = train_step(ddp, optimizer, scheduler, _micro_batches(1), "listwise")
    out["moved"] = max((p.detach() - before[f"w.{n}"]).abs().max().item() for n, p in model.named_parameters())
    return out


_SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")
# CPU-only fallbacks upstream that sync once per parameter; on a GPU they are fused kernels: megatron's no-apex
# l2 norm (megatron/core/utils.py:1200-1208; amp_C / TE multi_tensor_l2norm on GPU) and torch's single-tensor
# Adam (its `step.item()` per parameter; TE/apex FusedAdam on GPU).
_CPU_FALLBACKS = {"local_multi_tensor_l2_norm", "_single_tensor_adam"}


def _count_host_syncs(fn) -> int:
    """Host syncs made while ``fn`` runs, outside the CPU fallbacks above."""
    import traceback

    count = [0]
    real = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def counting(name):
        def wrapper(self, *args, **kwargs):
            if not any(frame.name in _CPU_FALLBACKS for frame in traceback.extract_stack(limit=8)):
                count[0] += 1
            return real[name](self, *args, **kwargs)
        return wrapper

    for name in _SYNC_METHODS:
        setattr(torch.Tensor, name, counting(name))
    try:
        fn()
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)
    return count[0]


def _sync_runs() -> dict:
    from megarank.training.step import train_step

    out = {}
    for layers in (2, 4):
        cfg = _config(f"model.num_layers={layers}", "parallel.use_distributed_optimizer=false", "train.clip_grad=1.0")
        model, ddp, optimizer, scheduler = _build(cfg)
        train_step(ddp, optimizer, scheduler, _micro_batches(0), "listwise")  # warm-up: Adam state, lazy inits
        out[layers] = {"params": sum(1 for _ in model.parameters()),
                       "syncs": _count_host_syncs(
                           lambda: train_step(ddp, optimizer, scheduler, _micro_batches(1), "listwise"))}
    return out


def _all_runs() -> dict:
    return {"plain": _guard_runs(False), "distributed": _guard_runs(True), "syncs": _sync_runs()}


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_all_runs, 2, timeout=240)


@pytest.mark.parametrize("layout", ["plain", "distributed"])
def test_a_bad_step_on_one_rank_is_skipped_on_every_rank(runs, layout):
    for r in (rank[layout] for rank in runs):
        assert not r["first"]["skipped"] and not r["last"]["skipped"]
        for name, result in r["bad"].items():
            assert result["skipped"], f"{layout}: {name} step was applied"
        # the grad norm says why: NaN gradients give a NaN norm; the Inf-loss step had finite gradients
        assert math.isnan(r["bad"]["nan_grad"]["grad_norm"]) and math.isnan(r["bad"]["nan_loss"]["grad_norm"])
        assert math.isfinite(r["bad"]["inf_loss"]["grad_norm"])
        assert r["unchanged"] and r["n_state"] > 0, f"{layout}: a skipped step changed weights or Adam state"
        assert r["scheduler_steps"] == 1, "skipped steps must not advance the LR schedule"
        assert r["moved"] > 0, "the next finite step is applied"


def test_grad_norm_is_computed_with_clipping_off(runs):
    plain = [rank["plain"] for rank in runs]
    norm = plain[0]["first"]["grad_norm"]
    assert norm > 0 and norm == pytest.approx(plain[0]["fp64_norm"], rel=1e-6)
    # the same on both ranks and with the distributed optimizer (norm all-reduced over the world there)
    for rank in runs:
        assert rank["plain"]["first"]["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert rank["distributed"]["first"]["grad_norm"] == pytest.approx(norm, rel=1e-6)


def test_host_syncs_do_not_grow_with_the_number_of_parameters(runs):
    for rank in runs:
        small, big = rank["syncs"][2], rank["syncs"][4]
        assert big["params"] > small["params"] + 10
        assert big["syncs"] == small["syncs"], rank["syncs"]
        assert small["syncs"] <= 8, rank["syncs"]


# ----------------------------------------------------------------------------------------------- LR schedule


def _lrs(steps: int, warmup: int, style: str, lr: float = 1e-3, min_lr: float = 1e-5) -> list[float]:
    """The lr of each of `steps` applied steps as train_step sees it (read before the update, stepped after)."""
    from megarank.training.optimizer import build_scheduler

    cfg = _config(f"train.steps={steps}", f"train.lr_warmup_steps={warmup}", f"train.lr_decay_style={style}",
                  f"train.lr={lr}", f"train.min_lr={min_lr}")
    optimizer = SimpleNamespace(param_groups=[{}])
    scheduler = build_scheduler(optimizer, cfg)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out


def _expected(steps, warmup, style, lr=1e-3, min_lr=1e-5):
    v = max(warmup, 1)
    out = []
    for k in range(1, steps + 1):
        if k <= warmup:
            out.append(lr * k / warmup)
            continue
        ratio = (k - v) / (steps + 1 - v)
        coeff = {"cosine": 0.5 * (math.cos(math.pi * ratio) + 1.0), "linear": 1.0 - ratio, "constant": 1.0}[style]
        out.append(min_lr + coeff * (lr - min_lr))
    return out


@pytest.mark.parametrize("steps,warmup,style", [(10, 4, "cosine"), (10, 4, "linear"), (6, 3, "constant"),
                                                (5, 0, "cosine"), (5, 1, "cosine"), (4, 4, "cosine"),
                                                (3, 50, "linear")])
def test_lr_sequence(steps, warmup, style):
    got, want = _lrs(steps, warmup, style), _expected(steps, min(warmup, steps), style)
    assert got == pytest.approx(want, rel=1e-12, abs=0), list(zip(got, want))
    assert got[0] > 0, "step 1 trains at lr 0"
    if warmup:
        assert got[0] == pytest.approx(1e-3 / min(warmup, steps), rel=1e-12)
    assert _lrs(5, 0, style) == _lrs(5, 1, style)  # W = 0 and W = 1 are one schedule: step 1 at the full lr
