"""Write an output folder atomically: everything goes into a temp folder beside DST, renamed into place at the end.

A failure (bad input found halfway, Ctrl-C) removes the temp folder, so DST either does not exist or is complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from checkpoint_tools.errors import ConversionError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(src, dst, overwrite: bool) -> Path:
    """Refuse a DST that exists (unless overwrite) or that would replace/contain SRC."""
    dst, src = Path(dst).absolute(), Path(src).absolute()
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ConversionError(f"destination {dst} would replace the source {src}; choose a separate folder")
    if dst.exists() and not overwrite:
        raise ConversionError(f"destination {dst} already exists; pass --overwrite to replace it")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a folder")
    return dst


@contextmanager
def atomic_output_dir(dst):
    """Yield a fresh temp folder beside ``dst``; on success it replaces ``dst`` by renames, on error it is removed."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():  # --overwrite: move the old folder aside first so DST is never half old, half new
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / "x")
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
