"""Training a sparse dictionary: `train(model, data, site=..., kind=..., ...)`.

One compiled step (`phi3lab.runtime.compile_cache.jit`) of a pure function of
`(state, inputs, targets)`; the optimiser is optax's Adam with a linear
warm-up, a constant phase and a linear decay to zero over the last fifth,
after clipping the gradient's global norm at 1.

The losses, per kind (x̂ the output, y the target: x itself for an SAE):

    reconstruction  Σ(x̂ - y)² / Σ(y - mean y)²       (normalised MSE = 1 - explained variance)
    "relu"          + l1 · mean_tokens Σ_f acts_f |W_dec,f|    (L1 weighted by decoder norms)
    "jumprelu"      + l1 · mean_tokens Σ_f step(pre_f; θ_f)    (L0, straight-through threshold gradient)
    "topk", "batchtopk"  + AuxK / 32                    (dead features fit the residual, Gao et al. 2024)

Decoder rows are kept at unit norm after each update for `"topk"`,
`"batchtopk"` and `"jumprelu"` (so sparsity cannot be bought by scaling);
JumpReLU thresholds stay >= 0; a BatchTopK dictionary's threshold (its rule
after training) follows the smallest kept activation of each batch
(exponential moving average, rate 0.01, as SAELens).

Dead features: a feature is dead when it has not fired in the last
`dead_after` training tokens. Dead top-k features get the auxiliary loss
(the top `d_in / 2` dead pre-activations reconstruct the residual
`y - x̂`); for `"relu"` and `"jumprelu"` the dead fraction is reported only.

Inputs (and targets) are scaled so their mean norm is `sqrt(d_in)` (SAELens'
`expected_average_only_in`) while training, which makes `lr` and `l1`
independent of the site's scale; the scale is folded into the weights of
the returned dictionary, which reads raw activations. The decoder bias
starts at the targets' mean.

Data-parallel: with several devices (`jax.devices()`), the batch is split
over a one-axis mesh and the weights replicated; XLA partitions the step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import numpy as np
import optax
import pandas as pd
from jax import numpy as jnp

from phi3lab.checks import check_choice, check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.features import activation_fns
from phi3lab.features import data as data_sources
from phi3lab.features.dictionary import KINDS, SparseDictionary
from phi3lab.runtime import compile_cache
from phi3lab.sharding import BatchMesh
from phi3lab.tracing.names import all_names, select

AUX_COEFFICIENT = 1 / 32
THRESHOLD_RATE = 0.01
CURVE_POINTS = 100


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` returns.

    Attributes:
        dictionary: the trained `SparseDictionary` (reads raw activations).
        curves: a DataFrame per logged step: `step`, `tokens`, `loss`, `mse`
            (normalised), `aux_loss`, `l0` (mean active features per token),
            `explained_variance`, `dead_fraction`, `lr`.
        tokens: training tokens seen.
        seconds: wall time of the loop (compilation included).
    """

    dictionary: SparseDictionary
    curves: pd.DataFrame
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static part of a step."""

    l1: float
    dead_after: int
    k_aux: int
    unit_decoder: bool


def _output(d: SparseDictionary, x, acts):
    out = acts @ d.W_dec + d.b_dec
    return out if d.W_skip is None else out + x @ d.W_skip.T


def _normalised(error, target):
    return jnp.sum(error**2) / jnp.maximum(jnp.sum((target - target.mean(0)) ** 2), 1e-12)


def _loss(d: SparseDictionary, x, y, dead, settings: _Settings):
    kind = d.config.kind
    pre = d.pre_activations(x)
    acts = d.activate(pre, batch=True)
    out = _output(d, x, acts)
    mse = _normalised(out - y, y)
    if kind == "relu":
        penalty = settings.l1 * jnp.mean(jnp.sum(acts * d.decoder_norms(), -1))
    elif kind == "jumprelu":
        penalty = settings.l1 * jnp.mean(jnp.sum(activation_fns.step(pre, d.threshold, d.config.bandwidth), -1))
    else:
        residual = jax.lax.stop_gradient(y - out)
        # Skipped (a second top-k and decode) while no feature is dead.
        penalty = jax.lax.cond(
            jnp.any(dead),
            lambda: AUX_COEFFICIENT * _aux_loss(d, pre, residual, y, dead, settings.k_aux),
            lambda: jnp.zeros((), mse.dtype),
        )
    metrics = {"mse": mse, "aux_loss": penalty, "l0": jnp.mean(jnp.sum(acts > 0, -1)), "explained_variance": 1 - mse}
    return mse + penalty, (metrics, acts)


def _aux_loss(d: SparseDictionary, pre, residual, y, dead, k_aux: int):
    """AuxK: the top `k_aux` dead pre-activations reconstruct the residual."""
    acts = activation_fns.topk(jnp.where(dead, pre, -jnp.inf), k_aux)
    scale = jnp.minimum(jnp.sum(dead) / k_aux, 1.0)
    return scale * _normalised(acts @ d.W_dec - residual, y)


def _constrain(d: SparseDictionary, acts, step, settings: _Settings) -> SparseDictionary:
    """Projections after an update: unit decoder rows, thresholds >= 0, the BatchTopK threshold."""
    changes = {}
    if settings.unit_decoder:
        changes["W_dec"] = d.W_dec / jnp.maximum(d.decoder_norms()[:, None], 1e-8)
    if d.config.kind == "jumprelu":
        changes["threshold"] = jnp.maximum(d.threshold, 0.0)
    if d.config.kind == "batchtopk":
        smallest = jnp.min(jnp.where(acts > 0, acts, jnp.inf))
        smallest = jnp.where(jnp.isfinite(smallest), smallest, d.threshold)
        moved = (1 - THRESHOLD_RATE) * d.threshold + THRESHOLD_RATE * smallest
        changes["threshold"] = jnp.where(step == 0, smallest * jnp.ones_like(d.threshold), moved)
    return dataclasses.replace(d, **changes)


def _step_fn(optimizer, settings: _Settings):
    def train_step(state, x, y):
        d, opt_state, since_fired, step = state
        dead = since_fired >= settings.dead_after
        (loss, (metrics, acts)), grads = jax.value_and_grad(_loss, has_aux=True)(d, x, y, dead, settings)
        updates, opt_state = optimizer.update(grads, opt_state, d)
        d = _constrain(optax.apply_updates(d, updates), acts, step, settings)
        fired = jnp.any(acts > 0, axis=0)
        since_fired = jnp.where(fired, 0, since_fired + x.shape[0])
        metrics = {**metrics, "loss": loss, "dead_fraction": jnp.mean(since_fired >= settings.dead_after)}
        return (d, opt_state, since_fired, step + 1), metrics

    return train_step


def schedule(lr: float, steps: int) -> optax.Schedule:
    """Linear warm-up over the first 5% of steps, constant, then a linear
    decay to 0 over the last 20%."""
    warmup = max(1, steps // 20)
    decay = max(1, steps // 5)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, lr, warmup),
            optax.constant_schedule(lr),
            optax.linear_schedule(lr, 0.0, decay),
        ],
        boundaries=[warmup, max(warmup + 1, steps - decay)],
    )


def _fold_scales(d: SparseDictionary, scale_in: float, scale_out: float) -> SparseDictionary:
    """The dictionary that reads raw activations, from one trained on
    inputs scaled by `scale_in` and targets by `scale_out`."""
    return dataclasses.replace(
        d,
        W_enc=d.W_enc * scale_in,
        W_dec=d.W_dec / scale_out,
        b_dec=d.b_dec / scale_out,
        W_skip=None if d.W_skip is None else d.W_skip * (scale_in / scale_out),
    )


def _mean_norm_scale(rows: np.ndarray) -> float:
    return float(math.sqrt(rows.shape[-1]) / max(np.mean(np.linalg.norm(rows, axis=-1)), 1e-12))


def _check_arguments(kind, width, k, l1, tokens, batch_size, lr):
    check_choice("kind", kind, KINDS)
    check_positive_int("width", width)
    check_positive_int("tokens", tokens)
    check_positive_int("batch_size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise bad_argument("lr", lr, "a positive learning rate")
    if kind in ("topk", "batchtopk") and not (isinstance(k, (int, float)) and 0 < k <= width):
        raise bad_argument("k", k, f'a number of features per token in (0, width={width}] for kind="{kind}"')
    if kind in ("relu", "jumprelu") and not (isinstance(l1, (int, float)) and l1 >= 0):
        raise bad_argument("l1", l1, f'a sparsity coefficient >= 0 for kind="{kind}"')


def _check_site(model, name, argument: str) -> None:
    """Raise unless `name` is one hook name of `model` (any string without a model)."""
    if not isinstance(name, str):
        raise bad_argument(argument, name, "a hook name")
    if model is not None and len(select(name, all_names(model), argument=argument)) != 1:
        raise bad_argument(argument, name, "one hook name, not a pattern")


def train(
    model,
    data,
    *,
    site: str,
    kind: str,
    width: int,
    k: int | float | None = None,
    l1: float | None = None,
    tokens: int,
    batch_size: int = 4096,
    lr: float = 4e-4,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    target_site: str | None = None,
    skip: bool = False,
    tokenizer=None,
    dead_after: int | None = None,
) -> TrainResult:
    """Train a sparse dictionary on activations of `site`.

    Args:
        model: the `Phi3Backbone` whose activations are read (None when
            `data` already holds activations).
        data: an activation store (`.batches(name, batch_size, shuffle,
            seed)`), `[N, D]` activations, a pair `(inputs, targets)` of
            them for a transcoder, token ids `[B, T]`, or texts (with
            `tokenizer=`); see `phi3lab.features.data`.
        site: the hook name read (e.g. `"blocks.2.hook_resid_post"`).
        kind: `"relu"`, `"topk"`, `"batchtopk"` or `"jumprelu"`.
        width: the number of features.
        k: features per token (`"topk"`; the batch average for `"batchtopk"`).
        l1: the sparsity coefficient (`"relu"`: L1; `"jumprelu"`: L0).
        tokens: training tokens (activation rows) to consume.
        batch_size: rows per step (split over the devices).
        lr: Adam's peak learning rate.
        seed: seeds the initialisation and the data order.
        progress: None, or `fn(row)` called with each curve row as it is logged.
        target_site: for a transcoder, the hook name predicted (e.g.
            `"blocks.2.hook_mlp_out"` from `"blocks.2.ln2.hook_normalized"`).
        skip: give a transcoder a linear skip connection.
        tokenizer: a `Phi3Tokenizer`, when `data` is text.
        dead_after: tokens without firing after which a feature counts as
            dead; default a quarter of `tokens` (at most 10M).

    Returns:
        A `TrainResult`: `.dictionary`, `.curves` (loss, L0, explained
        variance, dead fraction per logged step), `.tokens`, `.seconds`.

    Example:
    ```python
    result = phi3lab.features.train(model, texts, tokenizer=tok, site="blocks.2.hook_resid_post",
                                    kind="topk", width=1024, k=16, tokens=2_000_000, batch_size=1024)
    sae = result.dictionary
    result.curves.plot(x="tokens", y=["explained_variance", "l0"])
    ```
    """
    _check_arguments(kind, width, k, l1, tokens, batch_size, lr)
    _check_site(model, site, "site")
    if target_site is not None:
        _check_site(model, target_site, "target_site")
    devices = jax.devices()
    if batch_size % len(devices):
        raise bad_argument("batch_size", batch_size, f"a multiple of the number of devices ({len(devices)})")
    steps = max(1, tokens // batch_size)
    stream = data_sources.batches(
        model, data, site=site, target_site=target_site, batch_size=batch_size, seed=seed, tokenizer=tokenizer
    )
    start = time.perf_counter()
    first_x, first_y = next(stream)
    first_y = first_x if first_y is None else first_y
    scale_in, scale_out = _mean_norm_scale(first_x), _mean_norm_scale(first_y)
    if target_site is None:
        scale_out = scale_in
    d = SparseDictionary.init(
        jax.random.key(seed),
        kind=kind,
        d_in=first_x.shape[-1],
        d_sae=width,
        k=k,
        site=site,
        target_site=target_site,
        d_out=first_y.shape[-1],
        skip=skip,
    )
    d = dataclasses.replace(d, b_dec=jnp.asarray(first_y.mean(0) * scale_out, d.b_dec.dtype))
    settings = _Settings(
        l1=float(l1 or 0.0),
        dead_after=int(dead_after or min(max(tokens // 4, batch_size), 10_000_000)),
        k_aux=min(d.config.d_in // 2, width),
        unit_decoder=kind != "relu",
    )
    learning_rate = schedule(lr, steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
    state = (d, optimizer.init(d), jnp.zeros(width, jnp.int32), jnp.zeros((), jnp.int32))
    mesh = BatchMesh(devices=devices)
    place_batch, state = mesh.rows, mesh.replicate(state)
    step_fn = compile_cache.jit(_step_fn(optimizer, settings), donate_argnums=(0,))
    log_every = max(1, steps // CURVE_POINTS)
    logged, rows = [], []
    batch = (first_x, first_y)
    for step in range(steps):
        x, y = batch
        x = np.asarray(x, np.float32) * scale_in
        y = x if target_site is None else np.asarray(y, np.float32) * scale_out
        state, metrics = step_fn(state, place_batch(x), place_batch(y))
        if step % log_every == 0 or step == steps - 1:
            logged.append((step, metrics))
            if progress is not None:
                rows.append(_curve_row(step, metrics, batch_size, learning_rate))
                progress(rows[-1])
        if step + 1 < steps:
            batch = next(stream)
            batch = (batch[0], batch[0] if batch[1] is None else batch[1])
    trained = jax.block_until_ready(state[0])
    seconds = time.perf_counter() - start
    curves = pd.DataFrame([_curve_row(step, m, batch_size, learning_rate) for step, m in logged])
    return TrainResult(_fold_scales(jax.device_get(trained), scale_in, scale_out), curves, steps * batch_size, seconds)


def _curve_row(step: int, metrics: dict, batch_size: int, learning_rate) -> dict:
    values = {name: float(value) for name, value in jax.device_get(metrics).items()}
    return {"step": step, "tokens": (step + 1) * batch_size, **values, "lr": float(learning_rate(step))}
