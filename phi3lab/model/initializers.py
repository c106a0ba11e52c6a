"""Weight initializers, with a switch to skip random init before loading."""

from __future__ import annotations

import contextlib
import contextvars
import math
import random

import jax
import keras
from jax import numpy as jnp

from phi3lab.model.stacked import from_bits, to_bits
from phi3lab.runtime import compile_cache

_ZERO_INIT = contextvars.ContextVar("phi3lab_zero_init", default=False)

# Values drawn per step. XLA:CPU's threefry holds ~18 bytes of temporaries per
# value it draws: one draw of a whole 32064 x 1024 bfloat16 embedding (66 MB)
# peaked 0.65 GB above the process's baseline; a draw of 1M values adds ~20 MB.
_CHUNK = 2**20


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


class ChunkedRandomNormal(keras.initializers.Initializer):
    """Normal values with mean 0, drawn `_CHUNK` values at a time into the
    result, so building a model peaks at its weights plus one chunk's draw.

    Each call draws from its own key (the seed folded with the call's
    number), so two weights of one shape made by the same initializer differ.

    Args:
        stddev: standard deviation of the values.
        seed: an int; default: one drawn from Python's `random` (which
            `keras.utils.set_random_seed` seeds).

    Example:
    >>> ChunkedRandomNormal(stddev=0.02, seed=1)((2, 3), dtype="bfloat16").shape
    (2, 3)
    """

    def __init__(self, stddev: float, seed: int | None = None):
        self.stddev = stddev
        self.seed = seed if seed is not None else random.randint(1, 10**9)
        self._calls = 0

    def __call__(self, shape, dtype=None):
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._calls)
        self._calls += 1
        dtype = jnp.dtype(keras.backend.standardize_dtype(dtype or keras.config.floatx()))
        shape, stddev = tuple(shape), float(self.stddev)
        draw = lambda key: _chunked_normal(key, shape, dtype, stddev)
        # Traceable: `jax.eval_shape` builds a real-size model without drawing.
        return compile_cache.traceable(None, ("init.normal", shape, dtype, stddev), draw)(key)

    def get_config(self):
        return {"stddev": self.stddev, "seed": self.seed}


def _chunked_normal(key, shape: tuple, dtype, stddev: float):
    """`stddev` times standard normals of `shape`, drawn `_CHUNK` at a time
    (the chunk's number folded into `key`) into a flat buffer written in
    place. The buffer holds the values' bits (`stacked.to_bits`): XLA:CPU
    updates a 16-bit float buffer by converting all of it, once per chunk.
    A [8, 1024, 2816] bfloat16 kernel took 0.4-0.8 s, keras' `RandomNormal` 1.4-2.0 s."""
    size = math.prod(shape)
    chunk = max(1, min(size, _CHUNK))
    draw = lambda index, length: to_bits(jax.random.normal(jax.random.fold_in(key, index), (length,), dtype) * stddev)
    write = lambda index, bits: jax.lax.dynamic_update_slice(bits, draw(index, chunk), (index * chunk,))
    whole = size // chunk
    bits = jax.lax.fori_loop(0, whole, write, jnp.zeros((size,), to_bits(jnp.zeros((), dtype)).dtype))
    if size > whole * chunk:
        bits = jax.lax.dynamic_update_slice(bits, draw(whole, size - whole * chunk), (whole * chunk,))
    return from_bits(bits, dtype).reshape(shape)


def default_initializer(stddev: float) -> keras.initializers.Initializer:
    """`ChunkedRandomNormal(stddev)` (keras-hub's Phi-3 init is a
    `RandomNormal` of the same deviation), or zeros inside `zero_initialization()`."""
    if _ZERO_INIT.get():
        return keras.initializers.Zeros()
    return ChunkedRandomNormal(stddev=stddev)
