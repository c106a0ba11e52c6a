"""The fixed-size key/value cache of cached decoding, as a pytree."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import numpy as jnp

from phi3lab.model.stacked import from_bits, to_bits


class KVCache(NamedTuple):
    """Rotated keys and values of every layer at every cache slot.

    Attributes:
        keys: `[L, B, Hkv, head_dim, S]`, rotated as the attention layer
            rotates them (grouped-query: key/value heads, not query heads).
        values: `[L, B, Hkv, S, head_dim]`.

    Each is either one array stacked over the layers (what the decoder's
    scan over layers carries) or a tuple of `L` per-layer arrays (`by_layer`,
    what a decode loop over unrolled layers carries: each layer's slots are
    then their own buffer, which attention reads in place instead of copying
    one layer out of the stack every step).

    Head-major, and the keys slots-last: a decode step's scores `q . k` and
    weighted values `p . v` read a head's keys as one `[head_dim, S]` and its
    values as one `[S, head_dim]` matrix, the layouts XLA's matrix products
    take, so no step transposes the cache (with keys `[S, head_dim]` XLA:CPU
    copied every layer's keys transposed in every step). Hooks and traces
    still see keys `[B, T, Hkv, head_dim]`: the layout is the cache's own.

    Slot `s` holds what the token at column `s` of the (left-padded) batch
    produced; a `[B, S]` slot mask says which slots hold real tokens.

    Example:
    >>> cache = KVCache.empty(model, batch=1, length=64)
    >>> cache.keys.shape, cache.values.shape
    ((2, 1, 2, 8, 64), (2, 1, 2, 64, 8))
    """

    keys: Any
    values: Any

    @classmethod
    def empty(cls, model, batch: int, length: int) -> KVCache:
        """Zeros for `model` (a `Phi3Backbone`), `batch` rows of `length`
        slots, in the model's compute dtype, stacked over the layers."""
        heads = (model.num_layers, batch, model.num_key_value_heads)
        dtype = model.decoder.attention.compute_dtype
        keys = jnp.zeros((*heads, model.head_dim, length), dtype)
        return cls(keys, jnp.zeros((*heads, length, model.head_dim), dtype))

    @property
    def length(self) -> int:
        """Number of slots `S`."""
        return jax.tree.leaves(self.values)[0].shape[-2]

    @property
    def dtype(self):
        """The dtype of the keys and values."""
        return jax.tree.leaves(self.keys)[0].dtype

    def by_layer(self) -> KVCache:
        """This cache as tuples of per-layer arrays (a copy of its slots),
        each with batch and heads merged: keys `[B * Hkv, head_dim, S]`,
        values `[B * Hkv, S, head_dim]`, the operands of attention's batched
        matrix products as XLA takes them (so a step's write and the
        products read one buffer, in place)."""
        return KVCache(*(tuple(layer.reshape(-1, *layer.shape[2:]) for layer in stack) for stack in self))

    def stacked(self, batch: int) -> KVCache:
        """This cache as arrays stacked over the layers (itself when it is);
        `batch` is `B` (`by_layer` merged it into the heads)."""
        return KVCache(
            *(
                jnp.stack([layer.reshape(batch, -1, *layer.shape[1:]) for layer in slots])
                if isinstance(slots, tuple)
                else slots
                for slots in self
            )
        )


class LayerCache(NamedTuple):
    """One layer's view of a `KVCache`: the attention layer writes and reads
    its own slots through it, while the whole cache stays one pytree that
    the decoder's loop over layers updates in place (no per-layer copies).

    Attributes:
        cache: the `KVCache` of every layer, 16-bit floats held as their
            `uint16` bits (`phi3lab.model.stacked.to_bits`: XLA:CPU then
            writes it in place).
        layer: the layer index (an int, or traced inside the layer scan of
            a stacked cache; an int for a `by_layer` one).
        dtype: the dtype of the keys and values.
    """

    cache: KVCache
    layer: Any
    dtype: Any

    def write(self, keys, values, index) -> LayerCache:
        """Store `keys`, `values` `[B, T, Hkv, head_dim]` at slots
        `index .. index + T - 1` of this layer."""
        new = (jnp.moveaxis(keys, 1, 3), jnp.swapaxes(values, 1, 2))  # [B, Hkv, dh, T], [B, Hkv, T, dh]
        starts = ((0, 0, 0, index), (0, 0, index, 0))
        stored = []
        for slots, update, at in zip(self.cache, new, starts):
            update = to_bits(update.astype(self.dtype))
            if isinstance(slots, tuple):
                merged = update.reshape(-1, *update.shape[2:])
                mine = jax.lax.dynamic_update_slice(slots[self.layer], merged, at[1:])
                stored.append(slots[: self.layer] + (mine,) + slots[self.layer + 1 :])
            else:
                stored.append(jax.lax.dynamic_update_slice(slots, update[None], (self.layer, *at)))
        return self._replace(cache=KVCache(*stored))

    def read(self, batch: int) -> tuple:
        """This layer's `(keys [B, Hkv, head_dim, S], values [B, Hkv, S,
        head_dim])`, `batch` being `B`."""
        return tuple(
            from_bits(
                slots[self.layer].reshape(batch, -1, *slots[self.layer].shape[1:])
                if isinstance(slots, tuple)
                else jax.lax.dynamic_index_in_dim(slots, self.layer, keepdims=False),
                self.dtype,
            )
            for slots in self.cache
        )
