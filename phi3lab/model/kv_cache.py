"""The fixed-size key/value cache of cached decoding, as a pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import numpy as jnp

from phi3lab.model.stacked import from_bits, to_bits


class KVCache(NamedTuple):
    """Rotated keys and values of every layer at every cache slot.

    Attributes:
        keys: `[L, B, Hkv, S, head_dim]`, rotated as the attention layer
            rotates them (grouped-query: key/value heads, not query heads).
        values: `[L, B, Hkv, S, head_dim]`.

    Head-major, so each decode step's attention reads a head's slots as one
    contiguous `[S, head_dim]` matrix (no per-step transpose of the cache).

    Slot `s` holds what the token at column `s` of the (left-padded) batch
    produced; a `[B, S]` slot mask says which slots hold real tokens. The
    decoder's scan carries both arrays layer by layer.

    Example:
    >>> cache = KVCache.empty(model, batch=1, length=64)
    >>> cache.keys.shape
    (2, 1, 2, 64, 8)
    """

    keys: Any
    values: Any

    @classmethod
    def empty(cls, model, batch: int, length: int) -> KVCache:
        """Zeros for `model` (a `Phi3Backbone`), `batch` rows of `length`
        slots, in the model's compute dtype."""
        shape = (model.num_layers, batch, model.num_key_value_heads, length, model.head_dim)
        dtype = model.decoder.attention.compute_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        """Number of slots `S`."""
        return self.keys.shape[3]


class LayerCache(NamedTuple):
    """One layer's view of a `KVCache`: the attention layer writes and reads
    its own slots through it, while the whole cache stays one array that the
    decoder's loop over layers updates in place (no per-layer copies).

    Attributes:
        cache: the `KVCache` of every layer, 16-bit floats held as their
            `uint16` bits (`phi3lab.model.stacked.to_bits`: XLA:CPU then
            writes it in place).
        layer: the layer index (an int, or traced inside the layer scan).
        dtype: the dtype of the keys and values.
    """

    cache: KVCache
    layer: Any
    dtype: Any

    def write(self, keys, values, index) -> LayerCache:
        """Store `keys`, `values` `[B, T, Hkv, head_dim]` at slots
        `index .. index + T - 1` of this layer."""
        at = (self.layer, 0, 0, index, 0)
        stored = (
            jax.lax.dynamic_update_slice(slots, to_bits(jnp.swapaxes(new, 1, 2)[None].astype(self.dtype)), at)
            for slots, new in zip(self.cache, (keys, values))
        )
        return self._replace(cache=KVCache(*stored))

    def read(self) -> tuple:
        """This layer's `(keys, values)`, each `[B, Hkv, S, head_dim]`."""
        return tuple(
            from_bits(jax.lax.dynamic_index_in_dim(slots, self.layer, keepdims=False), self.dtype)
            for slots in self.cache
        )
