"""The fixed-size key/value cache of cached decoding, as a pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

from jax import numpy as jnp


class KVCache(NamedTuple):
    """Rotated keys and values of every layer at every cache slot.

    Attributes:
        keys: `[L, B, S, Hkv, head_dim]`, rotated as the attention layer
            rotates them (grouped-query: key/value heads, not query heads).
        values: `[L, B, S, Hkv, head_dim]`.

    Slot `s` holds what the token at column `s` of the (left-padded) batch
    produced; a `[B, S]` slot mask says which slots hold real tokens. The
    decoder's scan carries both arrays layer by layer.

    Example:
    >>> cache = KVCache.empty(model, batch=1, length=64)
    >>> cache.keys.shape
    (2, 1, 64, 2, 8)
    """

    keys: Any
    values: Any

    @classmethod
    def empty(cls, model, batch: int, length: int) -> KVCache:
        """Zeros for `model` (a `Phi3Backbone`), `batch` rows of `length`
        slots, in the model's compute dtype."""
        shape = (model.num_layers, batch, length, model.num_key_value_heads, model.head_dim)
        dtype = model.decoder.attention.compute_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        """Number of slots `S`."""
        return self.keys.shape[2]
