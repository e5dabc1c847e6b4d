"""Read the tensors of a Hugging Face folder lazily, one tensor at a time, without unpickling anything.

safetensors files are parsed here (8-byte little-endian header length, JSON header, raw data) and every header is
validated against the file size before any tensor is read, so a truncated or corrupt file fails up front with its
name. A tensor is read with a plain ``readinto`` into a fresh buffer (no mmap), so memory stays at about one tensor.

PyTorch ``.bin`` files are pickles (loading one can run arbitrary code): they are refused unless ``allow_pickle``,
and even then read with ``torch.load(weights_only=True, mmap=True)`` and torch's own allow-list only
(``megarank.checkpoint.safe_pickle.torch_load``).
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint_tools.errors import ConversionError
from megarank.checkpoint import safe_pickle

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


def parse_safetensors_header(path: Path) -> dict:
    """name -> TensorInfo for one file, after checking that the header describes exactly the bytes the file holds."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER or 8 + hlen > size:
            raise ConversionError(f"{path} is truncated or corrupt: its header claims {hlen} bytes but the file has {size}")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} is corrupt: its safetensors header is not a JSON object")
    base, end, out = 8 + hlen, 0, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            shape = tuple(int(x) for x in e["shape"])
            lo, hi = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path} is corrupt: bad header entry for tensor {name} ({e!r})") from None
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if hi - lo != expected or lo < 0:
            raise ConversionError(f"{path} is corrupt: tensor {name} {list(shape)} {e['dtype']} needs {expected} bytes, header gives {hi - lo}")
        out[name] = TensorInfo(path, dtype, shape, base + lo, hi - lo)
        end = max(end, hi)
    if base + end > size:
        raise ConversionError(f"{path} is truncated: its header describes {base + end} bytes but the file has {size}")
    return out


class HFWeights:
    """All tensors of an HF model folder: ``names()``, ``shape(name)``, ``dtype(name)``, ``get(name)``."""

    def __init__(self, src, allow_pickle: bool = False):
        self.src = Path(src)
        self.infos: dict = {}
        self._pickled: dict = {}
        files = self._safetensors_files()
        if files:
            for path in files:
                for name, info in parse_safetensors_header(path).items():
                    if name in self.infos:
                        raise ConversionError(f"{self.src}: tensor {name} appears in both {self.infos[name].path.name} and {path.name}")
                    self.infos[name] = info
            self._check_index()
        else:
            self._load_pickled(allow_pickle)

    # ---------------------------------------------------------------------------------------- discovery

    def _safetensors_files(self) -> list:
        index = self.src / INDEX
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index} is not a valid safetensors index ({e})") from None
            files = sorted(set(self.weight_map.values()))
            missing = [f for f in files if not (self.src / f).is_file()]
            if missing:
                raise ConversionError(f"{index} names shard {missing[0]}, which does not exist in {self.src}")
            return [self.src / f for f in files]
        self.weight_map = None
        return sorted(self.src.glob("*.safetensors"))

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, fname in self.weight_map.items():
            info = self.infos.get(name)
            if info is None or info.path.name != fname:
                raise ConversionError(f"{self.src / INDEX} maps tensor {name} to {fname}, but that file does not hold it")

    def _load_pickled(self, allow_pickle: bool) -> None:
        bins = sorted(self.src.glob("*.bin")) + sorted(self.src.glob("*.pt")) + sorted(self.src.glob("*.pth"))
        if not bins:
            raise ConversionError(f"{self.src} holds no model weights (*.safetensors)")
        if not allow_pickle:
            raise ConversionError(
                f"{self.src} holds only PyTorch pickle weights ({bins[0].name}); megarank reads safetensors only because "
                "unpickling can run arbitrary code: convert them to safetensors, or pass --allow-pickle if you trust the file"
            )
        for path in bins:
            try:
                sd = safe_pickle.torch_load(path, mmap=True)
            except safe_pickle.RefusedPickle as e:
                raise ConversionError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
                raise ConversionError(f"{path} could not be read as a weights-only PyTorch file ({e})") from None
            self._pickled.update(sd)

    # ---------------------------------------------------------------------------------------- access

    def names(self) -> list:
        return list(self.infos) if self.infos else list(self._pickled)

    def __contains__(self, name) -> bool:
        return name in self.infos or name in self._pickled

    def shape(self, name) -> tuple:
        return self.infos[name].shape if self.infos else tuple(self._pickled[name].shape)

    def dtype(self, name) -> torch.dtype:
        return self.infos[name].dtype if self.infos else self._pickled[name].dtype

    def nbytes(self, name) -> int:
        return self.infos[name].nbytes if self.infos else self._pickled[name].nbytes

    def get(self, name) -> torch.Tensor:
        """A fresh CPU tensor holding ``name`` (read from disk now; nothing stays cached)."""
        if not self.infos:
            return self._pickled[name].clone()
        info = self.infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with open(info.path, "rb", buffering=0) as f:
                f.seek(info.start)
                view = memoryview(buf.numpy())
                got = 0
                while got < info.nbytes:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ConversionError(f"{info.path} is truncated: reading tensor {name} hit the end of the file")
                    got += n
        return buf.view(info.dtype).reshape(info.shape)

