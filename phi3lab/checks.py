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


def check_token_ids(token_ids, vocabulary_size: int, name: str = "token_ids") -> None:
    """Raise if concrete `token_ids` are not integers in `[0, vocabulary_size)`.

    Traced (abstract) arrays are not checked: call this before `jit`.
    """
    import jax

    if isinstance(token_ids, jax.core.Tracer):
        return
    ids = np.asarray(token_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"`{name}` must hold integer token ids; received dtype {ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary_size):
        bad = ids[(ids < 0) | (ids >= vocabulary_size)]
        raise ValueError(
            f"`{name}` must be in [0, {vocabulary_size}) (the vocabulary size); "
            f"received ids {sorted(set(bad.tolist()))[:10]} out of range."
        )


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
    check_token_ids(array, model.vocabulary_size, name)
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
    try:
        ids = np.asarray(value)
    except (TypeError, ValueError):
        ids = None
    if (
        value is None
        or ids is None
        or not np.issubdtype(ids.dtype, np.integer)
        or ids.ndim > 1
        or (ids.ndim == 1 and len(ids) != batch)
    ):
        raise bad_argument(name, value, f"a token id (int) or a list of {batch} ids, one per batch row")
    if ids.size and (ids.min() < 0 or ids.max() >= vocabulary_size):
        raise bad_argument(name, value, f"token ids in [0, {vocabulary_size}) (the vocabulary size)")
    return np.broadcast_to(ids, (batch,)).astype(np.int32)


def last_positions(valid: np.ndarray) -> np.ndarray:
    """Index of the last real token in each row of a `[B, T]` padding mask."""
    length = valid.shape[1]
    return (length - 1 - np.argmax(valid[:, ::-1], axis=1)).astype(np.int32)
