"""The one safetensors reader and writer of the package.

Reading parses the header itself (bfloat16 and fp8 need ml_dtypes views, which the
`safetensors` numpy backend refuses), checks every tensor's byte range against the
file size (a truncated file is named, with the tensor and the bytes it lacks), and
reads tensors lazily, one at a time. Writing refuses non-finite tensors (naming the
first) and stores the SHA-256 of every tensor in the header metadata
(`layerif_sha256`, a JSON object); `read_all(verify=True)` checks them, so flipped
bytes in an adapter are caught instead of trained on. Other tools ignore the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from .. import checksum
from ..errors import LayerIFError

DIGEST_KEY = "layerif_sha256"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
           "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """Keys, metadata and lazily read tensors of one .safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than its 8-byte header length")
                n = int.from_bytes(head, "little")
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise LayerIFError(f"file not found: {self.path}") from None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise LayerIFError(f"cannot read {self.path}: not a valid safetensors file "
                               f"({e})") from None
        if not isinstance(header, dict):
            raise LayerIFError(f"cannot read {self.path}: malformed safetensors header")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self._header = header
        for k, info in header.items():
            try:
                lo, hi = (int(x) for x in info["data_offsets"])
                dt = np.dtype(_DTYPES[info["dtype"]])
                want = int(np.prod(info["shape"], dtype=np.int64)) * dt.itemsize
            except KeyError as e:
                raise LayerIFError(f"{self.path}: tensor {k} has an unsupported dtype or a "
                                   f"malformed entry ({e})") from None
            except (TypeError, ValueError):
                raise LayerIFError(f"{self.path}: tensor {k} has a malformed entry") from None
            if hi - lo != want:
                raise LayerIFError(f"{self.path}: tensor {k} spans {hi - lo} bytes, its shape "
                                   f"and dtype need {want}")
            if self._base + hi > size:
                raise LayerIFError(f"truncated or corrupt safetensors file {self.path}: "
                                   f"tensor {k} needs bytes up to {self._base + hi}, the "
                                   f"file has {size}")

    def keys(self) -> list[str]:
        return list(self._header)

    def get(self, name: str) -> np.ndarray:
        info = self._header[name]
        dt = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        lo, hi = info["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self._base + lo)
            buf = f.read(hi - lo)
        if len(buf) != hi - lo:
            raise LayerIFError(f"truncated or corrupt safetensors file {self.path}: tensor "
                               f"{name} is short of {hi - lo - len(buf)} bytes")
        return np.frombuffer(buf, dtype=dt).reshape(info["shape"])

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header (nothing read)."""
        return tuple(self._header[name]["shape"])

    def get_slice(self, name: str, index: tuple) -> np.ndarray:
        """tensor[index] (basic slices), reading only the bytes it covers (a memory map)."""
        info = self._header[name]
        dt = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        lo = info["data_offsets"][0]
        mm = np.memmap(self.path, dtype=dt, mode="r", offset=self._base + lo,
                       shape=tuple(info["shape"]))
        try:
            return np.array(mm[index])
        finally:
            del mm

    def digests(self) -> dict[str, str] | None:
        raw = self.metadata.get(DIGEST_KEY)
        if raw is None:
            return None
        try:
            d = json.loads(raw)
        except ValueError:
            raise LayerIFError(f"{self.path}: malformed {DIGEST_KEY} metadata") from None
        return d if isinstance(d, dict) else None

    def read_all(self, *, verify: bool = True, finite: bool = True) -> dict[str, np.ndarray]:
        """Every tensor; `verify`: check the stored SHA-256 (when present); `finite`:
        refuse NaN or inf, naming the tensor."""
        out = {k: self.get(k) for k in self.keys()}
        digests = self.digests() if verify else None
        if digests is not None:
            bad = checksum.first_mismatch(out, digests)
            if bad is not None:
                raise LayerIFError(f"{self.path}: tensor {bad} does not match its stored "
                                   "checksum (the file is corrupt)")
        if finite:
            bad = checksum.nonfinite(out)
            if bad is not None:
                raise LayerIFError(f"{self.path}: tensor {bad} holds NaN or inf values")
        return out


def check_finite(tensors: Iterable[tuple[str, np.ndarray]], where: str) -> Iterator[tuple[str, np.ndarray]]:
    """Pass tensors through, refusing the first non-finite one (by name)."""
    for name, t in tensors:
        if checksum.nonfinite({name: t}) is not None:
            raise LayerIFError(f"refusing to write {where}: tensor {name} holds NaN or inf "
                               "values")
        yield name, t


def write(path: str | Path, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (finite, checked) with their SHA-256 in the metadata, to `path`
    (inside a staging folder, or any path: the caller makes it atomic)."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in
               check_finite(tensors.items(), str(path))}
    meta = {"format": "pt", **(metadata or {}),
            DIGEST_KEY: json.dumps(checksum.tree_digests(tensors), sort_keys=True)}
    save_file(tensors, str(path), metadata=meta)
