"""The replacement model of an attribution graph (Ameisen et al. 2025).

Each MLP is replaced by its transcoder plus an *error* term, the true MLP
output minus the transcoder's, so the replacement model computes exactly what
the model computes. With the attention patterns and the normalisation scales
frozen at their values in the clean run, and each MLP's output cut from its
input (its features and error are nodes of their own), everything from the
nodes to a receiver is linear: a receiver (a feature's pre-activation, or the
target logit) is the sum of the *direct effects* of the token embeddings, the
active features and the error terms (through the residual stream and the
frozen attention's value/output paths), plus the transcoders' decoder biases
and the receiver's own bias.

Nothing here runs a second forward of the model. The frozen model is the
model's own `forward_fn` with hooks that stop gradients
(`jax.lax.stop_gradient`) where the paper freezes: the attention patterns,
the RMS scales of `ln1`, `ln2` and the final norm (each normalised value keeps
its value, and its derivative becomes the frozen `rms^-1 * weight`), and every
MLP's output (which then only passes on a zero probe added to it). One
`jax.vjp` of that forward per batch of receivers gives, for every receiver,
the gradient at the token embeddings and at each MLP output: a source's direct
effect is that gradient dotted with what the source writes there.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.errors import bad_argument
from phi3lab.model.norm import rms_norm
from phi3lab.tracing.forward import forward_fn
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.names import block_name

READS = "ln2.hook_normalized"  # a transcoder's input site, per layer
WRITES = "hook_mlp_out"  # the site it replaces
# Input normalisations under which a dictionary's pre-activation is affine in its input.
_AFFINE_NORMALIZATIONS = ("none", "expected_average_only_in")


# === Transcoders ===


def resolve_transcoders(model, transcoders) -> tuple[list, list[str]]:
    """The transcoders of every layer and their names, checked.

    Args:
        model: the `Phi3Backbone`.
        transcoders: a preset name (its `transcoder_0 ...` dictionaries, see
            `phi3lab.features.from_preset`), or a list of one
            `SparseDictionary` transcoder per layer, reading
            `blocks.l.ln2.hook_normalized` and writing `blocks.l.hook_mlp_out`.

    Returns:
        `(dictionaries, names)`: names are `transcoder_{l}` for a list.
    """
    from phi3lab.features import SparseDictionary, from_preset

    layers = range(model.num_layers)
    accepted = (
        f"a preset name or a list of {model.num_layers} transcoders (phi3lab.features.SparseDictionary), "
        f"one per layer l reading 'blocks.l.{READS}' and writing 'blocks.l.{WRITES}'"
    )
    if transcoders is None:
        raise bad_argument(
            "transcoders", None, accepted + ": an attribution graph replaces every MLP by its transcoder"
        )
    names = [f"transcoder_{layer}" for layer in layers]
    if isinstance(transcoders, str):
        transcoders = [from_preset(transcoders, name) for name in names]
    if not isinstance(transcoders, (list, tuple)) or not all(isinstance(t, SparseDictionary) for t in transcoders):
        raise bad_argument("transcoders", transcoders, accepted)
    if len(transcoders) != model.num_layers:
        raise bad_argument("transcoders", f"{len(transcoders)} dictionaries", accepted + " (a layer is missing)")
    for layer, transcoder in zip(layers, transcoders):
        _check_transcoder(model, layer, transcoder)
    return list(transcoders), names


def _check_transcoder(model, layer: int, transcoder) -> None:
    config = transcoder.config
    argument = f"transcoders[{layer}]"
    reads, writes = block_name(layer, READS), block_name(layer, WRITES)
    if not config.transcoder or config.site != reads or config.target_site != writes:
        raise bad_argument(
            argument,
            transcoder,
            f"a transcoder reading {reads!r} and writing {writes!r} (it reads {config.site!r}, "
            f"writes {config.target_site!r})",
        )
    if config.d_in != model.hidden_dim or config.d_out != model.hidden_dim:
        raise bad_argument(
            argument,
            transcoder,
            f"a transcoder of width d_in = d_out = hidden_dim = {model.hidden_dim} "
            f"(it has d_in={config.d_in}, d_out={config.d_out})",
        )
    if config.skip or config.normalize_activations not in _AFFINE_NORMALIZATIONS:
        raise bad_argument(
            argument,
            transcoder,
            "a transcoder without a skip connection and without per-token input normalisation "
            f"(normalize_activations in {_AFFINE_NORMALIZATIONS}), so that its pre-activations "
            "are affine in its input and its output is a sum over features",
        )


# === The replacement model's parts ===


@dataclasses.dataclass(frozen=True)
class ReplacementParts:
    """What each node writes, from the clean run (host arrays).

    Attributes:
        features: int `[N, 3]`, the active features as `(layer, position,
            feature)` rows, in that lexicographic order.
        activations: float `[N]`, their activations (= pre-activations).
        encoder: float `[N, D]`: d pre-activation / d transcoder input.
        encoder_bias: float `[N]`: the pre-activation at a zero input.
        slot: int `[N]`, each feature's index `k` within its (layer,
            position) in `feature_vectors`.
        feature_vectors: float `[L, T, K, D]`: activation x decoder vector
            of each active feature (zero-padded to `K` per slot).
        errors: float `[L, T, D]`: MLP output minus transcoder output.
        decoder_bias: float `[L, D]`: each transcoder's output at no feature.
    """

    features: np.ndarray
    activations: np.ndarray
    encoder: np.ndarray
    encoder_bias: np.ndarray
    slot: np.ndarray
    feature_vectors: np.ndarray
    errors: np.ndarray
    decoder_bias: np.ndarray


def replacement_parts(transcoders, mlp_in: np.ndarray, mlp_out: np.ndarray) -> ReplacementParts:
    """Split each layer's MLP output into active features and an error.

    Args:
        transcoders: one checked transcoder per layer.
        mlp_in, mlp_out: `[L, T, D]`, the clean run's `ln2.hook_normalized`
            and `hook_mlp_out`.
    """
    rows, activations, encoder, encoder_bias, errors, decoder_bias, decoder = [], [], [], [], [], [], []
    for layer, transcoder in enumerate(transcoders):
        x = jnp.asarray(mlp_in[layer], transcoder.W_enc.dtype)
        acts = np.asarray(transcoder.encode(x))
        errors.append(np.asarray(mlp_out[layer], np.float32) - np.asarray(transcoder.decode(acts, x), np.float32))
        positions, features = np.nonzero(acts)
        rows.append(np.stack([np.full_like(positions, layer), positions, features], axis=1))
        activations.append(acts[positions, features])
        linear_encoder, linear_decoder = _linear_parts(transcoder)
        encoder.append(linear_encoder[features])
        decoder.append(linear_decoder[features])
        encoder_bias.append(np.asarray(transcoder.pre_activations(jnp.zeros(transcoder.config.d_in)))[features])
        decoder_bias.append(np.asarray(transcoder.decode(jnp.zeros(transcoder.config.d_sae)), np.float32))
    features = np.concatenate(rows).astype(np.int64)
    activations = np.concatenate(activations).astype(np.float32)
    num_layers, length, width = mlp_out.shape
    slot, vectors = _slots(features, activations, np.concatenate(decoder), (num_layers, length, width))
    return ReplacementParts(
        features=features,
        activations=activations,
        encoder=np.concatenate(encoder).astype(np.float32),
        encoder_bias=np.concatenate(encoder_bias).astype(np.float32),
        slot=slot,
        feature_vectors=vectors,
        errors=np.stack(errors),
        decoder_bias=np.stack(decoder_bias),
    )


def _linear_parts(transcoder) -> tuple[np.ndarray, np.ndarray]:
    """`(d pre-activation / d input, d output / d activation)`, each `[F, D]`:
    the linear parts of the transcoder's two affine maps, exactly (its own
    `pre_activations` and `decode`, differentiated along one basis vector
    per dimension, never one per feature)."""
    zero_in, zero_acts = jnp.zeros(transcoder.config.d_in), jnp.zeros(transcoder.config.d_sae)
    along = lambda e: jax.jvp(transcoder.pre_activations, (zero_in,), (e,))[1]
    pull = jax.vjp(transcoder.decode, zero_acts)[1]
    encoder = jax.vmap(along)(jnp.eye(transcoder.config.d_in)).T
    decoder = jax.vmap(lambda e: pull(e)[0])(jnp.eye(transcoder.config.d_out)).T
    return np.asarray(encoder), np.asarray(decoder)


def _slots(features: np.ndarray, activations: np.ndarray, decoder: np.ndarray, shape) -> tuple:
    """Each feature's index within its (layer, position), and the `[L, T, K,
    D]` table of activation x decoder vector (`K` a power of two holding the
    most features any slot has, so similar prompts share a program)."""
    num_layers, length, width = shape
    flat = features[:, 0] * length + features[:, 1]
    first = np.searchsorted(flat, flat, side="left")  # rows are sorted by (layer, position)
    slot = np.arange(len(flat)) - first
    most = int(slot.max()) + 1 if len(slot) else 1
    vectors = np.zeros((num_layers * length, 1 << (most - 1).bit_length(), width), np.float32)
    vectors[flat, slot] = activations[:, None] * decoder
    return slot, vectors.reshape(num_layers, length, -1, width)


# === The frozen linear model ===


def _add_probe(x, ctx):
    return x + ctx.data.astype(x.dtype)


def _record(x, ctx):
    """No change: puts the site's value in `ctx.seen` for a later hook."""
    return None


def _freeze_norm(x, ctx):
    """The normalised value `x` unchanged, with derivative `rms^-1 * weight`
    at the clean run's RMS: `stop(x) + (r - stop(r)) * stop(rms^-1 * weight)`
    of the norm's input `r` (read from `ctx.seen`; `r - stop(r)` is zero, so
    the value is `x` exactly). The inverse RMS is read off the model's own
    `rms_norm` with unit weight, projected on `r`."""
    source, epsilon = ctx.static
    resid = ctx.seen[source if ctx.layer is None else block_name(ctx.layer, source)]
    weight = ctx.data if ctx.layer is None else ctx.data[ctx.layer]
    frozen = jax.lax.stop_gradient(resid).astype(jnp.float32)
    unit = rms_norm(frozen, jnp.ones_like(weight, jnp.float32), epsilon).astype(jnp.float32)
    inverse_rms = jnp.sum(unit * frozen, -1, keepdims=True) / jnp.sum(frozen * frozen, -1, keepdims=True)
    slope = jax.lax.stop_gradient(inverse_rms * weight.astype(jnp.float32))
    return jax.lax.stop_gradient(x) + ((resid - jax.lax.stop_gradient(resid)) * slope).astype(x.dtype)


def _freeze(x, ctx):
    return jax.lax.stop_gradient(x)


def _cut_mlp(x, ctx):
    """The MLP's output kept, cut from its input; its zero probe passes on."""
    return jax.lax.stop_gradient(x) + ctx.data[ctx.layer].astype(x.dtype)


def frozen_hooks(model) -> Hooks:
    """The hooks that make `model`'s forward the frozen replacement model
    (see the module docstring). Their data, in order: the embedding's probe,
    `ln1`'s weights, `ln2`'s weights, the MLP outputs' probes, the final
    norm's weight (`frozen_data` builds them)."""
    epsilon = float(model.decoder.attention_norm.epsilon)
    last = block_name(model.num_layers - 1, "hook_resid_post")
    return Hooks(
        [
            ("hook_embed", Hook(_add_probe)),
            ("blocks.*.hook_resid_pre", Hook(_record)),
            ("blocks.*.ln1.hook_normalized", Hook(_freeze_norm, static=("hook_resid_pre", epsilon))),
            ("blocks.*.attn.hook_pattern", Hook(_freeze)),
            ("blocks.*.hook_resid_mid", Hook(_record)),
            ("blocks.*.ln2.hook_normalized", Hook(_freeze_norm, static=("hook_resid_mid", epsilon))),
            ("blocks.*.hook_mlp_out", Hook(_cut_mlp)),
            (last, Hook(_record)),
            ("ln_final.hook_normalized", Hook(_freeze_norm, static=(last, float(model.final_norm.epsilon)))),
        ]
    )


def frozen_data(params, probes: tuple) -> tuple:
    """The `frozen_hooks` data for `probes = (embed [1, T, D], mlp [L, 1, T, D])`."""
    decoder = params["decoder"]
    embed, mlp = probes
    no_data = None
    return (
        embed,
        no_data,
        decoder["attention_norm"]["scale"],
        no_data,
        no_data,
        decoder["mlp_norm"]["scale"],
        mlp,
        no_data,
        params["final_norm"]["scale"],
    )


def effects_fn(model):
    """`(key, run)`: the pure `run(params, ids, position, logit_direction,
    sources, receivers) -> (tokens [R, T], errors [R, L, T], features [R, L,
    T, K], biases [R])`, the direct effects on a batch of `R` receivers from
    one `jax.vjp` of the frozen model, vmapped over the receivers'
    cotangents, and the key it is compiled under (`pipeline.compiled`).

    `sources = (embed [T, D], errors [L, T, D], feature_vectors [L, T, K, D],
    decoder_bias [L, D])`; `receivers = (slot [R]` (layer * T + position of
    a feature receiver's transcoder input), `vector [R, D]` (its encoder
    direction), `logit [R])` (1 for the logit receiver, whose cotangent is
    `logit_direction [V]` at the logits of `position`, else 0).
    """
    fn = forward_fn(model, names=f"blocks.*.{READS}", hooks=frozen_hooks(model))

    def run(params, ids, position, logit_direction, sources, receivers):
        embed, errors, feature_vectors, decoder_bias = sources
        slot, vector, logit = receivers
        num_layers, length, width = errors.shape

        def frozen(probes):
            out = fn(params, ids, None, frozen_data(params, probes))
            reads = jnp.stack([out.captures[block_name(l, READS)][0] for l in range(num_layers)])
            return reads, model.unembed(params, out.hidden[0, position])

        dtype = jnp.dtype(model.compute_dtype)  # the probes' (and so the gradients') dtype
        zeros = (jnp.zeros((1, length, width), dtype), jnp.zeros((num_layers, 1, length, width), dtype))
        (reads, logits), pull = jax.vjp(frozen, zeros)
        count = slot.shape[0]
        at_reads = jnp.zeros((count, num_layers * length, width), reads.dtype)
        at_reads = at_reads.at[jnp.arange(count), slot].set((vector * (1 - logit)[:, None]).astype(reads.dtype))
        at_logits = (logit[:, None] * logit_direction[None]).astype(logits.dtype)
        grads = jax.vmap(lambda a, b: pull((a.reshape(num_layers, length, width), b))[0])(at_reads, at_logits)
        embed_grad, mlp_grad = grads[0][:, 0], grads[1][:, :, 0]  # [R, T, D], [R, L, T, D]
        return (
            jnp.einsum("rtd,td->rt", embed_grad, embed),
            jnp.einsum("rltd,ltd->rlt", mlp_grad, errors),
            jnp.einsum("rltd,ltkd->rltk", mlp_grad, feature_vectors),
            jnp.einsum("rltd,ld->r", mlp_grad, decoder_bias),
        )

    return ("attribution_graph.effects", *fn.program_key()), run
