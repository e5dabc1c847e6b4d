"""The base model a LoRA checkpoint applies to: recorded at save, checked at every load.

A LoRA run's step folders hold only what trains (adapters, score head, optionally the final norm) in ``model/``;
the frozen base stays where ``checkpoint.load`` named it. The step's marker (``megarank_checkpoint.json``)
records it as ``"lora_base": {"path": <absolute base folder>, "fingerprint": <hex>}``. The fingerprint is a CRC-32
over the base's ``model/`` file list with each file's size and CRC-32, read from the base's manifest
(megarank/checkpoint/integrity.py; computed from the files when a base has none), so it changes with any byte of
the base weights and costs one small JSON read. A load of the step re-reads it and refuses another base.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Optional

from megarank.checkpoint.integrity import file_crc32
from megarank.checkpoint.layout import MANIFEST, MARKER, MODEL_DIR, CheckpointError, read_marker
from megarank.checkpoint.run_folder import model_folder

RECORD_KEY = "lora_base"


def base_fingerprint(folder: Path) -> str:
    """CRC-32 over ``model/``'s (path, size, crc32) entries of the folder's manifest (or of its files)."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        files = json.loads(manifest.read_text())["files"]
        entries = {rel: (v["size"], v["crc32"]) for rel, v in files.items() if rel.startswith(MODEL_DIR + "/")}
    else:
        entries = {p.relative_to(folder).as_posix(): (p.stat().st_size, file_crc32(p))
                   for p in sorted((folder / MODEL_DIR).rglob("*")) if p.is_file()}
    return f"{zlib.crc32(json.dumps(sorted(entries.items())).encode()) & 0xFFFFFFFF:08x}"


def lora_base_of(folder) -> Optional[dict]:
    """The base record of a checkpoint folder, or None when it holds full weights (or is a bare ``model/``
    folder without a marker)."""
    folder = Path(folder)
    return read_marker(folder).get(RECORD_KEY) if (folder / MARKER).is_file() else None


def new_record(base) -> dict:
    """The record of ``base`` (``checkpoint.load``: a checkpoint folder or a run folder's ``latest``) for a LoRA
    run's first save. A LoRA checkpoint cannot be a base: its adapters would be left out."""
    folder = model_folder(base).resolve()
    if lora_base_of(folder) is not None:
        raise CheckpointError(f"checkpoint.load {folder} is a LoRA checkpoint (adapters only); train new adapters on "
                              "its merged export (megarank-convert megatron-to-hf, then hf-to-megatron)")
    return {"path": str(folder), "fingerprint": base_fingerprint(folder)}


def checked_base(step_dir, base=None) -> Path:
    """The base folder a LoRA checkpoint applies to, after checking it is the one recorded: same fingerprint,
    and, when ``base`` (a run's ``checkpoint.load``) is given, the same weights as that."""
    step_dir = Path(step_dir)
    record = lora_base_of(step_dir)
    recorded = Path(record["path"])
    if not (recorded / MODEL_DIR).is_dir():
        raise CheckpointError(f"{step_dir} holds LoRA adapters for the base {recorded}, which is gone; "
                              "put the base back at that path")
    if base_fingerprint(recorded) != record["fingerprint"]:
        raise CheckpointError(f"{step_dir} holds LoRA adapters for the base {recorded} as it was when they were saved, "
                              "but its weights have changed since")
    if base is not None:
        given = model_folder(base).resolve()
        if given != recorded and base_fingerprint(given) != record["fingerprint"]:
            raise CheckpointError(f"{step_dir} holds LoRA adapters for the base {recorded}, but checkpoint.load names "
                                  f"another base, {given}; set checkpoint.load={recorded}")
    return recorded


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets", "lora_train_final_norm")


def check_lora_settings(saved_model_cfg, model_cfg, step_dir) -> None:
    """A resume keeps the adapter settings of the step it resumes (lora_dropout may change); name the first that
    differs."""
    if saved_model_cfg.lora_rank == model_cfg.lora_rank == 0:
        return
    for key in LORA_KEYS:
        saved, now = getattr(saved_model_cfg, key), getattr(model_cfg, key)
        if saved != now:
            raise CheckpointError(f"{step_dir} was trained with model.{key}={saved} but this run has model.{key}={now}; "
                                  f"resume with model.{key}={saved}, or start fresh with another checkpoint.dir")
