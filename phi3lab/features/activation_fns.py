"""The sparsifying nonlinearities of sparse dictionaries, as pure JAX
functions of the pre-activations `[..., F]`.

`topk` keeps the `k` largest pre-activations of each row (then a ReLU);
`batch_topk` keeps the `k * rows` largest of a whole batch; `jumprelu` and
`step` gate at a per-feature threshold and carry the straight-through
estimator of Rajamanoharan et al. (2024, "Jumping Ahead", the Gemma Scope
training rule): the threshold's pseudo-derivative is the derivative of the
gate with the Dirac delta replaced by a rectangle kernel of width
`bandwidth`,

    d/dθ step(z; θ)     := -(1 / ε) K((z - θ) / ε)
    d/dθ jumprelu(z; θ) := -(θ / ε) K((z - θ) / ε),   K(u) = 1 if |u| < 1/2 else 0,

while the pre-activations get the exact derivative of the gate (the mask for
`jumprelu`, nothing for `step`), as in DeepMind's JumpReLU.
"""

from __future__ import annotations

from functools import partial

import jax
from jax import numpy as jnp


def topk(pre, k: int):
    """Keep the `k` largest entries of each row of `pre` `[..., F]` (then
    ReLU), zero elsewhere: exactly `k` entries per row may be non-zero."""
    values, indices = topk_sparse(pre, k)
    rows = pre.reshape(-1, pre.shape[-1])
    kept = (
        jnp.zeros_like(rows).at[jnp.arange(rows.shape[0])[:, None], indices.reshape(-1, k)].set(values.reshape(-1, k))
    )
    return kept.reshape(pre.shape)


def topk_sparse(pre, k: int):
    """`topk(pre, k)` as its `k` kept entries per row: `(values, indices)`,
    both `[..., k]` (values ReLU'd, so some may be 0)."""
    values, indices = jax.lax.top_k(pre, k)
    return jax.nn.relu(values), indices


def batch_topk(pre, k: float):
    """Keep the `round(k * rows)` largest ReLU'd entries of the whole batch
    `pre` `[..., F]`: `k` active features per row on average."""
    flat = jax.nn.relu(pre).reshape(-1)
    rows = flat.shape[0] // pre.shape[-1]
    count = max(1, min(flat.shape[0], int(round(k * rows))))
    values, indices = jax.lax.top_k(flat, count)
    return jnp.zeros_like(flat).at[indices].set(values).reshape(pre.shape)


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to_threshold(values, threshold):
    """`values` `[..., F]` summed over every leading axis, to the threshold's shape."""
    return jnp.sum(values.reshape(-1, values.shape[-1]), axis=0).reshape(threshold.shape)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre, threshold, bandwidth: float):
    """`pre * (pre > threshold)` (for thresholds >= 0, SAELens' `relu(pre) *
    (pre > threshold)`), with the straight-through threshold gradient."""
    return jax.nn.relu(pre) * (pre > threshold).astype(pre.dtype)


def _jumprelu_fwd(pre, threshold, bandwidth):
    return jumprelu(pre, threshold, bandwidth), (pre, threshold)


def _jumprelu_bwd(bandwidth, residual, grad):
    pre, threshold = residual
    kernel = (threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth)
    gate = (pre > threshold) & (pre > 0)
    return grad * gate.astype(grad.dtype), _sum_to_threshold(-kernel * grad, threshold)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(pre, threshold, bandwidth: float):
    """The gate `pre > threshold` as 0/1 (its sum over features is the L0),
    with the straight-through threshold gradient."""
    return (pre > threshold).astype(pre.dtype)


def _step_fwd(pre, threshold, bandwidth):
    return step(pre, threshold, bandwidth), (pre, threshold)


def _step_bwd(bandwidth, residual, grad):
    pre, threshold = residual
    kernel = (1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth)
    return jnp.zeros_like(pre), _sum_to_threshold(-kernel * grad, threshold)


step.defvjp(_step_fwd, _step_bwd)
