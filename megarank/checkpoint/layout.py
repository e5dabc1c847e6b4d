"""The on-disk format of a megarank checkpoint, stated once (the trainer and ``checkpoint_tools`` both use it).

A checkpoint folder (a converted model, or ``<checkpoint.dir>/step-N`` of a training run)::

    config.yaml              the resolved megarank Config (model section is the architecture)
    tokenizer/               tokenizer files (optional for synthetic models)
    model/                   torch_dist checkpoint of the weights: global (TP=1/PP=1-shaped) tensors,
                             layers stacked on dim 0 under ``decoder.layers.*``; loads at any TP/PP
    extra_state/             torch_dist checkpoint of Transformer Engine's ``_extra_state`` (FP8 scales and
                             amax history); only written by models that have it (the TE spec)
    optimizer/               torch_dist checkpoint of the optimizer state in model space
    train_state/rank-*.pt    per-rank step, scheduler, data position and RNG states
    megarank_checkpoint.json {"format_version", "kind": "converted" | "train", "step", "world_size", "tp", "pp", "cp", "dp"}
    megarank_manifest.json   size and CRC-32 of every other file (megarank/checkpoint/integrity.py)

A run folder (``checkpoint.dir``) holds ``step-N/`` folders, ``latest`` (the name of the newest complete one,
replaced atomically), ``.step-N.incomplete/`` while a save is being written, and ``.lock`` (the live run's
``flock``, megarank/checkpoint/lock.py).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

FORMAT_VERSION = 1
MODEL_DIR, OPTIMIZER_DIR, STATE_DIR, MARKER = "model", "optimizer", "train_state", "megarank_checkpoint.json"
EXTRA_DIR = "extra_state"
CONFIG_FILE, TOKENIZER_DIR = "config.yaml", "tokenizer"
MANIFEST = "megarank_manifest.json"
LATEST, LOCK_FILE = "latest", ".lock"
# What loading weights reads (evaluate, rerank, converters): the optimizer and train state are not checked there.
MODEL_PARTS = (CONFIG_FILE, MARKER, MODEL_DIR, EXTRA_DIR, TOKENIZER_DIR)
STEP_NAME = re.compile(r"step-(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path."""


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def incomplete_dir_name(step: int) -> str:
    """The hidden folder a save of ``step`` is written into before it is renamed to ``step-N``."""
    return f".{step_dir_name(step)}.incomplete"


def train_state_file(step_dir, rank: int) -> Path:
    return Path(step_dir) / STATE_DIR / f"rank-{rank}.pt"


def read_marker(path) -> dict:
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MARKER})")
    try:
        return json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{marker} is damaged (not JSON)") from None

def write_marker(path, kind: str, step: int = 0, **extra) -> None:
    data = {"format_version": FORMAT_VERSION, "kind": kind, "step": step, **extra}
    (Path(path) / MARKER).write_text(json.dumps(data, indent=1))
