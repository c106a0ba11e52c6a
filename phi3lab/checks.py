"""Input checks shared by every public entry, with one rule each.

Every check raises a `ValueError` or `TypeError` that names the argument, the
value received and what is accepted (`phi3lab.errors.bad_argument`), before
anything is compiled, so a user never sees a traceback from inside JAX.

The rule for indices (layers, heads, batch rows, positions): an int in
`[-size, size)`, negative values counting from the end as in Python. Sizes,
counts and window bounds are plain ranges (`check_in_range`) without that
wrap-around.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from phi3lab.errors import bad_argument


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value) -> int:
    """`value` as an int if it is a positive integer, else raise."""
    if not is_int(value):
        raise TypeError(
            f"`{name}` must be a positive integer; received {name}={value!r} of type {type(value).__name__}."
        )
    if value <= 0:
        raise bad_argument(name, value, "a positive integer")
    return int(value)


def check_index(name: str, value, size: int, what: str = "an") -> int:
    """`value` as an index in `[0, size)`; negative values count from the end.

    Example:
    >>> check_index("layer", -1, 4, "layer")
    3
    """
    if not is_int(value) or not -size <= value < size:
        raise bad_argument(name, value, f"an int in [0, {size}) ({what} index; negative values count from the end)")
    return int(value) % size


def check_in_range(name: str, value, low: int, high: int) -> int:
    """`value` as an int in `[low, high)` (no wrap-around)."""
    if not is_int(value) or not low <= value < high:
        raise bad_argument(name, value, f"an int in [{low}, {high})")
    return int(value)


def check_indices(name: str, values, size: int, what: str = "an") -> tuple[int, ...]:
    """An int or a non-empty list of ints, each checked by `check_index`."""
    if is_int(values):
        values = (values,)
    elif isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray, range)):
        raise bad_argument(name, values, f"an int or a list of ints in [0, {size}) ({what} indices)")
    values = tuple(values.tolist() if isinstance(values, np.ndarray) else values)
    if not values or not all(is_int(v) and -size <= v < size for v in values):
        raise bad_argument(name, values, f"an int or a non-empty list of ints in [0, {size}) ({what} indices)")
    return tuple(int(v) % size for v in values)


def check_choice(name: str, value, options: Sequence) -> None:
    """Raise unless `value` is one of `options`."""
    if isinstance(value, (list, dict, set)) or value not in options:
        raise bad_argument(name, value, f"one of {list(options)}")


# How each accepted number of dimensions reads in an error message.
_TOKEN_ID_SHAPES = {
    None: "int token ids",
    (0,): "one token id (an int)",
    (1,): "a 1-D sequence of int token ids",
    (0, 1): "a token id (an int) or a 1-D sequence of them",
}


def check_token_ids(
    name: str, value, vocabulary_size: int | None = None, *, ndim: int | tuple[int, ...] | None = None
) -> np.ndarray:
    """`value` as int32 token ids: integers in `[0, vocabulary_size)` (any
    non-negative int when `vocabulary_size` is None), with `ndim` dimensions
    (one of them for a tuple; any for None). The one rule for token ids:
    inputs, answers, stop tokens and ids to decode are all checked here.

    A wrong dtype is a `TypeError`, a wrong shape or value a `ValueError`,
    each naming `name`. JAX tracers come back unchecked (their values are
    unknown): check before `jit`.

    Example:
    >>> check_token_ids("answer", 7, 32000, ndim=0)
    array(7, dtype=int32)
    """
    import jax

    if isinstance(value, jax.core.Tracer):
        return value
    allowed = (ndim,) if is_int(ndim) else ndim
    shapes = _TOKEN_ID_SHAPES.get(allowed, "int token ids")
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError, OverflowError):
        ids = None
    if ids is None or (allowed is not None and ids.ndim not in allowed):
        raise bad_argument(name, value, shapes)
    if ids.size == 0 and ids.ndim:
        return ids.astype(np.int32)
    if not np.issubdtype(ids.dtype, np.integer):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
        raise TypeError(f"`{name}` must be {shapes} (integer); received {name}={shown} of dtype {ids.dtype}.")
    bad = ids[(ids < 0) | (ids >= vocabulary_size)] if vocabulary_size is not None else ids[ids < 0]
    if bad.size:
        bound = f"in [0, {vocabulary_size}) (the vocabulary size)" if vocabulary_size is not None else "non-negative"
        raise bad_argument(name, value, f"token ids {bound}; out of range: {sorted(set(bad.tolist()))[:10]}")
    return ids.astype(np.int32)


def check_ids(name: str, ids, model) -> np.ndarray:
    """Token ids for `model` as int32 `[B, T]` (a `[T]` input becomes one row),
    within the vocabulary and `max_sequence_length`."""
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError):
        raise bad_argument(name, ids, "token ids of shape [T] or [B, T] (a rectangular array)") from None
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise bad_argument(name, f"array of shape {np.shape(ids)}", "token ids of shape [T] or [B, T] with T >= 1")
    check_token_ids(name, array, model.vocabulary_size)
    if array.shape[1] > model.max_sequence_length:
        raise bad_argument(
            name, f"{array.shape[1]} positions", f"at most max_sequence_length={model.max_sequence_length} positions"
        )
    return array.astype(np.int32)


def check_mask(padding_mask, shape: tuple[int, int], name: str = "padding_mask") -> np.ndarray:
    """A padding mask for ids of `shape` as bool `[B, T]`: None means all
    real; `[T]` becomes one row; values must be 0/1 or bool."""
    if padding_mask is None:
        return np.ones(shape, bool)
    try:
        mask = np.asarray(padding_mask)
    except (TypeError, ValueError):
        mask = None
    if mask is not None and mask.ndim == 1:
        mask = mask[None]
    if mask is None or mask.shape != tuple(shape):
        shown = padding_mask if mask is None else f"array of shape {mask.shape}"
        raise bad_argument(name, shown, f"None or an array of the shape of the ids, {tuple(shape)}")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)) or not np.isin(mask, (0, 1)).all():
        raise bad_argument(name, padding_mask, "True/1 for real tokens and False/0 for padding")
    return mask.astype(bool)


def check_token(name: str, value, vocabulary_size: int, batch: int) -> np.ndarray:
    """A token id (int) or one id per batch row, as an int32 array `[batch]`."""
    ids = check_token_ids(name, value, vocabulary_size, ndim=(0, 1))
    if ids.ndim == 1 and len(ids) != batch:
        raise bad_argument(name, value, f"a token id (int) or a list of {batch} ids, one per batch row")
    return np.broadcast_to(ids, (batch,))


def last_positions(valid: np.ndarray) -> np.ndarray:
    """Index of the last real token in each row of a `[B, T]` padding mask."""
    length = valid.shape[1]
    return (length - 1 - np.argmax(valid[:, ::-1], axis=1)).astype(np.int32)


def check_finite(name: str, values, accepted: str = "finite values", what: str = "values", dtype=None) -> np.ndarray:
    """`values` as a NumPy array (of `dtype` when given), or a `ValueError`
    naming `name` and how many entries are NaN or infinite.

    Example:
    >>> check_finite("data", np.array([1.0, np.nan]), "finite activations", "activations")
    Traceback (most recent call last):
    ValueError: `data` must be finite activations; received data='activations with 1 non-finite (NaN/inf) values'.
    """
    array = np.asarray(values, dtype)
    finite = np.isfinite(array)
    if not finite.all():
        raise bad_argument(name, f"{what} with {int(array.size - finite.sum())} non-finite (NaN/inf) values", accepted)
    return array
