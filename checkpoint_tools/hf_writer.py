"""Write sharded safetensors + ``model.safetensors.index.json``, streaming one tensor at a time.

The shard layout is planned from names, shapes and dtypes before any data exists, so each shard's header is
written first and then each tensor's bytes as the producer yields it; memory stays at about one tensor. The files
are standard safetensors (header padded to 8 bytes, offsets in order), readable by ``safetensors`` and
``transformers``. The caller writes into a temp folder (see ``atomic``).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_tools.hf_reader import INDEX, SAFETENSORS_DTYPES

DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
DEFAULT_MAX_SHARD = 5 * 1024**3


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (decimal for GB/MB, binary for GiB/MiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Planned:
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list, max_shard_bytes: int = DEFAULT_MAX_SHARD) -> list:
    """Split planned tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current:
        shards.append(current)
    return shards


def _header(shard: list) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(raw)) + raw


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(out_dir, planned: list, produce, max_shard_bytes: int = DEFAULT_MAX_SHARD, on_written=None) -> list:
    """Write ``planned`` tensors; ``produce`` yields (name, tensor) in the same order. Returns the shard names."""
    out_dir = Path(out_dir)
    shards = plan_shards(planned, max_shard_bytes)
    names = [shard_name(k, len(shards)) for k in range(len(shards))]
    weight_map = {}
    source = iter(produce)
    for shard, fname in zip(shards, names):
        with open(out_dir / fname, "wb") as f:
            f.write(_header(shard))
            for t in shard:
                name, tensor = next(source)
                if name != t.name or tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                    raise AssertionError(f"producer gave {name} {tuple(tensor.shape)} {tensor.dtype}, planned {t.name} {t.shape} {t.dtype}")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                weight_map[t.name] = fname
                if on_written is not None:
                    on_written(t)
    total = sum(t.nbytes for t in planned)
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return names
