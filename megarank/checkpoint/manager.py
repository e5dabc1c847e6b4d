"""``RunCheckpoints``: the one object the training loop holds for everything about its run folder.

Modelled on torchtitan's ``CheckpointManager`` (torchtitan/components/checkpointer/dcp.py: the trainer calls
``load`` / ``save(step, last_step)`` and the manager decides) and Megatron-Bridge's ``CheckpointManager``
protocol (src/megatron/bridge/training/checkpointing.py). Its life in a run:

1. ``RunCheckpoints(cfg)`` (after the process group exists): takes the run lock *before* ``latest`` is read
   (a second run on the folder stops here, before it writes anything), resolves ``latest`` once, and checks
   that the run's model section describes the checkpoint it resumes from and ``checkpoint.load``, and that a
   resume trains on what the step it resumes was trained on (``training_changes``; refused unless
   ``train.allow_changed_data``).
2. ``loads_weights`` says whether every weight will be overwritten (so the model skips its random init).
3. ``restore(model, optimizer_state, stateful, tokenizer_dir)`` attaches what later saves write and resumes from
   ``latest`` (weights, optimizer state, each stateful object's ``state_dict``, RNG) -- ``checkpoint.load`` is
   ignored then -- or loads ``checkpoint.load``'s weights and has the optimizer copy them into its main params.
4. ``maybe_save(step, last_step, progress)`` saves when one is due (the last step, every
   ``checkpoint.save_interval``) and prunes to ``checkpoint.keep_last``; ``save(step, progress)`` saves now (a
   preemption). Each save logs ``saved step N to <folder> (size, seconds)`` once, on rank 0. 5. ``close()``
   releases the lock.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from megarank.checkpoint.base_record import check_lora_settings, checked_base, lora_base_of, new_record
from megarank.checkpoint.collective import is_rank0
from megarank.checkpoint.layout import CheckpointError
from megarank.checkpoint.lock import acquire_run_lock
from megarank.checkpoint.run_folder import latest_checkpoint, prune_old
from megarank.checkpoint.train_state import (
    OptimizerState, layout_change, load_rng_state, load_training_checkpoint, save_rng_state, save_training_checkpoint,
)
from megarank.checkpoint.weights import check_architecture, load_checkpoint_config, load_model_weights

log = logging.getLogger("megarank.train")

# The config keys that name a file or folder of training data: compared (and saved in config.yaml) as absolute paths.
DATA_PATH_KEYS = ("train_path", "train_run", "teacher_run")


def _absolute(path: Optional[str]) -> Optional[str]:
    return None if path is None else str(Path(os.path.expanduser(path)).resolve())


def training_inputs(cfg) -> dict:
    """What a run trains on, by config key: the data (the groups and how they are drawn), the input string, the
    objective and the score. Keys that this config does not read (``data.train_split`` of JSONL groups,
    ``data.teacher_run`` without a teacher loss...) are left out. Paths are absolute. docs/checkpoints.md states
    the rule; every other key may change on resume (steps, the lr schedule, batch split, layout, logging...)."""
    from megarank.config import TEACHER_LOSSES

    d, t, m = cfg.data, cfg.train, cfg.model
    if d.blend:  # how many sources, each entry's keys (paths absolute), the group rules
        inputs = {"data.blend": len(d.blend)}
        for i, entry in enumerate(d.blend):
            inputs.update({f"data.blend[{i}].{k}": v for k, v in _absolute_entry(entry).items()})
        inputs.update({f"data.{k}": getattr(d, k) for k in ("rotate_positives", "sample_negatives", "repeat_negatives")})
        if any(e.format == "beir" for e in d.blend):
            inputs["data.negatives_top_k"] = d.negatives_top_k
    else:
        inputs = _single_source_inputs(d, t)
    inputs.update({"data.n_passages": d.n_passages, "data.positives_per_group": d.positives_per_group,
                   "data.template": d.template, "data.max_length": d.max_length,
                   "data.max_query_length": d.max_query_length, "train.loss": t.loss,
                   "data.valid_fraction": d.valid_fraction})  # which groups are held out of training
    if t.loss == "kl":
        inputs["train.teacher_temperature"] = t.teacher_temperature
    if t.loss in TEACHER_LOSSES:
        inputs["train.distill_weight"] = t.distill_weight
    inputs.update({"model.pooling": m.pooling, "model.temperature": m.temperature})
    return inputs


def _absolute_entry(entry) -> dict:
    """A data.blend entry as a dict, its path and run absolute."""
    return {**dataclasses.asdict(entry), "path": _absolute(entry.path), "run": _absolute(entry.run)}


def _single_source_inputs(d, t) -> dict:
    """training_inputs' data keys of a run without data.blend."""
    from megarank.config import TEACHER_LOSSES

    inputs = {"data.blend": 0, "data.format": d.format, "data.train_path": _absolute(d.train_path)}
    if d.format == "beir":
        inputs.update({"data.train_split": d.train_split, "data.train_run": _absolute(d.train_run),
                       "data.negatives_top_k": d.negatives_top_k})
        if t.loss in TEACHER_LOSSES:
            inputs["data.teacher_run"] = _absolute(d.teacher_run)
    else:
        inputs.update({f"data.{k}": getattr(d, k) for k in ("rotate_positives", "sample_negatives", "repeat_negatives")})
    if d.format in ("parquet", "hf_disk"):
        inputs["data.columns"] = dataclasses.asdict(d.columns)
    if d.format == "hf_disk":
        inputs["data.train_split"] = d.train_split
    return inputs


