"""``RunCheckpoints``, the run folder's manager, on one rank: the lock is taken before ``latest`` is read, when a
save is due, what it saves and what a second manager restores from it (state objects, progress, RNG, weights)."""
import pytest
import torch

from megarank.checkpoint import CheckpointError, RunCheckpoints, latest_checkpoint
from megarank.checkpoint.lock import RunLockError
from megarank.config import load_config

TINY = "configs/tiny.yaml"


def _cfg(run_dir, *overrides):
    return load_config(TINY, [f"checkpoint.dir={run_dir}", *overrides])


class Counter:
    """A stateful object as the manager sees a scheduler or a sampler."""

    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class NoOptimizer:
    """An OptimizerState whose calls are recorded (the trainer hands megatron's in; see training/optimizer_state.py)."""

    def __init__(self):
        self.reloaded = 0

    def sharded_state_dict(self, is_loading, saved_keys=None):
        raise AssertionError("checkpoint.save_optimizer=false: never asked")

    def restore(self, loaded):
        raise AssertionError("no optimizer/ folder: never asked")

    def reload_model_params(self):
        self.reloaded += 1


@pytest.mark.parametrize("interval, due", [(0, [6]), (2, [2, 4, 6]), (4, [4, 6])])
def test_a_save_is_due_every_interval_and_at_the_last_step(tmp_path, interval, due):
    m = RunCheckpoints(_cfg(tmp_path / "run", f"checkpoint.save_interval={interval}"))
    try:
        assert [s for s in range(1, 7) if m.save_due(s, 6)] == due
    finally:
        m.close()


def test_no_run_folder_means_no_lock_no_save_and_nothing_due(tmp_path):
    m = RunCheckpoints(load_config(TINY, ["checkpoint.dir=null"]))
    assert m.dir is None and not m.loads_weights and not m.save_due(6, 6)
    assert m.save(6, {"nonfinite": 0}) is None
    m.close()


def test_the_lock_is_taken_before_latest_is_read(tmp_path):
    run = tmp_path / "run"
    first = RunCheckpoints(_cfg(run))
    (run / "latest").write_text("not a step folder\n")  # a second manager that read it first would say so
    with pytest.raises(RunLockError, match="lock"):
        RunCheckpoints(_cfg(run))
    first.close()
    with pytest.raises(CheckpointError, match="not the name of a step folder"):
        RunCheckpoints(_cfg(run))


def test_save_before_restore_is_refused(tmp_path):
    m = RunCheckpoints(_cfg(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="before restore"):
        m.save(1, {"nonfinite": 0})
    m.close()


def test_a_saved_step_restores_state_objects_progress_rng_and_weights(tmp_path, one_rank):
    from megarank.model import build_model

    run = tmp_path / "run"
    cfg = _cfg(run, "checkpoint.save_optimizer=false", "checkpoint.save_interval=2", "checkpoint.keep_last=1")
    m = RunCheckpoints(cfg)
    assert not m.loads_weights and m.resume_from is None
    model = build_model(cfg.model, cfg.parallel)
    synced = []
    progress = m.restore(model, NoOptimizer(), {"scheduler": Counter(3), "sampler": Counter(7)},
                         before_save=lambda: synced.append(1))
    assert progress == {"step": 0, "nonfinite": 0}
    assert m.maybe_save(1, 6, {"nonfinite": 0}) is None
    assert m.maybe_save(2, 6, {"nonfinite": 1}).name == "step-2"
    torch.manual_seed(123)
    expected_draw = torch.rand(3)  # what the RNG gives right after the save below
    torch.manual_seed(123)
    assert m.maybe_save(4, 6, {"nonfinite": 2}).name == "step-4"
    assert synced == [1, 1]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4"]  # keep_last=1 pruned step-2
    m.close()

    torch.manual_seed(999)
    again = RunCheckpoints(cfg)
    assert again.loads_weights and again.resume_from == latest_checkpoint(run) == run / "step-4"
    restored = build_model(cfg.model, cfg.parallel, init_weights=False)
    scheduler, sampler, opt = Counter(), Counter(), NoOptimizer()
    progress = again.restore(restored, opt, {"scheduler": scheduler, "sampler": sampler})
    again.close()
    assert (progress["step"], progress["nonfinite"], scheduler.n, sampler.n) == (4, 2, 3, 7)
    assert opt.reloaded == 1  # saved without optimizer state: the optimizer copies the loaded weights
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


def test_checkpoint_load_initialises_weights_and_is_ignored_on_resume(tmp_path, one_rank):
    from megarank.model import build_model

    source_cfg = _cfg(tmp_path / "source", "checkpoint.save_optimizer=false")
    source = RunCheckpoints(source_cfg)
    model = build_model(source_cfg.model, source_cfg.parallel)
    source.restore(model, NoOptimizer(), {})
    step_dir = source.save(1, {"nonfinite": 0})
    source.close()

    cfg = _cfg(tmp_path / "run", f"checkpoint.load={step_dir}", "checkpoint.save_optimizer=false")
    m = RunCheckpoints(cfg)
    assert m.loads_weights and m.resume_from is None
    opt = NoOptimizer()
    fresh = build_model(cfg.model, cfg.parallel, init_weights=False)
    assert m.restore(fresh, opt, {}) == {"step": 0, "nonfinite": 0} and opt.reloaded == 1
    m.save(5, {"nonfinite": 0})
    m.close()
    resumed = RunCheckpoints(cfg)  # checkpoint.load still set, but the run folder has a step now
    assert resumed.resume_from == tmp_path / "run" / "step-5"
    assert resumed.restore(build_model(cfg.model, cfg.parallel), NoOptimizer(), {})["step"] == 5
    resumed.close()
