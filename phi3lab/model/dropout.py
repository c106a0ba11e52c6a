"""Inverted dropout driven by an explicit JAX key (None means no dropout)."""

from __future__ import annotations

import jax
from jax import numpy as jnp


def dropout(x, rate: float, key):
    """Zero each element of `x` with probability `rate`, scale the rest.

    Returns `x` unchanged when `key` is None or `rate` is 0, which is how
    inference and tracing run.
    """
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
