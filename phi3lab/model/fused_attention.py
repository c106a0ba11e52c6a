"""Causal grouped-query attention through `jax.nn.dot_product_attention`:
the library's fused kernel (cuDNN flash attention on GPUs), which never
exposes the `[T, T]` maps. `Phi3Attention` (in `attention.py`) calls
`flash_attention` where no map is reported; the explicit paths there give
the same `z`.
"""

from __future__ import annotations

import jax
from jax import numpy as jnp


def _has_allowed_key(padding_mask, sliding_window=None):
    """Whether query `t` has any key it may attend to, boolean `[B, T]`:
    a real key at `s <= t` (and `s > t - sliding_window`)."""
    seen = jnp.cumsum(padding_mask.astype(jnp.int32), axis=1)
    if sliding_window is not None:
        seen = seen - jnp.pad(seen, ((0, 0), (sliding_window, 0)))[:, : seen.shape[1]]
    return seen > 0


def fused_attention(q, k, v, padding_mask, sliding_window=None, implementation=None):
    """`z [B, T, Hq, dh]` of causal grouped-query attention through
    `jax.nn.dot_product_attention`, never exposing the `[T, T]` maps. Equal
    to `Phi3Attention.attend`'s `z`, including all-zero rows for queries
    with no key to attend to (left padding).

    Args:
        q: queries `[B, T, Hq, dh]`; k, v: keys and values `[B, T, Hkv, dh]`.
        padding_mask: boolean `[B, T]`, True for real tokens.
        sliding_window: int or None, as `attention_mask` takes it.
        implementation: `jax.nn.dot_product_attention`'s: "cudnn" (flash
            attention, see `flash_attention`), "xla" or None (its choice).
    """
    mask = padding_mask[:, None, None, :].astype(bool)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    z = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=window, implementation=implementation
    )
    return jnp.where(_has_allowed_key(padding_mask, sliding_window)[:, :, None, None], z, 0).astype(v.dtype)


def flash_attention(q, k, v, padding_mask, sliding_window=None):
    """`fused_attention` through cuDNN flash attention, or None where there
    is none: not a GPU, not a 16-bit dtype, or a shape cuDNN refuses. (XLA's
    own `dot_product_attention` computes every score, future keys included:
    slower on CPU than `Phi3Attention._attend_causal_blocks`.)"""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    try:
        return fused_attention(q, k, v, padding_mask, sliding_window, implementation="cudnn")
    except Exception:  # noqa: BLE001 (cuDNN missing or the shape unsupported)
        return None
