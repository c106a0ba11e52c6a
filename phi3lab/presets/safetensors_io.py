"""Reading and writing `.safetensors` files tensor by tensor, bfloat16 included.

The format is an 8-byte little-endian header size, a JSON header mapping each
tensor name to `{"dtype", "shape", "data_offsets"}`, then the raw bytes. We
read it with `numpy.memmap` so that a tensor is only brought into memory when
it is used, and we check every offset against the file size so that a
truncated or corrupt file fails with a clear message instead of garbage.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """A read-only view of one `.safetensors` file.

    Example:
    >>> f = SafetensorsFile("model.safetensors")
    >>> f.keys(), f.shape("model.norm.weight"), f.tensor("model.norm.weight")
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file: it is {size} bytes long.")
            (header_size,) = struct.unpack("<Q", head)
            if header_size > size - 8:
                raise ValueError(
                    f"{self.path} is truncated or corrupt: its header claims "
                    f"{header_size} bytes but the file has {size} bytes."
                )
            try:
                header = json.loads(handle.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{self.path} has a corrupt safetensors header: {error}.") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_size
        self._entries = header
        data_size = size - self._data_start
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}; "
                    f"supported dtypes are {sorted(DTYPES)}."
                )
            begin, end = entry["data_offsets"]
            expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(DTYPES[entry["dtype"]]).itemsize
            if not 0 <= begin <= end <= data_size or end - begin != expected:
                raise ValueError(
                    f"{self.path} is truncated or corrupt: tensor {name!r} "
                    f"needs bytes [{begin}, {end}) of {data_size} data bytes "
                    f"({expected} expected for shape {entry['shape']})."
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a memory-mapped, read-only NumPy array."""
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if end == begin:
            return np.zeros(entry["shape"], dtype)
        return np.memmap(
            self.path,
            dtype=dtype,
            mode="r",
            offset=self._data_start + begin,
            shape=tuple(entry["shape"]),
        )


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> NumPy or JAX array) to `path`.

    The header is computed from shapes and dtypes alone; tensors are then
    converted and written one at a time, so at most one extra host copy of a
    single tensor exists while writing.
    """
    header, offset = {}, 0
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype not in NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype}.")
        nbytes = int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for value in tensors.values():
            handle.write(np.ascontiguousarray(np.asarray(value)).tobytes())
