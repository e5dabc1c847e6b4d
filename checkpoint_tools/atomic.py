"""Write an output folder atomically (megarank.files.atomic_output_dir): everything goes into a temp folder beside
DST, renamed into place at the end.

A failure (bad input found halfway, Ctrl-C) removes the temp folder, so DST either does not exist or is complete.
"""
from __future__ import annotations

from pathlib import Path

from checkpoint_tools.errors import ConversionError
from megarank.files import atomic_output_dir

__all__ = ["atomic_output_dir", "check_destination"]


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
