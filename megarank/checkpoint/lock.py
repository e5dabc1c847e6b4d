"""One live run per checkpoint folder: global rank 0 holds ``flock(<checkpoint.dir>/.lock)`` while it trains.

A second run on the same folder (a restart while the old job still runs, two jobs given the same
``checkpoint.dir``) would race it for ``latest`` and the step folders; it stops before it writes anything,
with one line naming the folder and the holder (host, pid, start time -- written into the lock file).

The lock is ``flock(2)``: the kernel drops it when the holder's file descriptor closes, i.e. when the
process ends in any way (SIGKILL and node loss included; on NFS the server releases a dead client's lock
when its lease expires), so a crashed run cannot leave it stuck and no stale-lock clean-up exists. The
file itself stays, with the last holder's name in it. flock is process-group-agnostic but is shared by
forked children that inherit the descriptor (megatron's per-save writer processes): such a child keeps the
lock until it has finished its file. On Linux NFS, flock is emulated with a POSIX byte-range lock that
every client sees; Lustre needs the ``flock`` mount option -- where locking is not supported the run
warns and goes on unlocked.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megarank.checkpoint.layout import LOCK_FILE, CheckpointError

log = logging.getLogger(__name__)


class RunLockError(CheckpointError):
    """The checkpoint folder is in use by another live run (the message names both)."""


class RunLock:
    """The held lock; ``release()``, garbage collection (a train() that raised) or the end of the process frees it."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1

    __del__ = release


def _holder_line() -> str:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"host {socket.gethostname()} pid {os.getpid()} since {since}"


def try_lock(run_dir) -> tuple[Optional[RunLock], Optional[str]]:
    """This process only: (the lock, None), or (None, the one-line refusal), or (None, None) where the
    filesystem cannot lock. Never raises for a folder problem, so a collective caller can share the answer."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:  # returned, not raised: the other ranks wait for rank 0's answer
        return None, f"cannot create the run lock {path}: {e.strerror}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None, (f"checkpoint.dir {run_dir} is in use by another live run "
                          f"({holder or 'holder not written yet'}; lock {path}); stop that run or use another "
                          "checkpoint.dir")
        log.warning("cannot lock %s (%s): this filesystem has no flock; a second run on %s would not be refused",
                    path, e.strerror, run_dir)
        return None, None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_line() + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(fd, path), None


def acquire_run_lock(run_dir) -> Optional[RunLock]:
    """Collective: global rank 0 takes the lock on ``run_dir`` for this run; every rank raises
    RunLockError (the same sentence) if another live run holds it. None on the other ranks."""
    lock, refusal = try_lock(run_dir) if not dist.is_initialized() or dist.get_rank() == 0 else (None, None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise RunLockError(refusal)
    return lock
