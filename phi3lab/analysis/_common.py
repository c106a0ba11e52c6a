"""Argument checks and compile caches shared by the analysis modules."""

from __future__ import annotations

import numbers
import re
import weakref
from typing import Callable

import numpy as np

from phi3lab.errors import bad_argument

# model -> {key: compiled function}; entries die with the model.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(model, key, build: Callable[[], Callable]) -> Callable:
    """The compiled function stored for `(model, key)`, built once by `build`."""
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_index(name: str, value, size: int, what: str) -> int:
    """`value` as an index in `[0, size)`; negative values count from the end."""
    if not is_int(value) or not -size <= value < size:
        raise bad_argument(name, value, f"an int {what} in [0, {size}) (negative counts from the end)")
    return int(value) % size


def as_list(name: str, values) -> list:
    """`values` (a scalar or a 1-D sequence) as a list, or a `ValueError` naming `name`."""
    try:
        array = np.atleast_1d(np.asarray(values))
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1:
        raise bad_argument(name, values, "an int or a 1-D list of ints")
    return array.tolist()


def check_trace(model, tr) -> None:
    """Raise unless `tr` is a `Trace` of a model shaped like `model`."""
    from phi3lab.tracing import Trace

    if not isinstance(tr, Trace):
        raise bad_argument("tr", tr, "a phi3lab.Trace (from phi3lab.trace(model, ids))")
    ours = (model.num_layers, model.num_query_heads, model.num_key_value_heads)
    theirs = (tr.num_layers, tr.num_query_heads, tr.num_key_value_heads)
    if ours != theirs:
        raise ValueError(
            "`tr` was traced from a different model: it has (num_layers, num_query_heads, "
            f"num_key_value_heads) = {theirs}, `model` has {ours}."
        )


def require(tr, names: list[str], purpose: str) -> None:
    """Raise a `KeyError` naming the first of `names` missing from `tr` and
    the `phi3lab.trace` call that captures them all."""
    missing = [n for n in names if n not in tr.names]
    if missing:
        patterns = list(dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in names))
        raise KeyError(
            f"{purpose} needs {missing[0]!r}, which `tr` did not capture. Capture it with "
            f"phi3lab.trace(model, ids, names={patterns}) (or names=None for everything)."
        )


def check_token(name: str, value, vocabulary_size: int, batch: int, allow_none: bool = False):
    """A token id (int) or one id per batch row, as an int array `[batch]`."""
    if value is None:
        if allow_none:
            return None
        raise bad_argument(name, None, f"a token id in [0, {vocabulary_size}) or one per batch row")
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError):
        raise bad_argument(name, value, f"a token id (int) or a list of {batch} ids, one per batch row") from None
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim > 1 or (ids.ndim == 1 and len(ids) != batch):
        raise bad_argument(name, value, f"a token id (int) or a list of {batch} ids, one per batch row")
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary_size):
        raise bad_argument(name, value, f"token ids in [0, {vocabulary_size}) (the vocabulary size)")
    return np.broadcast_to(ids, (batch,)).astype(np.int32)


def check_mask(padding_mask, name: str = "padding_mask") -> np.ndarray:
    """A padding mask of 0/1 (or bool) values as a bool array."""
    try:
        mask = np.asarray(padding_mask)
    except (TypeError, ValueError):
        mask = None
    if mask is None or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)) or not np.isin(mask, (0, 1)).all():
        raise bad_argument(name, padding_mask, "None or an array of True/1 for real tokens and False/0 for padding")
    return mask.astype(bool)


def check_ids(name: str, ids, model) -> np.ndarray:
    """Token ids as int32 `[B, T]` (a `[T]` input becomes one row)."""
    from phi3lab.model.config import check_token_ids

    try:
        array = np.asarray(ids)
    except (TypeError, ValueError):
        raise bad_argument(name, ids, "token ids of shape [T] or [B, T] (a rectangular array)") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise bad_argument(name, f"array of shape {np.shape(ids)}", "token ids of shape [T] or [B, T] with T >= 1")
    check_token_ids(array, model.vocabulary_size, name)
    if array.shape[1] > model.max_sequence_length:
        raise bad_argument(name, f"{array.shape[1]} positions", f"at most max_sequence_length={model.max_sequence_length} positions")
    return array.astype(np.int32)


def last_positions(valid: np.ndarray) -> np.ndarray:
    """Index of the last real token in each row of a `[B, T]` padding mask."""
    length = valid.shape[1]
    return (length - 1 - np.argmax(valid[:, ::-1], axis=1)).astype(np.int32)
