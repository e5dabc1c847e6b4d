"""Checksums of every file in a checkpoint folder, written at save and checked at every load.

A saved folder (a training step or a converted checkpoint) holds ``megarank_manifest.json``::

    {"format_version": 1, "algorithm": "crc32", "files": {"model/__0_0.distcp": {"size": 123, "crc32": "89abcdef"}, ...}}

listing every other file under the folder with its size and CRC-32. The manifest is written last (after every
rank finished writing, before the folder is renamed into place and ``latest`` names it), so a folder with a
manifest is complete, and any byte changed or cut off since is found by :func:`verify_checkpoint_files`,
which names the file. CRC-32 (zlib, ~4 GB/s streamed here against ~1.7 GB/s for SHA-256) is enough: the aim is
to catch disks, copies and truncation, not an adversary. Folders saved before manifests existed have none;
they load with a warning that nothing was verified.

Verifying reads every byte, so a file found intact is remembered per process (by path, size, mtime and
inode): a run that resolves, checks and then loads one folder reads each file once.
"""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

from megarank.checkpoint.layout import MANIFEST, CheckpointError
from megarank.files import atomic_write_text

MANIFEST_VERSION = 1
_CHUNK = 8 << 20

log = logging.getLogger("megarank.checkpoint")



def file_crc32(path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _listed_files(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"))


def write_manifest(path) -> Path:
    """Record size and CRC-32 of every file under ``path`` in ``path/megarank_manifest.json`` (atomically:
    a temp file, fsync, rename). Call once, on one rank, after every file of the folder is written."""
    root = Path(path)
    files = {rel: {"size": (root / rel).stat().st_size, "crc32": file_crc32(root / rel)} for rel in _listed_files(root)}
    data = {"format_version": MANIFEST_VERSION, "algorithm": "crc32", "files": files}
    return atomic_write_text(root / MANIFEST, json.dumps(data, indent=1), fsync=True)


def _read_manifest(root: Path) -> dict | None:
    manifest = root / MANIFEST
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and "size" in v and "crc32" in v
                                                   for v in files.values()):
            raise ValueError("bad entry")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest} is damaged (not a readable checksum manifest)") from None
    return files


_VERIFIED: set = set()  # (file, size, mtime_ns, inode, recorded crc) of files found intact in this process
_WARNED: set = set()


def verify_checkpoint_files(path, parts=None) -> None:
    """Raise CheckpointError naming the first file of checkpoint folder ``path`` that is missing, truncated or
    damaged against its manifest. ``parts``: check only files under these top-level names (e.g. ``("model",
    "config.yaml")``); None = every file. A folder without a manifest (saved before megarank wrote them) is
    accepted with a warning. Each file is read once per process while it stays unchanged."""
    root = Path(path)
    files = _read_manifest(root)
    if files is None:
        if str(root) not in _WARNED:
            _WARNED.add(str(root))
            log.warning("%s has no %s (saved by an older megarank): its files are not verified", root, MANIFEST)
        return
    for rel, want in files.items():
        if parts is not None and rel.split("/", 1)[0] not in parts:
            continue
        p = root / rel
        try:
            st = p.stat()
        except OSError:
            raise CheckpointError(f"{p} is missing (listed in {root / MANIFEST})") from None
        if st.st_size != want["size"]:
            raise CheckpointError(f"{p} is truncated or damaged: {st.st_size} bytes, {want['size']} when saved")
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, want["crc32"])
        if key in _VERIFIED:
            continue
        if file_crc32(p) != want["crc32"]:
            raise CheckpointError(f"{p} is damaged: its checksum does not match the one recorded when it was saved")
        _VERIFIED.add(key)


def check_finite(named_tensors, where) -> None:
    """Raise CheckpointError naming the first tensor with a NaN or Inf value (one pass over the values)."""
    import torch

    for name, t in named_tensors:
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise CheckpointError(f"{where}: tensor {name} holds {kind} values; the checkpoint is damaged "
                                  "or was saved from a diverged run")

