"""Grouped-query self-attention of Phi-3, with its hook points.

Einsum letters: b batch, t query position, s key position, d hidden,
n query head, k key/value head, g query head within its key/value group,
h head dimension. Query head `n = k * group_size + g` uses key/value head
`k = n // group_size`, the order Hugging Face's `repeat_kv` produces.
"""

from __future__ import annotations

import keras
from jax import numpy as jnp

from phi3lab.model.dropout import dropout
from phi3lab.model.hook_points import NO_HOOKS
from phi3lab.model.rotary import apply_rotary


def attention_mask(padding_mask, num_queries: int, sliding_window=None):
    """Which keys each query may attend to, boolean `[batch, query, key]`.

    A query at position `t` sees keys `s <= t` that are not padding and, with
    a `sliding_window` `w`, only the last `w` of them (`s > t - w`), as
    Hugging Face transformers masks Phi-3.
    """
    queries = jnp.arange(num_queries)[:, None]
    keys = jnp.arange(padding_mask.shape[1])[None, :]
    allowed = keys <= queries
    if sliding_window is not None:
        allowed = allowed & (keys > queries - sliding_window)
    return allowed[None, :, :] & padding_mask[:, None, :].astype(bool)


def masked_softmax(scores, mask):
    """Softmax over the last axis, restricted to `mask`; rows with no allowed
    key are all zeros (never NaN). Masked entries are exactly 0."""
    row_max = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exp = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    return exp / jnp.where(total == 0.0, 1.0, total)


class Phi3Attention(keras.layers.Layer):
    """Grouped-query self-attention with rotary embedding, for all layers.

    The layer holds the kernels of every decoder layer stacked on a leading
    axis, so the decoder can scan over them. `apply` runs one layer from its
    slice of the parameters and reports each intermediate to `sites`.

    Args:
        num_layers: int. Number of decoder layers whose kernels are stacked.
        hidden_dim: int. Model width `D`.
        num_query_heads: int. Query heads `Hq`; `head_dim = D // Hq`.
        num_key_value_heads: int. Key/value heads `Hkv`, dividing `Hq`.
        dropout: float. Dropout on the attention probabilities in training.
        kernel_initializer: initializer for the kernels.

    Weights: `query_kernel [L, D, Hq, dh]`, `key_kernel` and `value_kernel`
    `[L, D, Hkv, dh]`, `output_kernel [L, Hq, dh, D]`.
    """

    def __init__(
        self,
        num_layers,
        hidden_dim,
        num_query_heads,
        num_key_value_heads,
        dropout=0.0,
        kernel_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.dropout = dropout
        self.head_dim = hidden_dim // num_query_heads
        self.group_size = num_query_heads // num_key_value_heads
        initializer = kernel_initializer or keras.initializers.RandomNormal(
            stddev=0.02
        )
        shapes = {
            "query_kernel": (hidden_dim, num_query_heads, self.head_dim),
            "key_kernel": (hidden_dim, num_key_value_heads, self.head_dim),
            "value_kernel": (hidden_dim, num_key_value_heads, self.head_dim),
            "output_kernel": (num_query_heads, self.head_dim, hidden_dim),
        }
        for name, shape in shapes.items():
            variable = self.add_weight(
                name=name,
                shape=(num_layers,) + shape,
                initializer=initializer,
                dtype=self.variable_dtype,
            )
            setattr(self, name, variable)
        self.built = True

    def params(self) -> dict:
        return {
            name: getattr(self, name).value
            for name in ("query_kernel", "key_kernel", "value_kernel", "output_kernel")
        }

    def apply(self, params, x, cos, sin, mask, sites=NO_HOOKS, dropout_key=None):
        """One layer's attention.

        Args:
            params: this layer's kernels (no leading layer axis).
            x: normalized input `[B, T, D]`.
            cos, sin: rotary tables `[T, head_dim]`.
            mask: boolean `[B, T, T]`, from `attention_mask`.
            sites: hook points (`NO_HOOKS` for the plain forward).
            dropout_key: JAX key for attention dropout, or None.

        Returns the attention output `[B, T, D]` (after the output kernel).
        """
        dtype = self.compute_dtype
        w = {name: value.astype(dtype) for name, value in params.items()}
        q = sites("attn.hook_q", jnp.einsum("btd,dnh->btnh", x, w["query_kernel"]))
        k = sites("attn.hook_k", jnp.einsum("bsd,dkh->bskh", x, w["key_kernel"]))
        v = sites("attn.hook_v", jnp.einsum("bsd,dkh->bskh", x, w["value_kernel"]))
        q = sites("attn.hook_rot_q", apply_rotary(q, cos, sin))
        k = sites("attn.hook_rot_k", apply_rotary(k, cos, sin))

        batch, length = q.shape[0], q.shape[1]
        grouped_q = q.reshape(
            batch, length, self.num_key_value_heads, self.group_size, self.head_dim
        )
        scores = jnp.einsum(
            "btkgh,bskh->bkgts",
            grouped_q,
            k,
            preferred_element_type=jnp.float32,
        ).reshape(batch, self.num_query_heads, length, k.shape[1])
        scores = scores * jnp.float32(self.head_dim**-0.5)
        head_mask = mask[:, None, :, :]
        scores = jnp.where(head_mask, scores, -jnp.inf)
        scores = sites("attn.hook_attn_scores", scores)
        pattern = sites("attn.hook_pattern", masked_softmax(scores, head_mask))
        pattern = dropout(pattern, self.dropout, dropout_key).astype(dtype)

        grouped_pattern = pattern.reshape(
            batch, self.num_key_value_heads, self.group_size, length, k.shape[1]
        )
        z = jnp.einsum("bkgts,bskh->btkgh", grouped_pattern, v).reshape(
            batch, length, self.num_query_heads, self.head_dim
        )
        z = sites("attn.hook_z", z)
        return jnp.einsum("btnh,nhd->btd", z, w["output_kernel"])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "dropout": self.dropout,
            }
        )
        return config
