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


# ----------------------------------------------------------------------------------------------- what a run trains on


@pytest.fixture(scope="module")
def saved_step(tmp_path_factory, one_rank):
    """A run folder with one saved step (trained on the built-in sample, train_path given relative to the cwd)."""
    import os

    from megarank.data import sample_data_dir
    from megarank.model import build_model

    work = tmp_path_factory.mktemp("saved")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        os.symlink(sample_data_dir(), "sample")
        cfg = load_config(TINY if os.path.isabs(TINY) else os.path.join(cwd, TINY),
                          [f"checkpoint.dir={work / 'run'}", "checkpoint.save_optimizer=false", "data.train_path=sample"])
        m = RunCheckpoints(cfg)
        m.restore(build_model(cfg.model, cfg.parallel), NoOptimizer(), {})
        m.save(3, {"nonfinite": 0})
        m.close()
    finally:
        os.chdir(cwd)
    return work, work / "run"


def _resume_cfg(saved_step, *overrides):
    work, run = saved_step
    return _cfg(run, "checkpoint.save_optimizer=false", f"data.train_path={work / 'sample'}", *overrides)


def test_the_saved_config_names_the_training_data_by_its_absolute_path(saved_step):
    from megarank.checkpoint import load_checkpoint_config
    from megarank.data import sample_data_dir

    _, run = saved_step
    assert load_checkpoint_config(run / "step-3").data.train_path == str(sample_data_dir().resolve())


def test_a_resume_on_the_same_data_with_other_steps_schedule_batching_layout_or_logging_is_allowed(saved_step, caplog):
    free = ["train.steps=40", "train.lr=1e-4", "train.lr_warmup_steps=0", "train.lr_decay_style=linear",
            "train.global_batch_size=2", "train.micro_batch_size=1", "train.micro_batch_tokens=4096",
            "train.log_interval=1", "train.eval_interval=2", "train.clip_grad=0.5", "train.weight_decay=0.0",
            "data.packing=false", "data.pad_to_multiple_of=16", "data.eval_top_k=20", "data.skip_bad_lines=true",
            "model.dtype=bf16", "model.hidden_dropout=0.1", "parallel.use_distributed_optimizer=false",
            "checkpoint.save_interval=1", "checkpoint.keep_last=0", "logging.level=DEBUG"]
    with caplog.at_level("WARNING", logger="megarank.train"):
        m = RunCheckpoints(_resume_cfg(saved_step, *free))
    assert m.resume_from == saved_step[1] / "step-3" and m.changes == []
    m.close()
    assert "train.allow_changed_data" not in caplog.text


CHANGED = ["data.format=jsonl", "data.max_length=128", "train.loss=pointwise", "model.pooling=last"]


def test_a_resume_with_changed_data_is_refused_in_one_line_naming_each_change(saved_step):
    from megarank.data import sample_data_dir

    _, run = saved_step
    groups = sample_data_dir() / "train_groups.jsonl"
    with pytest.raises(CheckpointError) as caught:
        RunCheckpoints(_resume_cfg(saved_step, *CHANGED, f"data.train_path={groups}"))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{run / 'step-3'} was trained on other data or settings than this run's config: ")
    sample = sample_data_dir().resolve()
    for change in ("data.format beir -> jsonl", f"data.train_path {sample} -> {groups.resolve()}",
                   "data.max_length 256 -> 128", "train.loss listwise -> pointwise", "model.pooling avg -> last"):
        assert change in message, change
    assert "data.train_split" not in message, "JSONL groups have no split: not a change"
    assert message.endswith(f"start fresh with another checkpoint.dir (or delete {run}), or resume it anyway with "
                            "train.allow_changed_data=true")
    RunCheckpoints(_resume_cfg(saved_step)).close()  # the refused manager released the run lock


def test_train_allow_changed_data_resumes_with_a_warning_listing_the_changes(saved_step, caplog):
    with caplog.at_level("WARNING", logger="megarank.train"):
        m = RunCheckpoints(_resume_cfg(saved_step, "data.max_length=128", "data.template=q:{query} p:{passage}",
                                       "train.allow_changed_data=true"))
    m.close()
    assert [k for k, _, _ in m.changes] == ["data.template", "data.max_length"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "train.allow_changed_data=true" in warnings[0]
    assert "data.template 'question:{query} \\n \\n passage:{passage}' -> 'q:{query} p:{passage}'" in warnings[0]
    assert "data.max_length 256 -> 128" in warnings[0]


def test_another_seed_is_refused_even_with_allow_changed_data(saved_step):
    with pytest.raises(CheckpointError, match=r"was trained with train.seed=1234 .* this run has train.seed=7; "
                                              r"resume with train.seed=1234, or start fresh"):
        RunCheckpoints(_resume_cfg(saved_step, "train.seed=7", "train.allow_changed_data=true"))


def test_teacher_settings_count_only_for_the_losses_that_read_them():
    from megarank.checkpoint.manager import training_changes

    base = load_config(TINY)
    # listwise reads no teacher: its temperature, weight and run are no change
    assert training_changes(base, load_config(TINY, ["train.teacher_temperature=2.0"])) == []
    kl = load_config(TINY, ["train.loss=kl", "data.teacher_run=/t.trec"])
    assert training_changes(kl, load_config(TINY, ["train.loss=kl", "data.teacher_run=/t.trec",
                                                   "train.teacher_temperature=2.0", "train.distill_weight=0.5"])) == [
        ("train.teacher_temperature", 1.0, 2.0), ("train.distill_weight", 1.0, 0.5)]
    assert training_changes(kl, load_config(TINY, ["train.loss=kl", "data.teacher_run=/u.trec"])) == [
        ("data.teacher_run", "/t.trec", "/u.trec")]


def test_every_save_logs_its_folder_size_and_seconds_once(tmp_path, one_rank, caplog):
    import re

    from megarank.model import build_model

    cfg = _cfg(tmp_path / "run", "checkpoint.save_optimizer=false")
    m = RunCheckpoints(cfg)
    m.restore(build_model(cfg.model, cfg.parallel), NoOptimizer(), {})
    with caplog.at_level("INFO", logger="megarank.train"):
        m.maybe_save(20, 20, {"nonfinite": 0})
    m.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved step")]
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"saved step 20 to {re.escape(str(tmp_path / 'run' / 'step-20'))} \(\d+\.\d (KB|MB), "
                        r"\d+\.\d s\)", lines[0]), lines[0]
