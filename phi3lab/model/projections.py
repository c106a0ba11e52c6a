"""The attention layer's projections into and out of the heads: queries,
keys and values from the normalized input (or, with the opt-in split inputs,
from each head's own copy of it) and the heads' `z` back to the residual
width (per head only when `attn.hook_result` is asked for).

Einsum letters as in `phi3lab.model.attention`: b batch, t position, d
hidden, n head, h head dimension.
"""

from __future__ import annotations

from jax import numpy as jnp


def heads(x, per_head, kernel):
    """Queries, keys or values `[B, T, heads, dh]`: the normalized input `x
    [B, T, D]` through `kernel [D, heads, dh]`, or, given `per_head [B, T,
    heads, D]` (split inputs), each head's own copy through its slice."""
    if per_head is None:
        return jnp.einsum("btd,dnh->btnh", x, kernel)
    return jnp.einsum("btnd,dnh->btnh", per_head, kernel)


def output(z, kernel, sites):
    """The attention output `[B, T, D]` of `z [B, T, Hq, dh]` through
    `kernel [Hq, dh, D]`; per head first (`attn.hook_result [B, T, Hq, D]`,
    then summed) only when `sites` wants that opt-in site."""
    if sites.wants("attn.hook_result"):
        return jnp.sum(sites("attn.hook_result", jnp.einsum("btnh,nhd->btnd", z, kernel)), axis=2)
    return merged_output(z, kernel)


def merged_output(z, kernel):
    """`z [B, T, Hq, dh]` through `kernel [Hq, dh, D]` as one `[B, T, Hq * dh]
    x [Hq * dh, D]` product: contracting the two axes separately, XLA:CPU
    copied the whole kernel transposed (to `[dh, Hq, D]`) in every step of
    the decode loop."""
    heads, head_dim, hidden = kernel.shape
    flat = z.reshape(*z.shape[:2], heads * head_dim)
    return jnp.einsum("btf,fd->btd", flat, kernel.reshape(heads * head_dim, hidden))
