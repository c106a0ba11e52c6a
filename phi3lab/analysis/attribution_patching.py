"""Attribution patching: activation patching to first order, from gradients.

Patching unit `u` of layer `l` (clean activation `a_c`, corrupted `a_x`)
into the corrupted run changes the metric by about

    m(a_x + delta_u) - m(a_x)  ~  delta_u . dm/da (at the corrupted run),

`delta_u` being `a_c - a_x` restricted to the unit. One forward of the
clean input, one forward+backward of the corrupted input give the estimate
for every layer and unit at once (Nanda 2023, "Attribution patching";
Syed et al. 2023). It is exact for a metric linear in the activation and
weakest where the metric saturates: a softmax pattern near one-hot, a
logit difference far from 0, or an activation whose effect runs through
an attention pattern that flips (the gradient there is ~0 while the patch
moves it a lot; Kramar et al. 2024, "AtP*").

`method="integrated"` replaces the gradient at the corrupted point by its
average along the straight path from the corrupted to the clean activation
of the layer's whole site (integrated gradients, Sundararajan et al. 2017),
`steps` midpoints per layer: the units of a layer then add up to the effect
of patching the whole layer's site, whatever the nonlinearity.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.analysis.patching import (
    SITES,
    PatchingResult,
    check_pair,
    check_site,
    metric_of,
    patching_result,
    stacked_site,
)
from phi3lab.checks import check_choice, check_positive_int
from phi3lab.deprecation import keyword_only_since
from phi3lab.tracing import pipeline
from phi3lab.tracing.gradient_trace import gradient_fn, gradient_program, zero_probes
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.metrics import finite_metric, resolve_metric
from phi3lab.tracing.names import block_name

METHODS = ("linear", "integrated")


def _interpolate(x, ctx):
    """Hook: move this layer's activation a fraction `alphas[layer]` of the
    way to the clean one."""
    clean, alphas = ctx.data
    return x + alphas[ctx.layer].astype(x.dtype) * (clean[ctx.layer].astype(x.dtype) - x)


def _unit_sums(products: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """`[L, B, ...]` products summed over everything but the layer and the
    unit axes (`axes` of the activation): `[L, *units]`."""
    kept = [0] + [axis + 1 for axis in axes]
    others = tuple(a for a in range(products.ndim) if a not in kept)
    return products.sum(axis=others)


@keyword_only_since("answer", "counterfactual", "sites", "method", "steps", "padding_mask", "normalize")
def attribution_patching(
    model,
    clean_ids,
    corrupted_ids,
    metric: Callable | None = None,
    *,
    answer=None,
    counterfactual=None,
    sites: str = "resid_pre",
    method: str = "linear",
    steps: int = 16,
    padding_mask=None,
    normalize: bool = True,
    memory_budget: int | None = None,
) -> PatchingResult:
    """Estimate `activation_patching` for every layer and unit from gradients.

    Two forwards (clean, corrupted) and one backward (corrupted) give
    every unit's estimate. The same sites, units, metric and normalisation (clean = 1, corrupted
    = 0) as `activation_patching`, and the same result type, so both go
    side by side (and into `phi3lab.widgets.PatchingView`).

    Args:
        model: a `Phi3Backbone`.
        clean_ids, corrupted_ids: token ids `[T]` or `[B, T]`, same shape.
        metric: None, or `metric(logits)` / `metric(logits, batch)` as in
            `activation_patching` (rows averaged).
        answer, counterfactual: token ids for the default logit difference.
        sites: one of `activation_patching`'s sites (`"resid_pre"`,
            `"head_z"`, `"head_pattern"`, ...).
        method: `"linear"` (first order at the corrupted run: two forwards
            and one backward for the whole sweep) or `"integrated"`
            (gradients averaged along corrupted -> clean per layer: `steps`
            forward+backward passes per layer, more faithful where
            softmax patterns saturate).
        steps: int. Integration points per layer (`"integrated"` only).
        padding_mask: `[B, T]` mask shared by both inputs, or None.
        normalize: scale so the clean metric is 1, the corrupted 0.
        memory_budget: bytes each compiled step may use (default the free
            memory); a step over it is refused before it runs
            (`CaptureTooLarge`, with the estimate).

    The inputs run padded to their length bucket (`phi3lab.tracing.pipeline`);
    gradients and differences are read at the real positions only.

    Returns:
        A `PatchingResult`: `values [layers, units]` estimate what
        `activation_patching` measures; `clean_metric` and
        `corrupted_metric` are measured exactly.

    Example:
    ```python
    fast = phi3lab.analysis.attribution_patching(model, clean, corrupted, answer=mary, counterfactual=john,
                                                 sites="head_z")
    exact = phi3lab.analysis.activation_patching(model, clean, corrupted, answer=mary, counterfactual=john,
                                                 sites="head_z")
    np.corrcoef(fast.values.ravel(), exact.values.ravel())[0, 1]
    ```
    """
    check_site(sites)
    check_choice("method", method, METHODS)
    steps = check_positive_int("steps", steps)
    pipeline.check_budget(memory_budget)
    clean, corrupted, padding = check_pair(model, clean_ids, corrupted_ids, padding_mask)
    resolved = resolve_metric(model, metric, answer, counterfactual, padding)
    hook, axes, _ = SITES[sites]
    names = tuple(block_name(layer, hook) for layer in range(model.num_layers))
    bucket = pipeline.bucket(model, clean.shape[1])
    params, mask, bad = model.params(), jnp.asarray(bucket.pad(padding)), jnp.asarray(bucket.pad(corrupted))
    probes = zero_probes(model, names, (clean.shape[0], bucket.padded))

    clean_metric = metric_of(model, clean, padding, resolved, memory_budget)
    clean_stack = np.asarray(stacked_site(model, clean, padding, sites, memory_budget), np.float64)
    args = (params, bad, mask, (), probes, resolved.data)
    plain = gradient_program(model, names, Hooks(), resolved, args, memory_budget, reduce="mean", bucket=bucket)
    bad_values, _, bad_acts, bad_grads = plain(*args)
    corrupted_metric = float(np.mean(finite_metric(bad_values, "the corrupted run")))
    delta = clean_stack - np.stack([bucket.unpad(n, np.asarray(bad_acts[n], np.float64)) for n in names])
    delta = np.where(np.isfinite(delta), delta, 0.0)  # -inf - -inf of masked scores

    if method == "linear":
        grads = np.stack([bucket.unpad(n, np.asarray(bad_grads[n], np.float64)) for n in names])
    else:
        padded_clean = bucket.pad_site(hook, clean_stack, leading=1)
        grads = _path_average_grads(model, hook, names, resolved, args, padded_clean, steps, bucket, memory_budget)
    raw = corrupted_metric + _unit_sums(finite_metric(delta * grads, "the gradients"), axes)
    return patching_result(model, sites, raw, clean_metric, corrupted_metric, clean, corrupted, normalize)


def _path_average_grads(model, hook, names, metric, args, clean_stack, steps, bucket, memory_budget) -> np.ndarray:
    """`[L, ...]` (real positions): for each layer, the gradient at its site
    averaged over `steps` midpoints of corrupted -> clean (that layer's site
    alone moved). `args` are the plain gradient program's, `clean_stack` the
    clean sites padded to `bucket`."""
    hooks = Hooks({block_name("*", hook): Hook(_interpolate)})
    key, run = gradient_fn(model, names, hooks, metric, reduce="mean", bucket=bucket)
    mapped = jax.vmap(run, in_axes=(None, None, None, ((None, 0),), None, None))
    params, ids, mask, _, probes, data = args
    layers = len(names)
    midpoints = (np.arange(steps) + 0.5) / steps
    clean = jnp.asarray(clean_stack, jnp.float32)
    program, averaged = None, []
    for layer in range(layers):
        alphas = np.zeros((steps, layers), np.float32)
        alphas[:, layer] = midpoints
        layer_args = (params, ids, mask, ((clean, jnp.asarray(alphas)),), probes, data)
        if program is None:
            program = pipeline.compiled(
                model, ("attribution.integrated", *key), mapped, layer_args, memory_budget, "These gradients"
            )
        _, _, _, grads = program(*layer_args)
        averaged.append(bucket.unpad(names[layer], np.asarray(grads[names[layer]], np.float64).mean(axis=0)))
    return np.stack(averaged)
