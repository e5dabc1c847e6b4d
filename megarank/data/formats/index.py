"""The on-disk index of a training groups file, built once and memory-mapped by every rank.

A groups file read through an index is not parsed into Python objects on each rank: one pass (the first process
to get there) checks every record as the eager readers do and records where each one is (byte offsets of JSONL
lines, the lines of each triples query, the good rows of a Parquet file or ``datasets`` folder copied to an Arrow
file, a NeMo corpus-id file's questions and resolved document rows beside an Arrow copy of its corpora) in compact
numpy arrays; every rank then memory-maps those arrays (the OS page cache holds one copy per machine) and parses
a record when it is drawn.

Where it lives: ``<data path>.megarank-index`` beside the data when that folder is writable, else
``$XDG_CACHE_HOME/megarank/index/<name>.<hash of the absolute path>.megarank-index`` (``~/.cache`` by default);
``MEGARANK_INDEX_DIR`` puts every index in that folder instead. A Parquet, ``datasets`` or corpus-id source's
Arrow copy sits beside its index (``... .megarank-index.arrow``).

When it is rebuilt: the index records each data file's size, modification time (ns) and a hash of its first and
last 64 KiB, the format, the reader's parameters (columns, ``skip_bad_lines``) and this module's version; any
difference, or an index that does not read back whole (its CRC-32), is rebuilt with one log line saying why (as is
one whose reader's own check fails: a missing Arrow copy, a changed corpus folder of a corpus-id file).
Builders take ``flock(<index>.lock)``: the first process builds, the others wait and then read what it wrote. The
index is written to a temporary file and renamed into place, so nothing half-written is ever read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DataError
from .jsonl import MAX_LOGGED_BAD

log = logging.getLogger(__name__)

VERSION = 1
SUFFIX = ".megarank-index"
_MAGIC = b"MEGARANK-INDEX\n\x00"
_ALIGN = 64
_EDGE = 64 * 1024  # bytes hashed at each end of a data file


def file_stamp(path: Path) -> dict:
    """What identifies a data file's content cheaply: size, mtime (ns), and a hash of its first and last 64 KiB."""
    st = os.stat(path)
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > _EDGE:
            f.seek(max(st.st_size - _EDGE, _EDGE))
            h.update(f.read(_EDGE))
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "edges": h.hexdigest()}


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def index_path(data_path: str | os.PathLike) -> Path:
    """Where the index of `data_path` (a file or folder) lives (see the module docstring)."""
    data = Path(os.path.abspath(data_path))
    hashed = f"{data.name}.{hashlib.blake2b(str(data).encode(), digest_size=8).hexdigest()}{SUFFIX}"
    if os.environ.get("MEGARANK_INDEX_DIR"):
        return Path(os.environ["MEGARANK_INDEX_DIR"]) / hashed
    if _writable(data.parent):
        return data.parent / (data.name + SUFFIX)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megarank" / "index"
    return cache / hashed


