"""Grouped-query self-attention of Phi-3, with its hook points.

Einsum letters: b batch, t query position, s key position, d hidden,
n query head, k key/value head, g query head within its key/value group,
h head dimension. Query head `n = k * group_size + g` uses key/value head
`k = n // group_size`, the order Hugging Face's `repeat_kv` produces.
"""

from __future__ import annotations

import jax
import keras
import numpy as np
from jax import numpy as jnp

from phi3lab.model import projections
from phi3lab.model.attention_paths import DEFAULT_PATHS, AttentionPaths, deprecated_attribute
from phi3lab.model.dropout import dropout
from phi3lab.model.fused_attention import flash_attention
from phi3lab.model.hook_points import NO_HOOKS
from phi3lab.model.initializers import default_initializer
from phi3lab.model.quantize import add_projection_kernels, dequantize
from phi3lab.model.rotary import apply_rotary


def key_value_heads(num_query_heads: int, num_key_value_heads: int) -> np.ndarray:
    """The key/value head each query head reads, int `[num_query_heads]`:
    query head `n` reads `n // (num_query_heads // num_key_value_heads)`.
    The one statement of the grouped-query mapping; hooks, analysis and
    widgets use it.

    Example:
    >>> key_value_heads(4, 2)
    array([0, 0, 1, 1])
    """
    return np.arange(num_query_heads) // (num_query_heads // num_key_value_heads)


