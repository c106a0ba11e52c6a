"""`SparseDictionary`: a sparse autoencoder or transcoder as a JAX pytree.

A dictionary maps an activation `x` `[..., d_in]` to `F = d_sae` sparse
feature activations and back to `d_out` values: the same site for a sparse
autoencoder (SAE), an MLP's output for a transcoder. Its weights are the
pytree's leaves, its `DictionaryConfig` the static part, so a dictionary
goes through `jax.jit`, `jax.grad` and optax as it is.

The conventions are SAELens' (so its files load unchanged):

    x_n      = normalize(x)                     (`normalize_activations`)
    pre      = (x_n - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    pre      = pre * |W_dec rows|               (if `rescale_acts_by_decoder_norm`)
    acts     = sparsify(pre)                    (per `kind`)
    x_hat    = denormalize((acts / |W_dec rows| if rescaled else acts) @ W_dec + b_dec)
    output   = x_hat + x @ W_skip.T             (transcoders with a skip connection)

Kinds: `"relu"` (trained with an L1 penalty), `"topk"` (the `k` largest per
token), `"batchtopk"` (the `k * tokens` largest of a batch while training;
afterwards, as SAELens saves it, a JumpReLU with one learned threshold) and
`"jumprelu"` (a learned threshold per feature, trained through its
straight-through estimator, `phi3lab.features.activation_fns`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_choice, check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.features import activation_fns

KINDS = ("relu", "topk", "batchtopk", "jumprelu")
# SAELens' input normalisations that hold at inference ("expected_average_only_in"
# is folded into the weights when SAELens saves, so it is the identity here).
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
_PER_TOKEN_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")  # undone on an SAE's output
_LAYER_NORM_EPSILON = 1e-5  # SAELens' layer_norm: (x - mean) / (std + 1e-5), std with Bessel's correction


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
    """The static description of a dictionary (hashable: part of compiled programs).

    Attributes:
        kind: one of `KINDS`.
        d_in: input width.
        d_sae: number of features.
        d_out: output width (`d_in` for an SAE).
        site: the hook name read (SAELens' `hook_name`), or None.
        target_site: the hook name a transcoder writes (`hook_name_out`);
            None for an SAE.
        transcoder: True when the output is another site than the input.
        k: features kept per token (`"topk"`, an int; `"batchtopk"`, a
            float average), else None.
        skip: True when a transcoder has the linear skip `W_skip`.
        apply_b_dec_to_input: subtract `b_dec` before encoding (SAEs only).
        normalize_activations: one of `NORMALIZATIONS`.
        rescale_acts_by_decoder_norm: scale pre-activations by the decoder
            row norms (SAELens' top-k convention).
        bandwidth: the JumpReLU straight-through kernel width.
        metadata_json: other SAELens metadata (model name, ...), as JSON.
    """

    kind: str
    d_in: int
    d_sae: int
    d_out: int
    site: str | None = None
    target_site: str | None = None
    transcoder: bool = False
    k: int | float | None = None
    skip: bool = False
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    bandwidth: float = 0.05
    metadata_json: str = "{}"

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        for name in ("d_in", "d_sae", "d_out"):
            check_positive_int(name, getattr(self, name))
        check_choice("normalize_activations", self.normalize_activations, NORMALIZATIONS)
        if self.kind == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise bad_argument("k", self.k, f'an int in [1, {self.d_sae}] (features per token) for kind="topk"')
        if self.kind == "batchtopk" and not (isinstance(self.k, (int, float)) and 0 < self.k <= self.d_sae):
            raise bad_argument("k", self.k, f'a number in (0, {self.d_sae}] (mean features per token) for "batchtopk"')
        if not self.transcoder and (self.d_out != self.d_in or self.skip):
            raise bad_argument("d_out", self.d_out, f"d_in={self.d_in} and skip=False for an SAE (transcoder=False)")
        if self.transcoder and self.apply_b_dec_to_input:
            raise bad_argument("apply_b_dec_to_input", True, "False for a transcoder (b_dec is in the output space)")

    @property
    def metadata(self) -> dict:
        """The SAELens metadata beyond the hook names, as a dict."""
        return json.loads(self.metadata_json)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseDictionary:
    """A sparse autoencoder or transcoder (weights + a frozen config), a JAX pytree.

    Build one with `SparseDictionary.init`, train one with
    `phi3lab.features.train`, load one with `phi3lab.features.load` /
    `from_pretrained`.

    Attributes (SAELens' tensor names and shapes):
        W_enc: `[d_in, d_sae]`.
        b_enc: `[d_sae]`.
        W_dec: `[d_sae, d_out]`.
        b_dec: `[d_out]`.
        threshold: `[d_sae]` for `"jumprelu"` and `"batchtopk"`, else None.
        W_skip: `[d_out, d_in]` for a transcoder with a skip connection, else None.
        config: the `DictionaryConfig` (static).

    Example:
    ```python
    sae = phi3lab.features.SparseDictionary.init(jax.random.key(0), kind="topk", d_in=128, d_sae=1024, k=16,
                                                 site="blocks.2.hook_resid_post")
    acts = sae.encode(x)          # [..., 1024], at most 16 non-zero per row
    x_hat = sae.decode(acts)      # [..., 128]
    x_hat = sae(x)
    ```
    """

    W_enc: Any
    b_enc: Any
    W_dec: Any
    b_dec: Any
    threshold: Any
    W_skip: Any
    config: DictionaryConfig = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def init(
        cls,
        key,
        *,
        kind: str,
        d_in: int,
        d_sae: int,
        k: int | float | None = None,
        site: str | None = None,
        target_site: str | None = None,
        d_out: int | None = None,
        skip: bool = False,
        threshold: float = 0.01,
        bandwidth: float = 0.05,
        dtype="float32",
    ) -> "SparseDictionary":
        """A fresh dictionary: decoder rows of unit norm in random directions,
        the encoder their transpose, zero biases (the initialisation of
        SAELens and of Gao et al. 2024).

        Args:
            key: a `jax.random` key.
            kind: one of `KINDS`.
            d_in, d_sae: input width and number of features.
            k: features per token for `"topk"` / `"batchtopk"`.
            site: the hook name read.
            target_site: for a transcoder, the hook name written (then
                `d_out` defaults to `d_in`).
            d_out: output width of a transcoder.
            skip: give a transcoder a linear skip connection (zeros).
            threshold: the initial JumpReLU threshold.
            bandwidth: the JumpReLU straight-through kernel width.
            dtype: the weights' dtype.
        """
        transcoder = target_site is not None or (d_out is not None and d_out != d_in) or skip
        d_out = d_in if d_out is None else d_out
        config = DictionaryConfig(
            kind=kind,
            d_in=d_in,
            d_sae=d_sae,
            d_out=d_out,
            site=site,
            target_site=target_site,
            transcoder=transcoder,
            k=k,
            skip=skip,
            apply_b_dec_to_input=not transcoder,
            bandwidth=float(bandwidth),
        )
        direction = jax.random.normal(key, (d_sae, d_out), jnp.float32)
        W_dec = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
        if d_out == d_in:
            W_enc = W_dec.T
        else:
            W_enc = jax.random.normal(jax.random.fold_in(key, 1), (d_in, d_sae)) / math.sqrt(d_in)
        has_threshold = kind in ("jumprelu", "batchtopk")
        return cls(
            W_enc=W_enc.astype(dtype),
            b_enc=jnp.zeros(d_sae, dtype),
            W_dec=W_dec.astype(dtype),
            b_dec=jnp.zeros(d_out, dtype),
            threshold=jnp.full(d_sae, threshold, dtype) if has_threshold else None,
            W_skip=jnp.zeros((d_out, d_in), dtype) if skip else None,
            config=config,
        )

    # === Encoding ===

    def normalize(self, x):
        """`x` in the space the encoder reads (`normalize_activations`)."""
        mode = self.config.normalize_activations
        if mode == "layer_norm":
            centred = x - jnp.mean(x, axis=-1, keepdims=True)
            return centred / (jnp.std(centred, axis=-1, keepdims=True, ddof=1) + _LAYER_NORM_EPSILON)
        if mode == "constant_norm_rescale":
            return x * (math.sqrt(self.config.d_in) / jnp.linalg.norm(x, axis=-1, keepdims=True))
        return x

    def denormalize(self, y, x):
        """Undo `normalize(x)` on an output `y` (SAEs only: a transcoder's
        output is not normalised, as in SAELens)."""
        scale, shift = self._denormalizer(x)
        return y if scale is None else y * scale + shift

    @property
    def _output_depends_on_norm(self) -> bool:
        """True when a per-token input normalisation is undone on the output (SAEs only)."""
        return not self.config.transcoder and self.config.normalize_activations in _PER_TOKEN_NORMALIZATIONS

    def _denormalizer(self, x):
        """`(scale, shift)` with `denormalize(y, x) = y * scale + shift`, or
        `(None, None)` where it is the identity."""
        if not self._output_depends_on_norm:
            return None, None
        if self.config.normalize_activations == "layer_norm":
            mean = jnp.mean(x, axis=-1, keepdims=True)
            return jnp.std(x - mean, axis=-1, keepdims=True, ddof=1), mean
        return jnp.linalg.norm(x, axis=-1, keepdims=True) / math.sqrt(self.config.d_in), 0.0

    def decoder_norms(self):
        """The norm of each feature's decoder row, `[d_sae]`."""
        return jnp.linalg.norm(self.W_dec, axis=-1)

    def pre_activations(self, x):
        """The encoder's output before the nonlinearity, `[..., d_sae]`."""
        # (x_n - b_dec) @ W_enc as x_n @ W_enc - b_dec @ W_enc: the same value, but b_dec's gradient
        # is then a matrix-vector product, not a [tokens, d_in] x [d_in, d_sae] one.
        b_enc = self.b_enc - self.b_dec @ self.W_enc if self.config.apply_b_dec_to_input else self.b_enc
        pre = self.normalize(x.astype(self.W_enc.dtype)) @ self.W_enc + b_enc
        if self.config.rescale_acts_by_decoder_norm:
            pre = pre * self.decoder_norms()
        return pre

    def activate(self, pre, batch: bool = False):
        """The sparse feature activations of pre-activations `pre`.

        `batch=True` selects a `"batchtopk"` dictionary's training rule (the
        top `k * rows` of the whole batch) instead of its threshold."""
        kind = self.config.kind
        if kind == "relu":
            return jax.nn.relu(pre)
        if kind == "topk":
            return activation_fns.topk(pre, self.config.k)
        if kind == "batchtopk" and batch:
            return activation_fns.batch_topk(pre, self.config.k)
        return activation_fns.jumprelu(pre, self.threshold, self.config.bandwidth)

    def encode(self, x):
        """Feature activations of `x` `[..., d_in]` -> `[..., d_sae]`."""
        return self.activate(self.pre_activations(x))

    def encode_topk(self, x):
        """A `"topk"` dictionary's activations of `x` as its `k` active
        features per token: `(values, indices)`, both `[..., k]`, so that
        `encode(x)` is `values` scattered at `indices` (zeros elsewhere)."""
        if self.config.kind != "topk":
            raise bad_argument("dictionary", self, 'a dictionary of kind="topk" to encode k features per token')
        return activation_fns.topk_sparse(self.pre_activations(x), self.config.k)

    # === Decoding ===

    def decode(self, acts, x=None):
        """The reconstruction `[..., d_out]` from feature activations `acts`.

        `x` (the encoded input) is needed only to undo a per-token input
        normalisation (`"layer_norm"`, `"constant_norm_rescale"`) and to add
        a transcoder's skip connection."""
        if self.config.rescale_acts_by_decoder_norm:
            acts = acts / self.decoder_norms()
        return self._finish_decode(acts.astype(self.W_dec.dtype) @ self.W_dec + self.b_dec, x)

    def decode_topk(self, values, indices, x=None):
        """`decode` of activations given as `(values, indices)` `[..., k]`
        (`encode_topk`): `k` decoder rows gathered per token, a
        `[..., k] x [..., k, d_out]` product instead of `[..., F] x [F, d_out]`."""
        if self.config.rescale_acts_by_decoder_norm:
            values = values / self.decoder_norms()[indices]
        rows = self.W_dec[indices]
        return self._finish_decode(jnp.einsum("...k,...kd->...d", values.astype(rows.dtype), rows) + self.b_dec, x)

    def decode_change(self, delta, features, x=None):
        """How `decode`'s output changes when the activations of `features`
        `[n]` change by `delta` `[..., n]`: `decode(acts + delta) - decode(acts)`
        (biases and skip cancel), from the `n` decoder rows alone.

        `x` (the encoded input) is needed only for a per-token input
        normalisation, whose undoing scales the change."""
        if self.config.rescale_acts_by_decoder_norm:
            delta = delta / self.decoder_norms()[features]
        change = delta.astype(self.W_dec.dtype) @ self.W_dec[features]
        if not self._output_depends_on_norm:
            return change
        if x is None:
            raise bad_argument("x", None, "the encoded input: this dictionary's output depends on it (normalisation)")
        return change * self._denormalizer(x)[0]

    def _finish_decode(self, out, x):
        """The decoder's output `out` with the input normalisation undone and the skip added."""
        if (self.config.skip or self._output_depends_on_norm) and x is None:
            raise bad_argument(
                "x", None, "the encoded input: this dictionary's output depends on it (input normalisation or skip)"
            )
        if x is None:
            return out
        out = self.denormalize(out, x)
        if self.config.skip:
            out = out + x.astype(self.W_skip.dtype) @ self.W_skip.T
        return out

    def __call__(self, x):
        """The reconstruction of `x` (an SAE) or the predicted target (a
        transcoder); a `"topk"` dictionary decodes only its `k` active features."""
        if self.config.kind == "topk":
            return self.decode_topk(*self.encode_topk(x), x)
        return self.decode(self.encode(x), x)

    # === Conversions ===

    def fold_decoder_norm(self) -> "SparseDictionary":
        """The same function with unit-norm decoder rows, as SAELens'
        `fold_W_dec_norm`: the norms move into the encoder (and, unless the
        pre-activations were already rescaled by them, the thresholds).

        Reconstructions are unchanged; feature activations scale by the
        norms. A `"topk"` dictionary must rank rescaled pre-activations
        (`rescale_acts_by_decoder_norm`), else folding would change its
        selection."""
        rescaled = self.config.rescale_acts_by_decoder_norm
        if self.config.kind == "topk" and not rescaled:
            raise bad_argument(
                "dictionary", self, "a top-k dictionary with rescale_acts_by_decoder_norm=True to fold decoder norms"
            )
        norms = jnp.maximum(self.decoder_norms(), 1e-8)
        threshold = self.threshold if self.threshold is None or rescaled else self.threshold * norms
        return dataclasses.replace(
            self,
            W_enc=self.W_enc * norms,
            b_enc=self.b_enc * norms,
            W_dec=self.W_dec / norms[:, None],
            threshold=threshold,
            config=dataclasses.replace(self.config, rescale_acts_by_decoder_norm=False),
        )

    def with_config(self, **changes) -> "SparseDictionary":
        """A copy with `DictionaryConfig` fields replaced (e.g. `site=`)."""
        return dataclasses.replace(self, config=dataclasses.replace(self.config, **changes))

    def numpy(self) -> dict[str, np.ndarray]:
        """The weights by SAELens tensor name, as host arrays (absent ones left out)."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")
        return {name: np.asarray(getattr(self, name)) for name in names if getattr(self, name) is not None}

    def save(self, directory) -> None:
        """Write `cfg.json` and `sae_weights.safetensors` (SAELens' format) to `directory`."""
        from phi3lab.features.saelens_format import save

        save(self, directory)

    def __repr__(self):
        c = self.config
        what = f"transcoder {c.site} -> {c.target_site}" if c.transcoder else f"SAE on {c.site}"
        k = f", k={c.k}" if c.k is not None else ""
        return f"SparseDictionary({c.kind}{k}, {c.d_in} -> {c.d_sae} -> {c.d_out}, {what})"
