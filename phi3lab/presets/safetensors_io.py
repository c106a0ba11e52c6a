"""Reading and writing `.safetensors` files tensor by tensor, bfloat16 included.

The format is an 8-byte little-endian header size, a JSON header mapping each
tensor name to `{"dtype", "shape", "data_offsets"}`, then the raw bytes. We
memory-map the file so that a tensor is only brought into memory when it is
used (and its pages can be dropped once copied: `drop_pages`), and we check
every offset against the file size so that a truncated or corrupt file fails
with a clear message instead of garbage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from phi3lab.runtime.host_memory import release_freed_memory

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
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
                raise ValueError(f"{self.path} has a corrupt safetensors header: {error}.") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path} has a corrupt safetensors header: not a JSON object.")
        self.metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(self.metadata, dict):
            raise ValueError(f"{self.path} has a corrupt safetensors header: '__metadata__' is not an object.")
        self._data_start = 8 + header_size
        self._entries = header
        self._mapping = None  # the file's memory map, made by the first `tensor`
        data_size = size - self._data_start
        natural = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for name, entry in header.items():
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("shape"), list)
                or not all(natural(n) for n in entry["shape"])
                or not isinstance(entry.get("data_offsets"), list)
                or len(entry["data_offsets"]) != 2
                or not all(natural(n) for n in entry["data_offsets"])
            ):
                raise ValueError(
                    f"{self.path} has a corrupt safetensors header: tensor {name!r} must be "
                    f'{{"dtype", "shape": [ints >= 0], "data_offsets": [begin, end]}}; received {str(entry)[:200]}.'
                )
            if not isinstance(entry.get("dtype"), str) or entry["dtype"] not in DTYPES:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}; "
                    f"supported dtypes are {sorted(DTYPES)}."
                )
            begin, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * np.dtype(DTYPES[entry["dtype"]]).itemsize
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
        if self._mapping is None:
            with open(self.path, "rb") as handle:
                self._mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        count = math.prod(entry["shape"])
        values = np.frombuffer(self._mapping, dtype, count=count, offset=self._data_start + begin)
        return values.reshape(entry["shape"])

    def drop_pages(self) -> None:
        """Give back the pages of the file that reading tensors brought in.
        While mapped they count as this process's resident memory (a layer's
        tensors: 12% of the weights of an 8-layer model); tensors still in
        use are read again from the file if touched. A no-op where the
        system has no `MADV_DONTNEED`."""
        if self._mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mapping.madvise(mmap.MADV_DONTNEED)


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write whose values are made only when its bytes are written.

    Attributes:
        shape: its shape.
        dtype: its NumPy dtype (`ml_dtypes.bfloat16` included).
        make: returns the values (a NumPy or JAX array of that shape and dtype).

    Example:
    >>> PendingTensor((2, 3), np.dtype("float32"), lambda: np.zeros((2, 3), "float32"))
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` (name -> NumPy or JAX array, or `PendingTensor`) to `path`.

    The header is computed from shapes and dtypes alone; tensors are then
    made (a `PendingTensor`), converted and written one at a time, their
    bytes handed to the file without a further copy, and the memory each
    freed given back, so about one tensor's host memory is used beside the
    caller's arrays while writing.
    """
    header, offset = {}, 0
    for name, value in tensors.items():
        dtype = np.dtype(value.dtype)
        if dtype not in NAMES:
            raise ValueError(f"cannot write tensor {name!r} of dtype {dtype}.")
        nbytes = math.prod(value.shape) * dtype.itemsize
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
        for name, value in tensors.items():
            array = np.ascontiguousarray(value.make() if isinstance(value, PendingTensor) else value)
            entry = header[name]
            if list(array.shape) != entry["shape"] or NAMES.get(array.dtype) != entry["dtype"]:
                raise ValueError(
                    f"tensor {name!r} was declared {entry['dtype']} {tuple(entry['shape'])} but made as "
                    f"{array.dtype} {array.shape}."
                )
            handle.write(array.reshape(-1).view(np.uint8).data)
            del array
            # What making this tensor freed goes back to the system before the
            # next one: else the process keeps it (`phi3lab.runtime.host_memory`) and,
            # tensors differing in size, fragments grow with every layer.
            release_freed_memory()
