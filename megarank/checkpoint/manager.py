"""``RunCheckpoints``: the one object the training loop holds for everything about its run folder.

Modelled on torchtitan's ``CheckpointManager`` (torchtitan/components/checkpointer/dcp.py: the trainer calls
``load`` / ``save(step, last_step)`` and the manager decides) and Megatron-Bridge's ``CheckpointManager``
protocol (src/megatron/bridge/training/checkpointing.py). Its life in a run:

1. ``RunCheckpoints(cfg)`` (after the process group exists): takes the run lock *before* ``latest`` is read
   (a second run on the folder stops here, before it writes anything), resolves ``latest`` once, and checks
   that the run's model section describes the checkpoint it resumes from and ``checkpoint.load``.
2. ``loads_weights`` says whether every weight will be overwritten (so the model skips its random init).
3. ``restore(model, optimizer_state, stateful, tokenizer_dir)`` attaches what later saves write and resumes from
   ``latest`` (weights, optimizer state, each stateful object's ``state_dict``, RNG) -- ``checkpoint.load`` is
   ignored then -- or loads ``checkpoint.load``'s weights and has the optimizer copy them into its main params.
4. ``maybe_save(step, last_step, progress)`` saves when one is due (the last step, every
   ``checkpoint.save_interval``) and prunes to ``checkpoint.keep_last``; ``save(step, progress)`` saves now (a
   preemption). 5. ``close()`` releases the lock.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from megarank.checkpoint.collective import is_rank0
from megarank.checkpoint.lock import acquire_run_lock
from megarank.checkpoint.run_folder import latest_checkpoint, prune_old
from megarank.checkpoint.train_state import (
    OptimizerState, layout_change, load_rng_state, load_training_checkpoint, save_rng_state, save_training_checkpoint,
)
from megarank.checkpoint.weights import check_architecture, load_model_weights

log = logging.getLogger("megarank.train")


class RunCheckpoints:
    """The run folder's manager (see the module docstring). ``cfg`` is the run's whole Config: its
    ``checkpoint`` section drives the manager and it is saved as ``config.yaml`` in every step folder."""

    def __init__(self, cfg):
        self._cfg = cfg
        c = cfg.checkpoint
        self.dir: Optional[Path] = Path(c.dir) if c.dir else None
        self._lock = acquire_run_lock(self.dir) if self.dir else None  # before anything reads or writes there
        self.resume_from: Optional[Path] = latest_checkpoint(self.dir) if self.dir else None
        for source in (self.resume_from, c.load):
            if source:
                check_architecture(cfg.model, source)  # fail before building a model that cannot load it
        self._parts: Optional[dict] = None

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
            return state
        if self._cfg.checkpoint.load:
            load_model_weights(model, self._cfg.checkpoint.load)
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
        p = self._parts
        if p["before_save"] is not None:
            p["before_save"]()
        state = {"step": step, **{name: obj.state_dict() for name, obj in p["stateful"].items()}, **progress,
                 "rng": save_rng_state()}
        optimizer_state = p["optimizer_state"] if self._cfg.checkpoint.save_optimizer else None
        return save_training_checkpoint(self.dir, step, p["model"], optimizer_state, state, self._cfg, p["tokenizer_dir"])

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
