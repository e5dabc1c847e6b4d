"""The run folder: ``step-N`` checkpoints, the atomic ``latest`` pointer, fall-back to the newest intact step,
pruning and the clean-up of saves a kill left incomplete (format: megarank/checkpoint/layout.py).

``latest`` is replaced atomically only after every rank finished writing and the manifest is written, so a kill
during a save leaves it pointing at the previous one. A run folder whose ``latest`` step is damaged resolves to
the newest intact step, with a warning.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from megarank.checkpoint.integrity import verify_checkpoint_files
from megarank.files import atomic_write_text
from megarank.checkpoint.layout import (
    CONFIG_FILE, LATEST, MARKER, MODEL_DIR, MODEL_PARTS, STEP_NAME, CheckpointError, step_dir_name,
)

log = logging.getLogger("megarank.checkpoint")


def run_dir_of_pointer(path) -> Path:
    """``runs/x/latest`` (the pointer file a run directory keeps) means the run directory ``runs/x``; any other
    path is itself."""
    path = Path(path)
    return path.parent if path.name == LATEST and path.is_file() else path


def model_folder(checkpoint_dir) -> Path:
    """A checkpoint folder from itself, its ``model/``, a run directory (via ``latest``) or its ``latest`` file."""
    path = run_dir_of_pointer(checkpoint_dir)
    if path.name == MODEL_DIR and (path / "metadata.json").is_file() and not (path / MODEL_DIR).is_dir():
        return path.parent
    if not path.exists():
        raise CheckpointError(f"{path} is not a megarank checkpoint: it does not exist")
    if not (path / MODEL_DIR).is_dir() and (path / LATEST).is_file():
        return latest_checkpoint(path, parts=MODEL_PARTS)
    return path


def _step_folders(run_dir: Path) -> list:
    """[(step, folder)] of the ``step-N`` folders in ``run_dir``, newest first."""
    found = []
    for p in run_dir.glob("step-*"):
        m = STEP_NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def _damage(step_dir: Path, parts) -> Optional[str]:
    """Why ``step_dir`` cannot be used (None when it is complete and intact)."""
    if not (step_dir / MARKER).is_file():
        return f"{step_dir} is not a complete checkpoint"
    try:
        verify_checkpoint_files(step_dir, parts=parts)
    except CheckpointError as e:
        return str(e)
    return None


def _newest_intact(run_dir: Path, parts, skip: Optional[Path] = None) -> Optional[Path]:
    for _, p in _step_folders(run_dir):
        if (skip is None or p.resolve() != skip.resolve()) and _damage(p, parts) is None:
            return p
    return None


def latest_checkpoint(run_dir, parts=None) -> Optional[Path]:
    """The step folder named by ``<run_dir>/latest``, checked against its manifest (``parts``: only those
    top-level entries, None = all), or None when there is none yet. A damaged or incomplete step falls back
    to the newest intact ``step-N`` with a warning; without one, the error names what is damaged."""
    run_dir = Path(run_dir)
    marker = run_dir / LATEST
    if not marker.is_file():
        return None
    try:
        name = marker.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = None
    if name is None or not STEP_NAME.fullmatch(name):
        intact = _newest_intact(run_dir, parts)
        hint = (f"; the newest intact checkpoint there is {intact.name} (write '{intact.name}' into it to resume "
                "from there)" if intact else "; the folder holds no intact step-N checkpoint")
        shown = "unreadable bytes" if name is None else repr(name[:40])
        raise CheckpointError(f"{marker} holds {shown}, not the name of a step folder such as step-N{hint}")
    step_dir = run_dir / name
    damage = _damage(step_dir, parts)
    if damage is None:
        return step_dir
    if not step_dir.exists():
        damage = f"{step_dir} does not exist"
    intact = _newest_intact(run_dir, parts, skip=step_dir)
    if intact is None:
        raise CheckpointError(f"{marker} points at {step_dir}, which is not a complete checkpoint ({damage}), "
                              f"and {run_dir} holds no other intact step")
    warning = f"{marker} points at {step_dir}, which cannot be used ({damage}); using {intact}, the newest intact step"
    log.warning(warning)
    return intact


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder itself, or the step folder that a run directory's ``latest`` names (the run directory
    or its ``latest`` file given); its weights' files are checked against the manifest (a damaged ``latest`` step
    falls back, see latest_checkpoint)."""
    path = run_dir_of_pointer(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist or is not a folder")
    if not (path / MODEL_DIR).is_dir() and (path / LATEST).is_file():
        path = latest_checkpoint(path, parts=MODEL_PARTS)
    if not (path / MODEL_DIR / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no {MODEL_DIR}/metadata.json)")
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is not a megarank checkpoint (no config.yaml)")
    verify_checkpoint_files(path, parts=MODEL_PARTS)
    return path


def publish_latest(run_dir, step: int) -> None:
    """Point ``latest`` at ``step-N`` atomically (write a temp file, fsync, rename)."""
    atomic_write_text(Path(run_dir) / LATEST, step_dir_name(step) + "\n", fsync=True)


def _latest_name(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def prune_old(run_dir, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step folders (never the one ``latest`` names)."""
    if keep_last <= 0:
        return
    run_dir = Path(run_dir)
    latest = _latest_name(run_dir)
    for _, p in _step_folders(run_dir)[keep_last:]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def remove_incomplete(run_dir, keep: Optional[Path] = None) -> None:
    """Remove the ``.step-N.incomplete`` folders that killed saves left behind (all but ``keep``)."""
    for p in Path(run_dir).glob(".step-*.incomplete"):
        if p.is_dir() and (keep is None or p.resolve() != Path(keep).resolve()):
            shutil.rmtree(p, ignore_errors=True)
