"""The Phi-3 backbone: embedding, decoder stack and final norm."""

from __future__ import annotations

import dataclasses

import keras
from jax import numpy as jnp

from phi3lab.checks import check_token_ids
from phi3lab.errors import bad_argument
from phi3lab.model import preset_loader
from phi3lab.model.attention_paths import AttentionPaths, check_attention_paths
from phi3lab.model.config import BackboneConfig
from phi3lab.model.decoder import Phi3DecoderStack
from phi3lab.model.dtypes import (
    QUANTIZABLE_LAYERS,
    WEIGHT_LAYERS,
    check_quantize_mode,
    read_dtype,
    serialized_policy_map,
)
from phi3lab.model.embedding import Phi3TokenEmbedding
from phi3lab.model.hook_points import NO_HOOKS
from phi3lab.model.norm import Phi3RMSNorm
from phi3lab.model.quantize import quantize_layer
from phi3lab.runtime import compile_cache


@keras.saving.register_keras_serializable(package="phi3lab")
class Phi3Backbone(keras.Model):
    """Phi-3 decoder network, hookable, in Keras 3 on JAX.

    The same model as keras-hub's `Phi3Backbone` (same constructor, same
    inputs and output) and as Hugging Face's `Phi3Model`, built so that
    `phi3lab.trace` can capture and change every intermediate value. The
    plain `model(inputs)` runs no hook code.

    Args:
        vocabulary_size: int. Size of the token vocabulary.
        num_layers: int. Number of decoder blocks.
        hidden_dim: int. Width of the residual stream.
        intermediate_dim: int. Width of the gated MLP.
        num_query_heads: int. Query heads per block; must divide `hidden_dim`.
        num_key_value_heads: int. Key/value heads; must divide
            `num_query_heads` (grouped-query attention).
        layer_norm_epsilon: float. RMS norm epsilon. Defaults to `1e-6`.
        dropout: float. Dropout rate, active only in training. Defaults to 0.
        max_sequence_length: int. Longest context the model supports.
            Defaults to `4096`.
        pretraining_sequence_length: int. Context of pretraining; with "su"
            scaling, the short factors serve positions below it. Defaults to
            `4096`.
        rope_max_wavelength: float. Rotary base. Defaults to `10000`.
        rope_scaling_type: `None` or `"su"` (`"longrope"` is accepted as the
            same thing and stored as `"su"`).
        rope_scaling_short_factor: list of `rotary_dim // 2` floats
            (`rotary_dim = hidden_dim // num_query_heads` with full rotary),
            required with "su".
        rope_scaling_long_factor: list of the same length, required with "su".
        dtype: string or `keras.DTypePolicy` (`"float32"`, `"bfloat16"`,
            `"mixed_bfloat16"`), or a `keras.dtype_policies.DTypePolicyMap`
            (keras' form for a quantized model): its default policy for
            every layer, and keras' int8 policy (`"int8_from_<default>"`)
            under the paths `"decoder/attention"` and `"decoder/mlp"` for
            int8 kernels (same as `quantization="int8"`; see
            `phi3lab.model.dtypes`). Softmax and norms always run in float32.
        sliding_window: int or None. When set, each token attends only to the
            last `sliding_window` positions (itself included), as Hugging
            Face transformers does for Phi-3-mini-4k (2047). keras-hub has no
            such argument and attends to everything.
        partial_rotary_factor: float in (0, 1]. Rotary is applied to the
            first `int(head_dim * partial_rotary_factor)` dimensions of each
            query/key head, the rest pass through (Phi-4-mini: 0.75; the "su"
            factor lists then have `rotary_dim // 2` entries). Defaults to 1.
        tie_word_embeddings: bool. When True the LM head is the token
            embedding's transpose (Phi-4-mini); there is no separate
            `reverse_embeddings` weight. Defaults to False.
        quantization: `None` or `"int8"` (weight-only int8 projection
            kernels, see `quantize`). Defaults to None, or to what a
            DTypePolicyMap `dtype` says.

    All arguments are described once, by `phi3lab.model.config.BackboneConfig`,
    which checks them and which the preset formats read and write.

    Inputs: `{"token_ids": int [B, T], "padding_mask": int/bool [B, T]}`.
    Output: the final normalized hidden states `[B, T, hidden_dim]`.

    The short/long rotary switch follows the largest position in use (as
    Hugging Face does), not the chunk length (as keras-hub does); see
    `phi3lab.model.rotary`.

    Example:
    ```python
    model = phi3lab.Phi3Backbone(
        vocabulary_size=100, num_layers=2, hidden_dim=32,
        intermediate_dim=64, num_query_heads=4, num_key_value_heads=2,
    )
    hidden = model({"token_ids": np.array([[1, 2, 3]]),
                    "padding_mask": np.array([[1, 1, 1]])})
    logits = model.token_embedding(hidden, reverse=True)   # [1, 3, 100]
    ```
    """

    def __init__(self, *args, **kwargs):
        bound = _SIGNATURE.bind(self, *args, **kwargs).arguments
        bound.pop("self")
        dtype = read_dtype(bound.pop("dtype", None))
        if dtype.quantization is not None:
            if bound.setdefault("quantization", dtype.quantization) != dtype.quantization:
                raise bad_argument(
                    "quantization",
                    bound["quantization"],
                    f"{dtype.quantization!r} or left out: the DTypePolicyMap `dtype` quantizes the kernels",
                )
        layer_kwargs = bound.pop("kwargs", {})
        config = BackboneConfig(**bound)
        super().__init__(dtype=dtype.policy, **layer_kwargs)
        # Keras wraps `quantize` per instance to resolve its own quantization
        # configs (int4, float8, gptq) before the method runs; phi3lab checks
        # the mode itself, so the method is used unwrapped.
        vars(self).pop("quantize", None)

        # === Layers ===
        self.token_embedding = Phi3TokenEmbedding(
            config.vocabulary_size,
            config.hidden_dim,
            tie_weights=config.tie_word_embeddings,
            dtype=self.dtype_policy,
            name="token_embedding",
        )
        self.decoder = Phi3DecoderStack(
            num_layers=config.num_layers,
            hidden_dim=config.hidden_dim,
            intermediate_dim=config.intermediate_dim,
            num_query_heads=config.num_query_heads,
            num_key_value_heads=config.num_key_value_heads,
            layer_norm_epsilon=config.layer_norm_epsilon,
            dropout=config.dropout,
            sliding_window=config.sliding_window,
            quantization=config.quantization,
            dtype=self.dtype_policy,
            name="decoder",
        )
        self.final_norm = Phi3RMSNorm(
            config.hidden_dim, config.layer_norm_epsilon, dtype=self.dtype_policy, name="final_norm"
        )
        self.dropout_seed = keras.random.SeedGenerator(0)
        self.built = True

        # === Config ===
        self._set_config(config)

    def weight_layers(self) -> dict:
        """phi3lab's layers that hold weights, by path relative to the
        backbone (`"token_embedding"`, `"decoder/attention"`, ...): the
        keys of a DTypePolicyMap `dtype` and of the weights' names."""
        decoder = self.decoder
        layers = (
            self.token_embedding,
            decoder.attention_norm,
            decoder.attention,
            decoder.mlp_norm,
            decoder.mlp,
            self.final_norm,
        )
        return dict(zip(WEIGHT_LAYERS, layers))

    def _set_config(self, config: BackboneConfig) -> None:
        """Expose every argument as an attribute (`model.hidden_dim`, ...)."""
        self.backbone_config = config
        for name in BackboneConfig.names():
            setattr(self, name, getattr(config, name))
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.rotary = config.rotary_spec()

    def params(self) -> dict:
        """Current weight values as a nested dict of arrays (a pytree)."""
        return {
            "token_embedding": self.token_embedding.params(),
            "decoder": self.decoder.params(),
            "final_norm": self.final_norm.params(),
        }

    def apply(
        self,
        params,
        token_ids,
        padding_mask=None,
        sites=NO_HOOKS,
        dropout_key=None,
        *,
        num_positions=None,
        positions=None,
        cache=None,
        cache_index=0,
        attention_paths: AttentionPaths | None = None,
    ):
        """The forward pass as a pure function of `params`.

        Args:
            params: weights, as `params()` returns them (or per layer: `Phi3DecoderStack.apply`).
            token_ids: int array `[B, T]`.
            padding_mask: array `[B, T]` (1/True for real tokens) or None;
                with a `cache`, `[B, S]` over the cache slots (required).
            sites: hook points; `NO_HOOKS` for the plain forward.
            dropout_key: JAX key to enable dropout (training), or None.
            num_positions: static int or None: one more than the largest
                real position, which picks the rotary factors in force
                (default `T`). Inputs padded on the right to a length
                bucket pass their real length, so padding never switches
                "su" scaling from the short to the long factors.
            positions: None (positions `0 .. T-1`), or int `[B, T]` rotary
                positions per row (left-padded batches count from each row's
                first real token; the long/short factors follow the largest).
            cache: None, or a `KVCache` (keys `[L, B, Hkv, head_dim, S]`, values
                `[L, B, Hkv, S, head_dim]`): the tokens are the slots `cache_index ..
                cache_index + T - 1`, their keys and values are written there and
                every query attends over the cache's slots (prefill and decode steps).
            cache_index: int (may be traced), the cache slot of the first token.
            attention_paths: the `AttentionPaths` to run, passed to every
                attention layer (static); None for the model's own
                (`attention_paths`, the value compiled programs are keyed by).

        Returns:
            `(hidden, captures)`: final normalized hidden states `[B, T, D]`
            and what `sites` captured, by full hook name (empty without
            hooks); with a `cache`, `(hidden, captures, cache)` with the
            updated cache.

        Example:
        ```python
        cache = KVCache.empty(model, batch=1, length=64)
        mask = jnp.ones((1, 64), bool)
        hidden, _, cache = model.apply(params, ids[:, :5], mask, cache=cache,
                                       positions=jnp.arange(5)[None])      # prefill
        hidden, _, cache = model.apply(params, ids[:, 5:6], mask, cache=cache, cache_index=5,
                                       positions=jnp.array([[5]]))          # one decode step
        ```
        """
        length = token_ids.shape[1]
        if cache is not None and padding_mask is None:
            raise ValueError("With a `cache`, `padding_mask` must be given: [B, S] over the cache slots.")
        padding_mask = jnp.ones(token_ids.shape, bool) if padding_mask is None else padding_mask.astype(bool)
        x = sites("hook_embed", self.token_embedding.apply(params["token_embedding"], token_ids))
        if positions is None:
            cos, sin = self.rotary.tables(length, factor_positions=num_positions)
        else:
            cos, sin = self.rotary.tables_at(positions)
        paths = (
            self.attention_paths
            if attention_paths is None
            else check_attention_paths("attention_paths", attention_paths)
        )
        x = self.decoder.apply(
            params["decoder"], x, cos, sin, padding_mask, sites, dropout_key, cache, cache_index, paths=paths
        )
        if cache is not None:
            x, cache = x
        x = sites("ln_final.hook_normalized", self.final_norm.apply(params["final_norm"], x))
        if sites.wants("hook_logits"):
            sites("hook_logits", self.unembed(params, x))
        captures = dict(sites.captured)
        return (x, captures) if cache is None else (x, captures, cache)

    # === Readout ===
    def unembed(self, params, normalized):
        """The LM head alone: final-normalized hidden states `[..., D]` to
        logits `[..., V]` (the output embedding, tied or not), as a pure
        function."""
        return self.token_embedding.apply(params["token_embedding"], normalized, reverse=True)

    def readout(self, params, resid):
        """Residual streams `[..., D]` to logits `[..., V]`: the final norm,
        then the LM head, exactly as the model reads its last block. The one
        readout that the logit lens, patching metrics and generation use.

        Example:
        ```python
        tr = phi3lab.trace(model, ids, names="blocks.*.hook_resid_post")
        logits = model.readout(model.params(), tr.resid(-1, "post"))   # == tr.logits
        ```
        """
        return self.unembed(params, self.final_norm.apply(params["final_norm"], resid))

    @property
    def attention_paths(self) -> AttentionPaths:
        """How attention is computed when no map is reported (flash, causal
        blocks, chunks; see `phi3lab.model.AttentionPaths`): one frozen value,
        which `apply` passes to every attention layer. Programs compiled for
        the model (`phi3lab.runtime.compile_cache`) are keyed by it, so
        assigning a new value compiles new programs on the next call, and
        assigning the old one back reuses the old programs. It is not part of
        `get_config`: it changes speed and memory, never the function.

        Example:
        ```python
        model.attention_paths = dataclasses.replace(model.attention_paths, fused=False)
        ```
        """
        return self.decoder.attention.attention_paths

    @attention_paths.setter
    def attention_paths(self, value: AttentionPaths) -> None:
        self.decoder.attention.attention_paths = check_attention_paths("attention_paths", value)

    def call(self, inputs, training=False):
        token_ids = inputs["token_ids"]
        check_token_ids("token_ids", token_ids, self.vocabulary_size)
        token_ids = jnp.asarray(token_ids).astype(jnp.int32)
        padding_mask = inputs.get("padding_mask")
        if padding_mask is not None:
            padding_mask = jnp.asarray(padding_mask)
        dropout_key = None
        if training and self.dropout > 0:
            dropout_key = self.dropout_seed.next()
        return self._compiled_forward(self.params(), token_ids, padding_mask, dropout_key)

    @property
    def _compiled_forward(self):
        """`apply` under `jax.jit`, made once per model (in the shared compile
        cache), so eager calls do not re-trace the layer scan every time;
        traceable, as Keras training calls it inside its own compiled step."""
        forward = lambda params, ids, mask, key: self.apply(params, ids, mask, dropout_key=key)[0]
        return compile_cache.traceable(self, ("call",), forward)

    def get_config(self):
        config = super().get_config()
        config.update(self.backbone_config.to_dict())
        policy_map = serialized_policy_map(self.dtype_policy, self.weight_layers())
        if policy_map is not None:
            config["dtype"] = policy_map
        return config

    def quantize(self, mode: str, **kwargs) -> None:
        """Store every projection kernel as int8 with per-output-channel scales.

        Weight-only quantization of the attention (q, k, v, o) and MLP (gate,
        up, down) kernels of all layers: `kernel = int8 * scale`, one float32
        scale per output channel, dequantized inside the compiled forward one
        layer at a time. Embeddings, the LM head and norms stay as they are.
        Traces, hooks and `phi3lab.estimate` work on the quantized model.
        The two layers then report keras' int8 policy
        (`model.decoder.mlp.quantization_mode == "int8"`, `dtype_policy`
        `"int8_from_float32"`), and `get_config()` records the policies in a
        `DTypePolicyMap` `dtype` (and `quantization="int8"`), so
        `model.save(...)`, `keras.saving.load_model` and keras-hub-format
        presets (`phi3lab.presets.save_preset`) round-trip it. Weight bytes
        of the kernels drop about 4x from float32 (2x from bfloat16).

        Args:
            mode: `"int8"` (the only mode supported; `"float8"` is refused:
                keras' float8 is a training scheme that stores float32
                kernels, see `phi3lab.model.dtypes.FLOAT8_REFUSAL`).

        Example:
        ```python
        model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
        model.quantize("int8")
        tr = phi3lab.trace(model, ids, names="blocks.0.attn.hook_z")
        ```
        """
        check_quantize_mode(mode, kwargs)
        if self.quantization == "int8":
            raise ValueError("This model is already quantized (quantization='int8').")
        layers = self.weight_layers()
        for path in QUANTIZABLE_LAYERS:
            quantize_layer(layers[path])
        self._set_config(dataclasses.replace(self.backbone_config, quantization=mode))

    presets = preset_loader.BuiltinPresets()

    @classmethod
    def from_preset(cls, preset: str, load_weights: bool = True, **kwargs) -> "Phi3Backbone":
        """Build a backbone from a preset.

        Args:
            preset: a built-in name (see `Phi3Backbone.presets`), a local
                keras-hub preset directory, a local Hugging Face checkpoint
                directory, or a `kaggle://` / `hf://` handle.
            load_weights: bool. Load the weights (else random init).
            **kwargs: override config values, e.g. `dtype="bfloat16"`;
                `quantization="int8"` loads a float preset with int8 kernels,
                each quantized as it is read (the float weights are never
                held whole), bit for bit what `quantize("int8")` after a
                float load gives.

        Example:
        >>> model = Phi3Backbone.from_preset("phi3lab_tiny_en")
        """
        return preset_loader.installed().load(cls, preset, load_weights=load_weights, **kwargs)


_SIGNATURE = BackboneConfig.constructor_signature()
Phi3Backbone.__init__.__signature__ = _SIGNATURE