def attention_mask(padding_mask, query_start, num_queries: int, sliding_window=None, key_start=0):
    """Which keys each query may attend to, boolean `[batch, query, key]`.

    Queries are positions `query_start .. query_start + num_queries - 1`,
    keys are positions `key_start ...` (`padding_mask [batch, key]` marks
    the real ones). A query at position `t` sees keys `s <= t` that are not
    padding and, with a `sliding_window` `w`, only the last `w` of them
    (`s > t - w`), as Hugging Face transformers masks Phi-3.
    """
    queries = query_start + jnp.arange(num_queries)[:, None]
    keys = key_start + jnp.arange(padding_mask.shape[1])[None, :]
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
        sliding_window: int or None. Attend only to the last this-many keys.
        kernel_initializer: initializer for the kernels.
        query_chunk_size: deprecated: set the model's `attention_paths`.

    `attention_paths` holds the model's `AttentionPaths` (how attention is
    computed when no map is reported; `Phi3Backbone.attention_paths` reads
    and replaces it), which `Phi3Backbone.apply` passes to every layer's
    `apply`; the layer's methods never read it themselves.

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
        sliding_window=None,
        kernel_initializer=None,
        query_chunk_size=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sliding_window = sliding_window
        self.attention_paths = DEFAULT_PATHS
        if query_chunk_size is not None:
            self.query_chunk_size = query_chunk_size  # the deprecated setter: warns, replaces attention_paths
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.dropout = dropout
        self.head_dim = hidden_dim // num_query_heads
        self.score_scale = self.head_dim**-0.5  # scores = q . k * score_scale
        self.group_size = num_query_heads // num_key_value_heads
        initializer = kernel_initializer or default_initializer(stddev=0.02)
        shapes = {
            "query_kernel": (hidden_dim, num_query_heads, self.head_dim),
            "key_kernel": (hidden_dim, num_key_value_heads, self.head_dim),
            "value_kernel": (hidden_dim, num_key_value_heads, self.head_dim),
            "output_kernel": (num_query_heads, self.head_dim, hidden_dim),
        }
        self.stacked_weight_names = add_projection_kernels(self, num_layers, shapes, initializer)
        self.built = True

    # The mutable settings of earlier releases, kept for one release.
    use_fused_attention = deprecated_attribute("use_fused_attention", "fused")
    causal_block = deprecated_attribute("causal_block", "causal_block")
    query_chunk_size = deprecated_attribute("query_chunk_size", "query_chunk_size")

    def params(self) -> dict:
        return {name: getattr(self, name).value for name in self.stacked_weight_names}

    def attend(self, q, k, v, padding_mask, query_start, dropout_key=None, sites=NO_HOOKS, cached=False):
        """Attention of query rows `q [B, n, Hq, dh]` (positions `query_start
        ...`) over all keys `k, v [B, T, Hkv, dh]` (or, when `cached`, as the
        `KVCache` stores them: `k [B, Hkv, dh, T]`, `v [B, Hkv, T, dh]`):
        scores, softmax, then the weighted values.

        The masked scores and the pattern go through `sites`
        (`attn.hook_attn_scores`, `attn.hook_pattern`), so a hook on the
        scores changes the pattern and a hook on the pattern changes `z`.
        Returns `(scores, pattern, z)`: scores and pattern `[B, Hq, n, T]`
        (float32) and `z [B, n, Hq, dh]`."""
        mask = attention_mask(padding_mask, query_start, q.shape[1], self.sliding_window)[:, None]
        scores = sites("attn.hook_attn_scores", self._masked_scores(q, k, mask, cached))
        pattern = sites("attn.hook_pattern", masked_softmax(scores, mask))
        z = self._weighted_values(dropout(pattern, self.dropout, dropout_key), v, cached)
        return scores, pattern, z

    def _masked_scores(self, q, k, mask, cached=False):
        """Scaled scores `q . k * score_scale` of query rows `q [B, n, Hq,
        dh]` against keys `k` (`[B, T, Hkv, dh]`, or `[B, Hkv, dh, T]` when
        `cached`), float32 `[B, Hq, n, T]`, -inf where `mask` is False."""
        keys = "bkhs" if cached else "bskh"
        batch, rows, length = q.shape[0], q.shape[1], k.shape[3 if cached else 1]
        # Queries head-major first (a small copy), so both matmuls write their
        # [t, s] and [t, h] blocks in place: with the heads between t and s
        # the score matrix itself would be transposed after the matmul.
        grouped_q = q.reshape(batch, rows, self.num_key_value_heads, self.group_size, self.head_dim)
        grouped_q = grouped_q.transpose(0, 2, 3, 1, 4)  # [b, k, g, t, h]
        scores = jnp.einsum(f"bkgth,{keys}->bkgts", grouped_q, k, preferred_element_type=jnp.float32).reshape(
            batch, self.num_query_heads, rows, length
        )
        return jnp.where(mask, scores * jnp.float32(self.score_scale), -jnp.inf)

    def _weighted_values(self, weights, v, cached=False, result_dtype=None):
        """`z [B, n, Hq, dh]` (in `result_dtype`, default `v`'s): attention
        weights `[B, Hq, n, T]` (cast to `v`'s dtype) applied to the values
        `v` (`[B, T, Hkv, dh]`, or `[B, Hkv, T, dh]` when `cached`),
        each query head reading its key/value head."""
        values = "bksh" if cached else "bskh"
        batch, _, rows, length = weights.shape
        z = jnp.einsum(
            f"bkgts,{values}->bkgth",
            weights.astype(v.dtype).reshape(batch, self.num_key_value_heads, self.group_size, rows, length),
            v,
            preferred_element_type=result_dtype,
        )
        return z.transpose(0, 3, 1, 2, 4).reshape(batch, rows, self.num_query_heads, self.head_dim)

    def _attend_causal_blocks(self, q, k, v, padding_mask, block: int):
        """`z` of `attend`, computed a block of queries at a time, each block
        over the keys up to its last query only: the future keys' half of the
        score and value matmuls (and of the softmax) is never computed.

        Blocks are `block` queries (the last one may be shorter).
        With a sliding window the keys before it are still computed (and
        masked), so the result is `attend`'s whatever the mask."""
        length = q.shape[1]
        rows = []
        for start in range(0, length, block):
            stop = min(start + block, length)
            rows.append(self.attend(q[:, start:stop], k[:, :stop], v[:, :stop], padding_mask[:, :stop], start)[2])
        return jnp.concatenate(rows, axis=1)

    def _attend_in_chunks(self, q, k, v, padding_mask, chunk: int):
        """`z` of `attend` for long inputs, a chunk of `chunk` queries
        against a chunk of as many keys at a time, with a running
        softmax (flash attention's recurrence): per query row the running
        maximum of its scores, the sum of their exponentials and the sum of
        the weighted values, rescaled when the maximum grows.

        A query chunk computes only the key chunks it can see: none after
        its last query and, with a sliding window, none wholly before the
        window of its first query. No array larger than one chunk pair's
        scores `[B, Hq, C, C]` exists. The key-chunk loop is a `scan` with a
        `cond` per chunk, so gradients flow through it, and each step is
        recomputed in the backward pass (`jax.checkpoint`) rather than
        keeping its scores: at T=4096 the gradient of one 12-head layer's
        attention needs 587 MB instead of 3.8 GB."""
        batch, length = q.shape[:2]
        count = -(-length // chunk)

        def chunks(x):  # [B, T, ...] -> [count, B, chunk, ...], padded with zeros / False
            x = jnp.pad(x, ((0, 0), (0, count * chunk - length)) + ((0, 0),) * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(batch, count, chunk, *x.shape[2:]), 1, 0)

        key_chunks, value_chunks, mask_chunks = chunks(k), chunks(v), chunks(padding_mask)
        window = self.sliding_window

        def one(query_chunk):
            index, rows = query_chunk
            first = 0 if window is None else jnp.maximum(0, (index * chunk - window + 1) // chunk)

            def add_keys(state, key_chunk):
                row_max, total, weighted = state
                j, keys, values, key_mask = key_chunk
                mask = attention_mask(key_mask, index * chunk, chunk, window, key_start=j * chunk)[:, None]
                scores = self._masked_scores(rows, keys, mask)  # [B, Hq, C, C]
                new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1, keepdims=True))
                shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
                weights = jnp.where(mask, jnp.exp(scores - shift), 0.0)
                rescale = jnp.exp(row_max - shift)  # 0 while nothing was seen
                total = total * rescale + jnp.sum(weights, axis=-1, keepdims=True)
                values = self._weighted_values(weights, values, result_dtype=jnp.float32)
                weighted = weighted * jnp.moveaxis(rescale, 1, 2) + values
                return new_max, total, weighted

            def step(state, key_chunk):
                visible = (key_chunk[0] >= first) & (key_chunk[0] <= index)
                return jax.lax.cond(visible, jax.checkpoint(add_keys), lambda state, _: state, state, key_chunk), None

            heads = (batch, self.num_query_heads, chunk, 1)
            state = (
                jnp.full(heads, -jnp.inf, jnp.float32),
                jnp.zeros(heads, jnp.float32),
                jnp.zeros((batch, chunk, self.num_query_heads, self.head_dim), jnp.float32),
            )
            keys = (jnp.arange(count), key_chunks, value_chunks, mask_chunks)
            (_, total, weighted), _ = jax.lax.scan(step, state, keys)
            total = jnp.moveaxis(total, 1, 2)  # [B, C, Hq, 1]
            return (weighted / jnp.where(total == 0.0, 1.0, total)).astype(v.dtype)

        z = jax.lax.map(one, (jnp.arange(count), chunks(q)))  # [count, B, chunk, Hq, dh]
        return jnp.moveaxis(z, 0, 1).reshape(batch, count * chunk, *q.shape[2:])[:, :length]

    def _attend_unreported(self, q, k, v, padding_mask, paths: AttentionPaths, dropout_key=None):
        """`z` of `attend` over keys `k, v [B, T, Hkv, dh]` at positions
        `0 ... T - 1` when no attention map is reported, by the `paths`:
        with dropout `attend`; else `flash_attention` where there is one;
        else, for long inputs, `_attend_in_chunks`; else
        `_attend_causal_blocks` (or `attend` over every key when not
        `paths.fused`)."""
        if dropout_key is not None:
            return self.attend(q, k, v, padding_mask, 0, dropout_key)[2]
        z = flash_attention(q, k, v, padding_mask, self.sliding_window) if paths.fused else None
        if z is not None:
            return z
        if q.shape[1] > 2 * paths.query_chunk_size:
            return self._attend_in_chunks(q, k, v, padding_mask, paths.query_chunk_size)
        if paths.fused:
            return self._attend_causal_blocks(q, k, v, padding_mask, paths.causal_block)
        return self.attend(q, k, v, padding_mask, 0)[2]

    def apply(
        self,
        params,
        x,
        cos,
        sin,
        padding_mask,
        sites=NO_HOOKS,
        dropout_key=None,
        cache=None,
        cache_index=0,
        *,
        paths: AttentionPaths,
        head_inputs: dict | None = None,
    ):
        """One layer's attention.

        Args:
            params: this layer's kernels (no leading layer axis).
            x: normalized input `[B, T, D]`.
            cos, sin: rotary tables `[T, rotary_dim]` or `[B, T, rotary_dim]`.
            padding_mask: boolean `[B, T]`, True for real tokens; with a
                `cache`, `[B, S]` over the cache slots.
            sites: hook points (`NO_HOOKS` for the plain forward).
            dropout_key: JAX key for attention dropout, or None.
            cache: None, or this layer's `LayerCache` (its keys `[B, Hkv,
                head_dim, S]` and values `[B, Hkv, S, head_dim]`): the
                rotated keys and the values of the inputs are written at
                slots `cache_index ... cache_index + T - 1`, and the queries (at those slots)
                attend over all `S` slots under the causal, padding and
                sliding-window mask (a prefill, `cache_index` the Python
                int 0 and no map reported, attends over its own `T` keys
                only, as the plain forward does: later slots are future).
            cache_index: int (may be traced), the slot of `x`'s first row.
            paths: the `AttentionPaths` to run (static: read while tracing).
            head_inputs: None, or per-head normalized inputs replacing `x`
                for some projections: `{"q": [B, T, Hq, D], "k": [B, T,
                Hkv, D], "v": [B, T, Hkv, D]}` (any subset; the split
                inputs `attn.hook_q_input` ... of the decoder block), each
                head projecting its own copy.

        Returns the attention output `[B, T, D]` (after the output kernel),
        and with a `cache` also the updated `LayerCache`.

        When no full attention map is reported (the plain forward, a
        `sites.query_window`, a prefill), `z` comes from
        `_attend_unreported`: `flash_attention` (cuDNN, 16-bit, GPU) where
        there is one; for long inputs (more than two chunks of
        `paths.query_chunk_size` queries) `_attend_in_chunks`, a running
        softmax over the key chunks each query chunk sees (bounded memory);
        else `_attend_causal_blocks` (which skips the future keys). Otherwise,
        or when not `paths.fused`, `z` comes from `attend` over every key.
        With `sites.query_window` set, only those query rows of the pattern
        and scores are reported.
        """
        dtype = self.compute_dtype
        w = dequantize(params, dtype)
        head_inputs = head_inputs or {}
        q = sites("attn.hook_q", projections.heads(x, head_inputs.get("q"), w["query_kernel"]))
        k = sites("attn.hook_k", projections.heads(x, head_inputs.get("k"), w["key_kernel"]))
        v = sites("attn.hook_v", projections.heads(x, head_inputs.get("v"), w["value_kernel"]))
        q = sites("attn.hook_rot_q", apply_rotary(q, cos, sin))
        k = sites("attn.hook_rot_k", apply_rotary(k, cos, sin))

        length = q.shape[1]
        reported = sites.wants("attn.hook_attn_scores") or sites.wants("attn.hook_pattern")
        if cache is not None:
            cache = cache.write(k, v, cache_index)
            if isinstance(cache_index, int) and cache_index == 0 and not reported:
                # A prefill from the first slot: every later slot is in every
                # query's future, so only the inputs' own keys are attended.
                z = self._attend_unreported(q, k, v, padding_mask[:, :length], paths, dropout_key)
            else:
                keys, values = (slots.astype(dtype) for slots in cache.read(x.shape[0]))
                z = self.attend(q, keys, values, padding_mask, cache_index, dropout_key, sites, cached=True)[2]
            return projections.output(sites("attn.hook_z", z), w["output_kernel"], sites), cache

        window = sites.query_window
        if reported and window is None:
            z = self.attend(q, k, v, padding_mask, 0, dropout_key, sites)[2]
        else:
            z = self._attend_unreported(q, k, v, padding_mask, paths, dropout_key)
            if reported:
                # Only the window's rows are reported (hooks on attention
                # maps are refused with a window, so nothing flows back).
                start, stop = window
                self.attend(q[:, start:stop], k, v, padding_mask, start, sites=sites)
        return projections.output(sites("attn.hook_z", z), w["output_kernel"], sites)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "dropout": self.dropout,
                "sliding_window": self.sliding_window,
            }
        )
        return config