class Index:
    """A loaded index: ``header`` (the JSON the builder wrote) and ``arrays`` (read-only numpy memory maps)."""

    def __init__(self, path: Path, header: dict, arrays: dict[str, np.ndarray]):
        self.path = path
        self.header = header
        self.arrays = arrays

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _write(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """The index file, written beside `path` and renamed into place: magic, header length, JSON header, then each
    array at a 64-byte boundary (its offset, dtype, shape and CRC-32 in the header)."""
    layout, offset, blobs = {}, 0, []
    for name, array in arrays.items():
        data = np.ascontiguousarray(array)
        raw = data.tobytes()
        layout[name] = {"offset": offset, "dtype": data.dtype.str, "shape": list(data.shape),
                        "crc32": zlib.crc32(raw)}
        blobs.append(raw)
        offset += -(-len(raw) // _ALIGN) * _ALIGN
    body = json.dumps({**header, "arrays": layout, "data_bytes": offset}).encode()
    head_len = -(-(len(_MAGIC) + 8 + len(body)) // _ALIGN) * _ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(body)) + body)
            f.write(b"\x00" * (head_len - f.tell()))
            for raw in blobs:
                f.write(raw)
                f.write(b"\x00" * (-len(raw) % _ALIGN))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[Optional[Index], str]:
    """The index at `path`, or (None, why it cannot be used)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_MAGIC))
            if magic != _MAGIC:
                return None, "it is not a megarank index (bad magic)"
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None, "it does not exist"
    except (OSError, ValueError, struct.error) as e:
        return None, f"it cannot be read ({type(e).__name__}: {e})"
    head_len = -(-(len(_MAGIC) + 8 + n) // _ALIGN) * _ALIGN
    if not isinstance(header, dict) or size != head_len + header.get("data_bytes", -1):
        return None, "it is truncated or corrupt (its size does not match its header)"
    arrays = {}
    for name, spec in header.get("arrays", {}).items():
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        if int(np.prod(shape)) == 0:
            arrays[name] = np.zeros(shape, dtype)
            continue
        array = np.memmap(path, dtype=dtype, mode="r", offset=head_len + spec["offset"], shape=shape)
        if zlib.crc32(array) != spec["crc32"]:
            return None, f"it is corrupt (array '{name}' fails its CRC-32)"
        arrays[name] = array
    return Index(path, header, arrays), ""


def _mismatch(header: dict, key: dict) -> str:
    """Why an index with `header` does not fit `key` ("" when it does): the first difference, in words."""
    if header.get("version") != key["version"]:
        return f"it was written by index version {header.get('version')}, this is {key['version']}"
    if header.get("kind") != key["kind"] or header.get("params") != key["params"]:
        return "it was built with other reader settings"
    old = {f["path"]: f for f in header.get("files", [])}
    for new in key["files"]:
        was = old.get(new["path"])
        if was is None:
            return f"{new['path']} is not in it"
        for field, words in (("size", "size"), ("mtime_ns", "modification time"), ("edges", "content")):
            if was[field] != new[field]:
                return f"{new['path']} changed since ({words} {was[field]} -> {new[field]})"
    if len(old) != len(key["files"]):
        return "it lists other files"
    return ""


def open_index(data_path: str | os.PathLike, files: Sequence[Path], kind: str, params: dict,
               build: Callable[[Path], tuple[dict, dict[str, np.ndarray]]],
               usable: Callable[[Index], str] = lambda index: "") -> Index:
    """The index of `data_path` (its data `files`, read by reader `kind` with `params`), built by
    ``build(index_path) -> (header fields, arrays)`` when missing, stale or corrupt (or when ``usable(index)``, a
    check of what the builder wrote beside it or of files it found while reading, says why not; it is called on a
    recorded error too). ``build`` may raise a DataError: it is recorded in the index (``"error"``, with the
    error's ``index_fields`` if it has them), so the other ranks fail at once with the same sentence."""
    path = index_path(data_path)
    key = {"version": VERSION, "kind": kind, "params": params, "files": [file_stamp(Path(f)) for f in files]}

    def fits(index: Optional[Index]) -> str:
        if index is None:
            return "missing"
        return _mismatch(index.header, key) or usable(index)

    index, why = _read(path)
    if index is not None and not (why := fits(index)):
        return _checked(index)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DataError(f"{data_path}: cannot write its index {path} ({e.strerror}); set MEGARANK_INDEX_DIR to a "
                        "writable folder") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # the first builder builds; the others wait here, then read its index
        index, _ = _read(path)
        if index is not None and not fits(index):
            return _checked(index)
        log.info("indexing %s (the index %s cannot be used: %s)", data_path, path, why)
        try:
            try:
                fields, arrays = build(path)
            except DataError as e:
                _write(path, {**key, "error": str(e), **getattr(e, "index_fields", {})}, {})
                raise
            _write(path, {**key, **fields}, arrays)
        except OSError as e:  # a full disk, a read-only folder: one sentence naming both
            raise DataError(f"{data_path}: cannot write its index {path} ({e.strerror or e}); free space there or "
                            "set MEGARANK_INDEX_DIR to a writable folder") from None
        index, why = _read(path)
        if index is None:
            raise DataError(f"{data_path}: its index {path} does not read back after it was written ({why})")
        return _checked(index)
    finally:
        os.close(lock_fd)


def bad_fields(bad: list[str]) -> dict:
    """The header fields a builder records about the bad records it skipped: their count and the first few (as
    many as ``report_skipped`` logs in full)."""
    return {"bad": len(bad), "bad_first": bad[:MAX_LOGGED_BAD]}


def recorded_bad(index: Index) -> list[str]:
    """The skipped records an index recorded, as ``report_skipped`` takes them: the first few in full, "" for the
    rest (only their count is kept)."""
    h = index.header
    return h["bad_first"] + [""] * (h["bad"] - len(h["bad_first"]))


def _checked(index: Index) -> Index:
    if index.header.get("error"):
        raise DataError(index.header["error"])
    return index


def check_unchanged(data_path: Path, stamp: dict, fd: int, index: Path) -> None:
    """A DataError (one sentence naming both) when the file behind `fd` no longer has the size and mtime it had
    when `index` was built: its offsets would point into other records."""
    st = os.fstat(fd)
    if st.st_size != stamp["size"] or st.st_mtime_ns != stamp["mtime_ns"]:
        raise DataError(f"{data_path}: changed while training read it through its index {index} (size "
                        f"{stamp['size']} -> {st.st_size}); restart the run to index it again")
