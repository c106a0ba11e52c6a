"""A corpus as a stream of documents, and documents as padded batches.

`documents` turns what `collect` accepts (strings, id sequences, a
`datasets.Dataset`, any iterable of those) into `(index, ids)` pairs one at a
time, never holding the corpus. `batches` reads a bounded window of them,
sorts it into the length buckets that `trace` runs at
(`phi3lab.tracing.tracer.padded_length`) and cuts each bucket into batches of
a fixed size per bucket, so a whole corpus compiles one program per bucket
(a bucket's remainder waits for the next window: at most one batch size of
documents per bucket is held back).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from phi3lab.checks import check_ids
from phi3lab.errors import bad_argument
from phi3lab.tracing.pipeline import padded_length


def _column(data) -> str:
    """The column of a `datasets.Dataset` that holds the documents."""
    columns = list(data.column_names or ())
    for column in ("input_ids", "text"):
        if column in columns:
            return column
    raise bad_argument("data", f"a dataset with columns {columns}", "a dataset with a `text` or `input_ids` column")


def documents(data, tokenizer, model, max_length: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """`(index, ids)` for each document of `data`, ids int32 `[L]`, cut to
    `max_length` tokens; each is checked (and texts encoded) as it is read."""
    if isinstance(data, (str, bytes)):
        data = [data]
    elif isinstance(data, np.ndarray) and data.ndim == 2:
        data = iter(data)
    elif hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets.Dataset
        column = _column(data)
        data = (row[column] for row in data)
    elif not isinstance(data, Iterable):
        raise bad_argument("data", data, "a list of strings or token-id sequences, a datasets.Dataset, or an iterable")
    for index, item in enumerate(data):
        if isinstance(item, str):
            if not hasattr(tokenizer, "encode"):
                raise bad_argument("tokenizer", tokenizer, f"a Phi3Tokenizer when `data` holds text (data[{index}])")
            ids = tokenizer.encode(item)
        else:
            ids = item
        array = np.asarray(ids)
        if array.ndim != 1 or array.size == 0:
            raise bad_argument(
                f"data[{index}]", f"an array of shape {array.shape}", "a non-empty text or 1-D sequence of token ids"
            )
        yield index, check_ids(f"data[{index}]", array[:max_length], model)[0]


@dataclasses.dataclass(frozen=True)
class Batch:
    """Documents padded on the right to one length bucket.

    Attributes:
        docs: `[B]` document indices (`-1` for filler rows that pad the
            batch to its fixed size; they are run and dropped).
        token_ids, padding_mask: `[B, T]`, T the bucket's padded length.
        num_positions: the rotary setting of the bucket (see `trace`).
    """

    docs: np.ndarray
    token_ids: np.ndarray
    padding_mask: np.ndarray
    num_positions: int | None

    @property
    def key(self) -> tuple[int, int | None]:
        return self.token_ids.shape[1], self.num_positions


def _pad(docs: list[tuple[int, np.ndarray]], key: tuple[int, int | None], size: int) -> Batch:
    padded, num_positions = key
    token_ids = np.zeros((size, padded), np.int32)
    mask = np.zeros((size, padded), bool)
    mask[len(docs) :, 0] = True  # filler rows: one real token, so no row is all padding
    indices = np.full(size, -1, np.int64)
    for row, (index, ids) in enumerate(docs):
        token_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = True
        indices[row] = index
    return Batch(indices, token_ids, mask, num_positions)


def batches(
    docs: Iterator[tuple[int, np.ndarray]],
    model,
    batch_size: Callable[[tuple[int, int | None], int], int],
    window: int,
) -> Iterator[Batch]:
    """Batches of `docs`, read `window` documents at a time and grouped by
    bucket (buckets in increasing length, documents by length then index).
    Every batch of a bucket has `batch_size(bucket, documents in its first
    group)` rows, so each bucket compiles one program; a group's remainder
    waits for the next window, and only the last batch of each bucket at
    the end of the stream is padded with filler rows."""
    waiting: dict[tuple[int, int | None], list] = {}
    while True:
        chunk = list(itertools.islice(docs, window))
        for index, ids in sorted(chunk, key=lambda doc: (len(doc[1]), doc[0])):
            waiting.setdefault(padded_length(model, len(ids)), []).append((index, ids))
        for key in sorted(waiting, key=lambda k: (k[0], k[1] or 0)):
            group = waiting[key]
            if not group:
                continue
            size = batch_size(key, len(group))
            whole = len(group) if not chunk else len(group) - len(group) % size
            for start in range(0, whole, size):
                yield _pad(group[start : start + size], key, size)
            waiting[key] = group[whole:]
        if not chunk:
            return
