"""The stack of Phi-3 decoder blocks, run as a scan over stacked weights."""

from __future__ import annotations

import jax
import keras
from jax import numpy as jnp

from phi3lab.model.attention import Phi3Attention
from phi3lab.model.attention_paths import AttentionPaths
from phi3lab.model.dropout import dropout
from phi3lab.model.hook_points import NO_HOOKS
from phi3lab.model.kv_cache import LayerCache
from phi3lab.model.mlp import Phi3MLP
from phi3lab.model.norm import Phi3RMSNorm
from phi3lab.model.quantize import int8_policy
from phi3lab.model.stacked import from_bits, layer_of, slices_recomputed, to_bits


class Phi3DecoderStack(keras.layers.Layer):
    """All decoder blocks of a Phi-3 model.

    Each block is pre-norm attention then pre-norm gated MLP, both added to
    the residual stream. Weights of all blocks are stacked on a leading axis
    and the blocks run as `jax.lax.scan`, so the compiled program holds one
    block however deep the model is (compile time does not grow with
    `num_layers`). Hook points split the scan into ranges of layers that
    behave alike (see `HookPoints.segments`): a layer that captures or is
    hooked runs alone, unrolled.

    Args:
        num_layers: int. Number of blocks `L`.
        hidden_dim: int. Model width `D`.
        intermediate_dim: int. MLP width `F`.
        num_query_heads: int. Query heads.
        num_key_value_heads: int. Key/value heads.
        layer_norm_epsilon: float. RMS norm epsilon.
        dropout: float. Dropout rate in training (attention probabilities
            and both residual branches).
        sliding_window: int or None. Attention window (see `Phi3Attention`).
        quantization: None or `"int8"`: the attention and MLP layers then
            hold keras' int8 policy over this layer's and declare int8
            kernels (`phi3lab.model.quantize.add_projection_kernels`).
    """

    def __init__(
        self,
        num_layers,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        sliding_window=None,
        quantization=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.sliding_window = sliding_window
        self.quantization = quantization

        # === Layers ===
        common = {"num_layers": num_layers, "dtype": self.dtype_policy}
        kernels = {**common, "dtype": int8_policy(self.dtype_policy)} if quantization == "int8" else common
        self.attention_norm = Phi3RMSNorm(hidden_dim, layer_norm_epsilon, name="attention_norm", **common)
        self.attention = Phi3Attention(
            hidden_dim=hidden_dim,
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            dropout=dropout,
            sliding_window=sliding_window,
            name="attention",
            **kernels,
        )
        self.mlp_norm = Phi3RMSNorm(hidden_dim, layer_norm_epsilon, name="mlp_norm", **common)
        self.mlp = Phi3MLP(
            hidden_dim=hidden_dim,
            intermediate_dim=intermediate_dim,
            name="mlp",
            **kernels,
        )
        self.built = True

    def params(self) -> dict:
        return {
            "attention_norm": self.attention_norm.params(),
            "attention": self.attention.params(),
            "mlp_norm": self.mlp_norm.params(),
            "mlp": self.mlp.params(),
        }

    def block(
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
    ):
        """One decoder block from its parameter slice; `x` is `[B, T, D]`.
        With a `cache` (this layer's `LayerCache`, see
        `Phi3Attention.apply`) returns `(x, cache)`."""
        keys = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
        x = sites("hook_resid_pre", x)
        normalized = sites(
            "ln1.hook_normalized",
            self.attention_norm.apply(params["attention_norm"], x),
        )
        attention_out = self.attention.apply(
            params["attention"],
            normalized,
            cos,
            sin,
            padding_mask,
            sites,
            keys[0],
            cache,
            cache_index,
            paths=paths,
            head_inputs=self._head_inputs(params["attention_norm"], x, sites),
        )
        if cache is not None:
            attention_out, cache = attention_out
        attention_out = sites("hook_attn_out", dropout(attention_out, self.dropout, keys[1]))
        x = sites("hook_resid_mid", x + attention_out)
        mlp_input = sites("hook_mlp_in", x)  # the MLP's own copy: `x` goes on to hook_resid_post
        normalized = sites("ln2.hook_normalized", self.mlp_norm.apply(params["mlp_norm"], mlp_input))
        mlp_out = self.mlp.apply(params["mlp"], normalized, sites)
        mlp_out = sites("hook_mlp_out", dropout(mlp_out, self.dropout, keys[2]))
        x = sites("hook_resid_post", x + mlp_out)
        return x if cache is None else (x, cache)

    def _head_inputs(self, norm_params, x, sites) -> dict:
        """The split inputs of attention (`attn.hook_q_input`, `_k_input`,
        `_v_input`) that `sites` wants, normalized: `{"q": [B, T, Hq, D],
        ...}`, each head's copy of the residual stream `x` through ln1.
        Empty (no work, the plain program) when none is wanted."""
        counts = {"q": self.num_query_heads, "k": self.num_key_value_heads, "v": self.num_key_value_heads}
        inputs = {}
        for kind, count in counts.items():
            name = f"attn.hook_{kind}_input"
            if sites.wants(name):
                copies = sites(name, jnp.broadcast_to(x[:, :, None], (*x.shape[:2], count, x.shape[-1])))
                inputs[kind] = self.attention_norm.apply(norm_params, copies)
        return inputs

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
    ):
        """Run every block.

        Args:
            params: stacked parameters, as `params()` returns them (the
                layers run in a `lax.scan`, each reading its slice), or a
                list of each layer's own parameters (`stacked.layer_views`;
                the layers run unrolled, and no step copies a layer's
                weights out of the stack: what a memory-bound decode step
                wants on CPU).
            x: embedded tokens `[B, T, D]`.
            cos, sin: rotary tables `[T, head_dim]` or `[B, T, head_dim]`.
            padding_mask: boolean `[B, T]`, True for real tokens (with a
                `cache`, `[B, S]` over its slots).
            sites: hook points.
            dropout_key: JAX key, or None for no dropout.
            cache: None, or a `KVCache` of every layer, carried through
                the layers (per-layer tuples, `KVCache.by_layer`, only with
                per-layer `params`).
            cache_index: the cache slot of `x`'s first position.
            paths: the `AttentionPaths` every block's attention runs.

        Returns:
            The last residual stream `[B, T, D]` (what the blocks captured
            is in `sites.captured`); with a `cache`, `(x, cache)` with the
            updated cache.
        """
        layer_keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
        # The cache travels as bits while its layers write it (`stacked.to_bits`).
        cache_dtype = None if cache is None else cache.dtype
        cache = None if cache is None else jax.tree.map(to_bits, cache)
        key_of = lambda layer: None if layer_keys is None else layer_keys[layer]

        def run_layer(carry, layer, key, start, layer_params=None):
            """One layer (`layer`, maybe traced) in the range from `start`."""
            x, cache = carry
            # Each layer's weights are read from the whole stack inside the
            # loop: slicing the stack per range first would copy it. The
            # cache is carried whole and written in place at its layer.
            if layer_params is None:
                layer_params = jax.tree.map(lambda a: layer_of(a, layer), params)
            layer_cache = None if cache is None else LayerCache(cache, layer, cache_dtype)
            out = self.block(
                layer_params, x, cos, sin, padding_mask, sites.block(start), key, layer_cache, cache_index, paths=paths
            )
            return (out[0], out[1].cache) if cache is not None else (out, None)

        for start, stop in sites.segments(self.num_layers):
            if isinstance(params, (list, tuple)):
                for layer in range(start, stop):
                    # Tied to `x`, a layer's weights are not converted (16-bit
                    # on CPU: to float32) once outside a loop around the model.
                    layer_params, x = jax.lax.optimization_barrier((params[layer], x))
                    x, cache = run_layer((x, cache), layer, key_of(layer), layer, layer_params)
            elif stop - start == 1:
                x, cache = run_layer((x, cache), start, key_of(start), start)
            else:  # several layers, which capture nothing (`HookPoints.segments`)
                captured = len(sites.captured)
                inputs = (jnp.arange(start, stop), None if layer_keys is None else layer_keys[start:stop])
                step = lambda carry, layer_and_key, start=start: (run_layer(carry, *layer_and_key, start), None)
                x, cache = jax.lax.scan(slices_recomputed(step), (x, cache), inputs)[0]
                _check_captured_nothing(sites, captured, start, stop)
        if cache is None:
            return x
        return x, jax.tree.map(lambda slots: from_bits(slots, cache_dtype), cache)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "sliding_window": self.sliding_window,
                "quantization": self.quantization,
            }
        )
        return config


def _check_captured_nothing(sites, count: int, start: int, stop: int) -> None:
    """A range of several layers shares one scanned block only when its
    layers capture nothing (`HookPoints.segments`): a value captured inside
    the scan would be a tracer of its body, not an array of the program."""
    if len(sites.captured) != count:
        names = list(sites.captured)[count:]
        raise AssertionError(f"the scanned layers {start}..{stop - 1} captured {names}; only single layers may capture")
