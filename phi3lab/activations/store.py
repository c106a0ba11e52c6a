"""`ActivationStore`: rows of activations of real tokens, in memory or on disk.

A store holds, per hook name, an array `[N, ...]` (one row per stored token)
and three tags per row: the document index, the position in the document and
the token id. On disk it is a Zarr v3 group: one chunked array per name and
per tag, and the metadata in the group's attributes (`metadata`). Rows are
appended a batch at a time and the attributes' `rows` count is written after
them, so a writer killed mid-batch leaves a valid store of fewer rows: the
rows past `rows` are ignored when read and overwritten when resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping

import numpy as np

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument, close_matches

FORMAT = "phi3lab.activations/1"
TAGS = ("doc", "position", "token_id")
_TAG_DTYPES = {"doc": np.int64, "position": np.int32, "token_id": np.int32}
_CHUNK_BYTES = 4 << 20  # rows per on-disk chunk: about 4 MiB of one array
_READ_BYTES = 64 << 20  # rows read at a time by `mean` and `batches`
_TO_NUMPY_LIMIT = 4 << 30
# Zarr v3 has no bfloat16 data type: such rows are written as their 16 bits
# (uint16) and viewed back as bfloat16 when read.
_BITS = {"bfloat16": np.uint16}


def row_dtype(name: str) -> np.dtype:
    """The NumPy dtype of rows stored as `name` ("float32", "float16",
    "bfloat16": `ml_dtypes.bfloat16`)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def model_fingerprint(model) -> str:
    """SHA-256 of `model`'s configuration (but its Keras layer name, which
    differs between processes) and of a sample of every weight (its first
    64 values): what a store was collected with."""
    config = {key: value for key, value in model.get_config().items() if key not in ("name", "trainable")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for weight in model.weights:
        digest.update(np.asarray(weight.value).reshape(-1)[:64].tobytes())
    return digest.hexdigest()


def tokenizer_description(tokenizer) -> str | None:
    """A short text naming `tokenizer` (kept in a store's metadata)."""
    if tokenizer is None:
        return None
    return f"{type(tokenizer).__name__}(vocabulary_size={getattr(tokenizer, 'vocabulary_size', None)})"


class LazyRows:
    """The first `rows` rows of a Zarr array, read only when indexed.

    `lazy[a:b]`, `lazy[indices]`, `np.asarray(lazy)`; `shape`, `dtype`, `len`.
    """

    def __init__(self, array, rows: int, dtype: np.dtype | None = None):
        self._array = array
        self.shape = (rows, *array.shape[1:])
        self.dtype = np.dtype(array.dtype) if dtype is None else dtype

    def _read(self, values):
        """`values` read from the array, viewed as this array's dtype (a
        bfloat16 store's bits)."""
        values = np.asarray(values)
        return values if values.dtype == self.dtype else values.view(self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        rows = self.shape[0]
        if isinstance(index, slice):
            return self._read(self._array[slice(*index.indices(rows))])
        if isinstance(index, tuple):
            return np.asarray(self[index[0]])[(slice(None), *index[1:])]
        indices = np.arange(rows)[index]  # bounds and negative indices as NumPy
        return self._read(
            self._array.get_orthogonal_selection(indices) if np.ndim(indices) else self._array[int(indices)]
        )

    def __array__(self, dtype=None, copy=None):
        array = self._read(self._array[: self.shape[0]])
        return array if dtype is None else array.astype(dtype)

    def __repr__(self):
        return f"LazyRows(shape={self.shape}, dtype={self.dtype})"


class ActivationStore:
    """Activations of real tokens over a corpus, one row per stored token.

    Made by `phi3lab.activations.collect` or `phi3lab.activations.open`.
    Rows are in the order they were computed: documents are sorted by length
    within windows, so use `tokens` (or `rows_of`) to find a document's rows.

    Attributes:
        names: the hook names held.
        metadata: model fingerprint, names, shapes, dtype, positions,
            tokenizer, phi3lab version, rows, documents, `complete`.
        path: the Zarr directory, or None for a store in memory.

    Example:
    ```python
    store = phi3lab.activations.collect(model, texts, "blocks.1.hook_resid_post", tokenizer=tok)
    store["blocks.1.hook_resid_post"].shape       # [N, D]
    store.tokens                                  # doc, position, token_id, token
    for x in store.batches("blocks.1.hook_resid_post", 1024): ...
    ```
    """

    def __init__(self, arrays: Mapping, tags: Mapping, metadata: dict, tokenizer=None, path: str | None = None):
        self._arrays = dict(arrays)
        self._tags = dict(tags)
        self.metadata = dict(metadata)
        self.names = list(self.metadata["names"])
        self.tokenizer = tokenizer
        self.path = path

    def __len__(self) -> int:
        return int(self.metadata["rows"])

    @property
    def documents(self) -> int:
        """How many documents the store holds (all their rows)."""
        return int(self.metadata["documents"])

    @property
    def complete(self) -> bool:
        """False for a store whose collection stopped before the corpus ended."""
        return bool(self.metadata["complete"])

    def __repr__(self):
        where = f"'{self.path}'" if self.path else "in memory"
        state = "" if self.complete else ", incomplete: resume with collect(..., resume=True)"
        return f"ActivationStore({where}, {len(self)} rows of {self.documents} documents, names={self.names}{state})"

    def _check_name(self, name: str) -> str:
        if name not in self._arrays:
            raise ValueError(
                f"This store holds no activations named {name!r}; it holds {self.names}. "
                f"Close matches: {close_matches(str(name), self.names)}."
            )
        return name

    def __getitem__(self, name: str):
        """The rows of `name`, `[N, ...]` (a NumPy array in memory, a
        `LazyRows` read on demand on disk)."""
        return self._arrays[self._check_name(name)]

    def __contains__(self, name) -> bool:
        return name in self._arrays

    def tag(self, tag: str) -> np.ndarray:
        """One tag of every row: `"doc"`, `"position"` or `"token_id"` `[N]`."""
        if tag not in TAGS:
            raise bad_argument("tag", tag, f"one of {list(TAGS)}")
        return np.asarray(self._tags[tag])

    @property
    def tokens(self):
        """A pandas DataFrame, one line per row: doc, position, token_id and
        (with a tokenizer) the token as text."""
        import pandas as pd

        frame = pd.DataFrame({tag: self.tag(tag) for tag in TAGS})
        if self.tokenizer is not None:
            frame["token"] = self.tokenizer.display_tokens(frame["token_id"].to_numpy())
        return frame

    def rows_of(self, doc: int) -> np.ndarray:
        """The row indices of document `doc`, in position order."""
        return np.flatnonzero(self.tag("doc") == doc)

    def _row_bytes(self, name: str) -> int:
        array = self[name]
        return int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize

    def _blocks(self, name: str, rows: int | None = None) -> Iterator[tuple[int, int]]:
        """`(start, stop)` of consecutive blocks of about `_READ_BYTES`."""
        rows = rows or max(1, _READ_BYTES // max(1, self._row_bytes(name)))
        for start in range(0, len(self), rows):
            yield start, min(start + rows, len(self))

    def to_numpy(self, name: str, max_bytes: int = _TO_NUMPY_LIMIT) -> np.ndarray:
        """All rows of `name` as one NumPy array, refused past `max_bytes`
        (read it in pieces with `batches` or `store[name][a:b]` instead)."""
        size = len(self) * self._row_bytes(name)
        if size > max_bytes:
            raise ValueError(
                f"`store.to_numpy({name!r})` would hold {size / 2**30:.2f} GiB, more than "
                f"max_bytes={max_bytes} ({max_bytes / 2**30:.2f} GiB). Read it in pieces with "
                "store.batches(name, batch_size) or store[name][start:stop], or raise max_bytes."
            )
        return np.asarray(self[name])

    def mean(self, name: str) -> np.ndarray:
        """The mean row of `name` (accumulated in float64, returned as float32)."""
        if not len(self):
            raise ValueError(f"`store.mean({name!r})`: the store holds no rows.")
        array = self[name]
        total = np.zeros(array.shape[1:], np.float64)
        for start, stop in self._blocks(name):
            total += np.asarray(array[start:stop], np.float64).sum(0)
        return (total / len(self)).astype(np.float32)

    def batches(self, name: str, batch_size: int, shuffle: bool = True, seed: int = 0) -> Iterator[np.ndarray]:
        """Rows of `name` in batches `[batch_size, ...]` (the last one may be
        smaller), for training probes and sparse dictionaries.

        With `shuffle`, blocks of rows are read in a random order (seeded by
        `seed`) and each block's rows are permuted, so a store on disk is read
        in large pieces; every row comes exactly once per pass.

        Example:
        >>> for x in store.batches("blocks.1.hook_resid_post", 4096, seed=epoch): step(x)
        """
        check_positive_int("batch_size", batch_size)
        array = self[name]
        rng = np.random.default_rng(seed)
        block = batch_size * max(1, _READ_BYTES // max(1, batch_size * self._row_bytes(name)))
        blocks = list(self._blocks(name, block))
        if shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        pending = None
        for start, stop in blocks:
            rows = np.asarray(array[start:stop])
            if shuffle:
                rows = rows[rng.permutation(len(rows))]
            if pending is not None:
                rows = np.concatenate([pending, rows])
            whole = len(rows) - len(rows) % batch_size
            for offset in range(0, whole, batch_size):
                yield rows[offset : offset + batch_size]
            pending = rows[whole:] if whole < len(rows) else None
        if pending is not None:
            yield pending


class MemorySink:
    """Collects rows in memory; `store()` gives the `ActivationStore`."""

    def __init__(self, metadata: dict, tokenizer=None):
        self.metadata = dict(metadata, rows=0, documents=0, batches=0, complete=False)
        self.tokenizer = tokenizer
        self._parts: dict[str, list] = {name: [] for name in (*metadata["names"], *TAGS)}

    batches_done = 0  # a store in memory never resumes

    def append(self, rows: Mapping[str, np.ndarray], documents: int) -> None:
        for key, value in rows.items():
            self._parts[key].append(value)
        self.metadata["rows"] += len(rows["doc"])
        self.metadata["documents"] += documents
        self.metadata["batches"] += 1

    def store(self) -> ActivationStore:
        shapes, dtype = self.metadata["shapes"], self.metadata["dtype"]
        arrays = {}
        for name in self.metadata["names"]:
            parts = self._parts[name]
            arrays[name] = np.concatenate(parts) if parts else np.zeros((0, *shapes[name]), row_dtype(dtype))
        tags = {tag: np.concatenate(self._parts[tag] or [np.zeros(0, _TAG_DTYPES[tag])]) for tag in TAGS}
        return ActivationStore(arrays, tags, dict(self.metadata, complete=True), self.tokenizer)


class ZarrSink:
    """Appends rows to a Zarr v3 group at `path`, a batch at a time.

    Args:
        path: the store's directory.
        metadata: the new store's metadata (checked against an existing one
            when `resume`).
        resume: continue a store made with the same metadata.
    """

    def __init__(self, path, metadata: dict, resume: bool, tokenizer=None):
        import zarr

        self.path = os.fspath(path)
        self.tokenizer = tokenizer
        exists = os.path.exists(os.path.join(self.path, "zarr.json"))
        if exists and not resume:
            raise bad_argument(
                "store", self.path, "a path where no store exists yet (or pass resume=True to continue that one)"
            )
        if exists:
            self.group = zarr.open_group(self.path, mode="r+")
            check_same_collection(dict(self.group.attrs), metadata)
            self.metadata = dict(self.group.attrs)
        else:
            self.group = zarr.open_group(self.path, mode="w")
            self.metadata = dict(metadata, rows=0, documents=0, batches=0, complete=False)
            for name in (*metadata["names"], *TAGS):
                shape = tuple(metadata["shapes"][name]) if name in metadata["shapes"] else ()
                dtype = (
                    _BITS.get(metadata["dtype"], metadata["dtype"]) if name in metadata["shapes"] else _TAG_DTYPES[name]
                )
                row_bytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                chunk = max(1, _CHUNK_BYTES // row_bytes)
                # Activations barely compress; writing them raw keeps up with the forward.
                self.group.create_array(name, shape=(0, *shape), chunks=(chunk, *shape), dtype=dtype, compressors=None)
            self.group.attrs.update(self.metadata)
        self.arrays = {name: self.group[name] for name in (*self.metadata["names"], *TAGS)}

    @property
    def batches_done(self) -> int:
        return int(self.metadata["batches"])

    def append(self, rows: Mapping[str, np.ndarray], documents: int) -> None:
        """Write one batch's `rows` (each name and tag) holding `documents`
        whole documents, then record them in the attributes."""
        start = int(self.metadata["rows"])
        stop = start + len(rows["doc"])
        for key, value in rows.items():
            array = self.arrays[key]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = value.view(array.dtype) if value.dtype != array.dtype else value
        self.metadata.update(
            rows=stop, documents=self.metadata["documents"] + documents, batches=self.metadata["batches"] + 1
        )
        self.group.attrs.update({key: self.metadata[key] for key in ("rows", "documents", "batches", "batch_sizes")})

    def store(self) -> ActivationStore:
        self.group.attrs.update(complete=True)
        return open_store(self.path, tokenizer=self.tokenizer)


# What must match for `resume=True` to continue a store.
_SAME_COLLECTION = ("format", "model", "names", "shapes", "dtype", "positions", "max_length", "window", "hooks")


def check_same_collection(found: dict, wanted: dict) -> None:
    """Raise unless the store's metadata `found` was made by the same
    collection settings as `wanted` (model, names, dtype, positions...)."""
    for key in _SAME_COLLECTION:
        if found.get(key) != wanted.get(key):
            what = "model (configuration or weights)" if key == "model" else key
            raise ValueError(
                f"The store at `store` was collected with another {what} ({found.get(key)!r}); this "
                f"collection has {wanted.get(key)!r}. Resume it with the same model and settings, or "
                "collect into a new path."
            )


def open_store(path, model=None, tokenizer=None) -> ActivationStore:
    """Open the activation store at `path` (read only; arrays read lazily).

    Args:
        path: a directory written by `collect(..., store=path)`.
        model: optional; when given, the store must have been collected
            with this model's configuration.
        tokenizer: optional, to show tokens as text in `store.tokens`.

    Returns:
        An `ActivationStore` of the rows written. A partial store (its
        collection was stopped) says so in its repr and in `complete`.

    Example:
    >>> store = phi3lab.activations.open("acts.zarr", model=model)
    >>> store["blocks.1.hook_resid_post"][:10]
    """
    import zarr

    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, "zarr.json")):
        raise bad_argument("path", path, "the directory of an activation store (written by collect(..., store=path))")
    group = zarr.open_group(path, mode="r")
    metadata = dict(group.attrs)
    if metadata.get("format") != FORMAT:
        raise bad_argument("path", path, f"an activation store (format {FORMAT!r}); found {metadata.get('format')!r}")
    if model is not None and metadata["model"] != model_fingerprint(model):
        raise ValueError(
            f"The store at {path!r} was collected with another model (configuration or weights) "
            f"(fingerprint {metadata['model'][:12]}...; this model's is {model_fingerprint(model)[:12]}...). "
            "Open it with the model it was collected with."
        )
    rows = int(metadata["rows"])
    dtype = row_dtype(metadata["dtype"])
    arrays = {name: LazyRows(group[name], rows, dtype) for name in metadata["names"]}
    tags = {tag: LazyRows(group[tag], rows) for tag in TAGS}
    return ActivationStore(arrays, tags, metadata, tokenizer, path)
