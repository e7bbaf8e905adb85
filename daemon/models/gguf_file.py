"""A lean GGUF reader: metadata decoded to plain Python, tensors as views into one read-only
memory map.

Why not `gguf.GGUFReader`: it builds a numpy view per metadata element, which for a
49k-token vocabulary took 3-5 s and ~170 MB of Python objects on this machine: the biggest
part of loading the default model, and enough to break the "peak while loading ≤ 2× the
weights" bound for bfloat16. The format itself is small (a header, key/values, tensor infos,
aligned data); type codes and block sizes still come from the `gguf` package.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS: dict[int, tuple[str, int]] = {  # GGUF value type → (struct format, size)
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY: dict[int, str] = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "?",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not GGUF, or is truncated or malformed; the message says where."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (torch) order: GGUF's ne reversed
    qtype: GGMLQuantizationType
    data: np.ndarray  # uint8 view of the tensor's bytes inside the memory map


class GGUFFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file cannot be mapped
                raise GGUFFormatError(f"{self.path}: empty file") from exc
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise GGUFFormatError(f"{self.path}: malformed GGUF at byte {self._pos}: {exc}") from exc

    # ------------------------------------------------------------------------------ parsing
    def _read(self, fmt: str, size: int) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._read("<Q", 8)
        end = self._pos + n
        if end > len(self._buf):
            raise GGUFFormatError(f"{self.path}: string of {n} bytes runs past the end at byte {self._pos}")
        s = str(self._buf[self._pos : end], "utf-8")
        self._pos = end
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype = self._read("<I", 4)
            count = self._read("<Q", 8)
            if etype == _STRING:
                return [self._string() for _ in range(count)]
            if etype in _NUMPY:
                arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]  # arrays of arrays
        if vtype in _SCALARS:
            return self._read(*_SCALARS[vtype])
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (no GGUF magic)")
        self._pos = 4
        version = self._read("<I", 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors = self._read("<Q", 8)
        n_kv = self._read("<Q", 8)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I", 4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I", 4)
            dims = [self._read("<Q", 8) for _ in range(n_dims)]
            qtype = GGMLQuantizationType(self._read("<I", 4))
            offset = self._read("<Q", 8)
            infos.append((name, dims, qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(dims, dtype=np.int64)) // block * type_size
            begin = start + offset
            if begin + nbytes > len(self._buf):
                raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
            data = np.frombuffer(self._buf, dtype=np.uint8, count=nbytes, offset=begin)
            self.tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, data)