def training_changes(saved_cfg, cfg) -> list:
    """[(key, saved value, this run's value)] of ``training_inputs`` that differ (keys both configs read)."""
    old, new = training_inputs(saved_cfg), training_inputs(cfg)
    return [(key, old[key], new[key]) for key in old if key in new and old[key] != new[key]]


def _shown(value) -> str:
    """A config value as one line: null, numbers and plain words as such, other strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, str) and (not value or any(c.isspace() for c in value) or "'" in value):
        return repr(value)
    return str(value)


def describe_changes(changes: list) -> str:
    """``data.train_path /a -> /b, data.max_length 256 -> 128``."""
    return ", ".join(f"{key} {_shown(old)} -> {_shown(new)}" for key, old, new in changes)


def saved_config(cfg):
    """The config as saved in config.yaml: training data paths (data.blend's too) made absolute, so a later resume (from any working
    folder) compares what the run really read."""
    data = dataclasses.replace(cfg.data, **{k: _absolute(getattr(cfg.data, k)) for k in DATA_PATH_KEYS
                                            if getattr(cfg.data, k) is not None})
    data.blend = [dataclasses.replace(e, path=_absolute(e.path), run=_absolute(e.run)) for e in data.blend]
    return dataclasses.replace(cfg, data=data)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class RunCheckpoints:
    """The run folder's manager (see the module docstring). ``cfg`` is the run's whole Config: its
    ``checkpoint`` section drives the manager and it is saved as ``config.yaml`` in every step folder."""

    def __init__(self, cfg):
        self._cfg = cfg
        c = cfg.checkpoint
        self.dir: Optional[Path] = Path(c.dir) if c.dir else None
        self._lock = acquire_run_lock(self.dir) if self.dir else None  # before anything reads or writes there
        self._parts: Optional[dict] = None
        self.changes: list = []  # [(key, saved, now)] a resume allowed by train.allow_changed_data
        try:
            self.resume_from: Optional[Path] = latest_checkpoint(self.dir) if self.dir else None
            for source in (self.resume_from, c.load):
                if source:
                    check_architecture(cfg.model, source)  # fail before building a model that cannot load it
            if self.resume_from is not None:
                self._check_training_inputs()
            self.lora_base = self._lora_base()
        except BaseException:
            self.close()
            raise

    def _check_training_inputs(self) -> None:
        """A resume trains on what ``resume_from`` was trained on (``training_changes``), unless
        ``train.allow_changed_data``; the seed (data order and negatives, and the sampler's saved position) never
        changes. Raises CheckpointError: one line naming each change and both ways out."""
        saved = load_checkpoint_config(self.resume_from)
        cfg, step = self._cfg, self.resume_from
        fresh = f"start fresh with another checkpoint.dir (or delete {self.dir})"
        if saved.train.seed != cfg.train.seed:
            raise CheckpointError(
                f"{step} was trained with train.seed={saved.train.seed} (it orders the groups and draws their negatives, "
                f"and the saved data position belongs to it) but this run has train.seed={cfg.train.seed}; resume with "
                f"train.seed={saved.train.seed}, or {fresh}")
        changes = training_changes(saved, cfg)
        if not changes:
            return
        if not cfg.train.allow_changed_data:
            raise CheckpointError(
                f"{step} was trained on other data or settings than this run's config: {describe_changes(changes)}; "
                f"{fresh}, or resume it anyway with train.allow_changed_data=true")
        self.changes = changes
        if is_rank0():
            log.warning("resuming %s with what it trains on changed (train.allow_changed_data=true): %s", step,
                        describe_changes(changes))

    def _lora_base(self) -> Optional[dict]:
        """A LoRA run's base record (megarank/checkpoint/base_record.py): the resumed step's, checked against its
        base and ``checkpoint.load``, or ``checkpoint.load``'s for a fresh run; None for full fine-tuning. The
        adapter settings of a resumed step never change (its tensors' shapes and meaning depend on them)."""
        cfg, step = self._cfg, self.resume_from
        if step is not None:
            check_lora_settings(load_checkpoint_config(step).model, cfg.model, step)
            if cfg.model.lora_rank == 0:
                return None
            checked_base(step, cfg.checkpoint.load)
            return lora_base_of(step)
        if cfg.model.lora_rank > 0 and cfg.checkpoint.load:
            return new_record(cfg.checkpoint.load)
        return None

    @property
    def loads_weights(self) -> bool:
        """A resume or ``checkpoint.load`` overwrites every weight right after the build."""
        return self.resume_from is not None or bool(self._cfg.checkpoint.load)

    def restore(self, model, optimizer_state: OptimizerState, stateful: dict, tokenizer_dir=None,
                before_save: Optional[Callable[[], None]] = None) -> dict:
        """Attach what saves write (``model`` unwrapped, the optimizer's state, ``stateful`` {name: object with
        ``state_dict`` / ``load_state_dict``}, the tokenizer folder copied into each step, a hook run before
        each save) and restore. -> the saved progress ({"step", "nonfinite", ...}); step 0 when starting fresh."""
        self._parts = dict(model=model, optimizer_state=optimizer_state, stateful=stateful,
                           tokenizer_dir=tokenizer_dir, before_save=before_save)
        if self.resume_from is not None:
            state = load_training_checkpoint(self.resume_from, model, optimizer_state)
            for name, obj in stateful.items():
                obj.load_state_dict(state[name])
            load_rng_state(state["rng"])
            log.info("resumed from %s at step %d%s", self.resume_from, state["step"], layout_change(self.resume_from))
            if state["step"] >= self._cfg.train.steps and is_rank0():
                log.warning("%s is at step %d and train.steps is %d: nothing is left to train (raise train.steps to "
                            "train on)", self.resume_from, state["step"], self._cfg.train.steps)
            return state
        if self._cfg.checkpoint.load:
            load_model_weights(model, self._cfg.checkpoint.load, new_adapters=self.lora_base is not None)
            optimizer_state.reload_model_params()  # bf16/fp16: the fp32 master weights were copied at build
            log.info("initialised weights from %s", self._cfg.checkpoint.load)
        return {"step": 0, "nonfinite": 0}

    def save_due(self, step: int, last_step: int) -> bool:
        interval = self._cfg.checkpoint.save_interval
        return self.dir is not None and (step == last_step or bool(interval and step % interval == 0))

    def maybe_save(self, step: int, last_step: int, progress: dict) -> Optional[Path]:
        """Collective. Save ``step`` if one is due (then prune); -> the step folder, or None."""
        if not self.save_due(step, last_step):
            return None
        folder = self.save(step, progress)
        if is_rank0():
            prune_old(self.dir, self._cfg.checkpoint.keep_last)
        return folder

    def save(self, step: int, progress: dict) -> Optional[Path]:
        """Collective. Save ``step`` now (None without ``checkpoint.dir``); ``progress``: the loop's counters."""
        if self.dir is None:
            return None
        if self._parts is None:
            raise RuntimeError("RunCheckpoints.save before restore: nothing is attached to save")
        p, tic = self._parts, time.time()
        if p["before_save"] is not None:
            p["before_save"]()
        state = {"step": step, **{name: obj.state_dict() for name, obj in p["stateful"].items()}, **progress,
                 "rng": save_rng_state()}
        optimizer_state = p["optimizer_state"] if self._cfg.checkpoint.save_optimizer else None
        folder = save_training_checkpoint(self.dir, step, p["model"], optimizer_state, state, saved_config(self._cfg),
                                          p["tokenizer_dir"], lora_base=self.lora_base)
        if is_rank0():  # every rank's files are in place (the save ends with a barrier)
            log.info("saved step %d to %s (%s, %.1f s)", step, folder, _human(_size(folder)), time.time() - tic)
        return folder

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
