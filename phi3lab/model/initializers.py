"""Weight initializers, with a switch to skip random init before loading."""

from __future__ import annotations

import contextlib
import contextvars

import keras

_ZERO_INIT = contextvars.ContextVar("phi3lab_zero_init", default=False)


@contextlib.contextmanager
def zero_initialization():
    """Inside this block, new layers start from zeros instead of random
    normals: loading a checkpoint then costs no random-number generation
    (minutes for billions of weights on a CPU)."""
    token = _ZERO_INIT.set(True)
    try:
        yield
    finally:
        _ZERO_INIT.reset(token)


def default_initializer(stddev: float) -> keras.initializers.Initializer:
    """`RandomNormal(stddev)` (keras-hub's Phi-3 init), or zeros inside
    `zero_initialization()`."""
    if _ZERO_INIT.get():
        return keras.initializers.Zeros()
    return keras.initializers.RandomNormal(stddev=stddev)
