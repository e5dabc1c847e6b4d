"""Writing outputs atomically, the one way megarank does it: into a temporary sibling, then ``os.replace`` /
``os.rename`` into place, so a reader (or a crash) sees the old file or folder or the new one, never half of one.
The temporary sibling is removed when the write fails (bad input found halfway, Ctrl-C)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_write(path, fsync: bool = False, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """Yield a text file beside ``path``; on success it replaces ``path`` (after an fsync when ``fsync``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the output should get the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str, fsync: bool = False) -> Path:
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output_dir(dst) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``dst``; on success it replaces ``dst`` by renames (an existing ``dst`` is
    moved aside first and removed after, so ``dst`` is never half old, half new); on error it is removed."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should get the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.rename(dst, old / "x")
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
