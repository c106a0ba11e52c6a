"""Error messages that name the argument, the value and what is accepted."""

from __future__ import annotations

import difflib
from typing import Iterable


def bad_argument(name: str, value, accepted: str) -> ValueError:
    """Build a `ValueError` for argument `name` that received `value`.

    Example:
    >>> raise bad_argument("num_layers", 0, "a positive integer")
    Traceback (most recent call last):
    ValueError: `num_layers` must be a positive integer; received num_layers=0.
    """
    shown = repr(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return ValueError(f"`{name}` must be {accepted}; received {name}={shown}.")


def close_matches(word: str, options: Iterable[str], n: int = 5) -> str:
    """A short 'did you mean' text listing the options closest to `word`."""
    options = list(options)
    near = difflib.get_close_matches(word, options, n=n, cutoff=0.4)
    if not near:
        near = options[:n]
    return ", ".join(repr(o) for o in near)
