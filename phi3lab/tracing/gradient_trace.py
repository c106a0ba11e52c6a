"""`phi3lab.gradients`: activations and d metric / d activation at hook points.

Each requested site gets a zero "probe" hook, `x -> x + probe`, whose data
is an input of the compiled program; the gradient of the metric with
respect to a probe is the gradient with respect to the activation there
(the probe is zero, so the forward is unchanged). One `jax.value_and_grad`
of the pure forward (`forward_fn`) gives the activations, the metric and
every gradient in one compiled forward+backward.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.runtime import compile_cache
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import as_hooks, forward_fn
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.metrics import Metric, finite_metric, resolve_metric
from phi3lab.tracing.names import Selection, all_names, select, site_shape
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary
from phi3lab.tracing.sites import ATTENTION_MAPS

REDUCTIONS = ("sum", "mean")


class GradientTrace(Trace):
    """A `Trace` whose activations come with the metric's gradient.

    `g[name]` is the activation (as in a `Trace`), `g.grad(name)` is
    d metric / d activation, same shape. With a metric per row the
    gradients are of the sum over rows, so row `b` holds the gradient of
    row `b`'s own metric (rows do not interact).

    Attributes:
        metric: float64 `[B]` (the metric of each row) or a float (a
            metric that returns one total).
        grads: name -> gradient array, in forward order.
    """

    def __init__(self, arrays, grads, metric, **kwargs):
        super().__init__(arrays, **kwargs)
        self.grads = grads
        self.metric = metric

    def grad(self, name: str) -> np.ndarray:
        """d metric / d activation at `name`, shaped like `self[name]`."""
        self[name]  # a clear KeyError for names not captured
        return self.grads[name]

    def __repr__(self):
        batch, length = self.token_ids.shape
        return f"<GradientTrace batch={batch} positions={length} names={len(self.names)}>"


def _probe(x, ctx):
    return x + ctx.data.astype(x.dtype)


GRADIENT_ADVICE = "Take gradients at fewer names, a shorter input or fewer rows, or load the model in bfloat16."


def gradient_fn(
    model,
    names: tuple[str, ...],
    hooks: Hooks,
    metric: Metric,
    reduce: str = "sum",
    bucket=None,
    hook_length: int | None = None,
):
    """`(key, run)`: the pure `run(params, ids, mask, hook_data, probes,
    metric_data) -> (metric values, final hidden states, activations,
    gradients)` (the last two dicts by name) and the key it is cached under.

    `hook_data` is the data of `hooks` (the user's interventions), `probes`
    one zero array per name (the point where gradients are taken; pass the
    activation's shape, `zero_probes`). The metric's rows are summed
    (`reduce="sum"`) or averaged (`"mean"`, what the patching sweeps
    normalize) before differentiating. `bucket` (a `pipeline.Bucket`, None
    for unpadded ids) says how the ids are padded: the rotary factors stay
    the real length's and a metric function sees the real positions only
    (`Metric.length`); with `hook_length` (`pipeline.hook_length`) every
    hook, the probes included, sees only that many positions. The key
    names the model's plan, hook functions, metric, reduction and those
    statics. Uncompiled, so sweeps can `vmap` it inside their own program;
    `gradient_program` is it compiled.
    """
    probes = Hooks([(name, Hook(_probe)) for name in names])
    fn = forward_fn(model, names=list(names), hooks=hooks | probes)
    num_positions = bucket.num_positions if bucket else None
    metric_length = metric.length(bucket) if bucket else None
    key = ("gradients", *fn.program_key(), metric.key, reduce, num_positions, hook_length, metric_length)

    def objective(probe_data, params, ids, mask, hook_data, metric_data):
        hidden, captures = fn.run(
            params, ids, mask, tuple(hook_data) + tuple(probe_data), num_positions=num_positions, length=hook_length
        )
        batch = {"token_ids": ids, "padding_mask": mask}
        values = metric.rows(hidden, lambda h: model.unembed(params, h), metric_data, batch, metric_length)
        total = jnp.sum(values) if reduce == "sum" else jnp.mean(values)
        return total, (values, hidden, {name: captures[name] for name in names})

    def run(params, ids, mask, hook_data, probe_data, metric_data):
        (_, (values, hidden, captures)), grads = jax.value_and_grad(objective, has_aux=True)(
            tuple(probe_data), params, ids, mask, hook_data, metric_data
        )
        return values, hidden, captures, dict(zip(names, grads))

    return key, run


def gradient_program(
    model,
    names: tuple[str, ...],
    hooks: Hooks,
    metric: Metric,
    args,
    memory_budget: int | None = None,
    reduce: str = "sum",
    bucket=None,
    hook_length: int | None = None,
) -> compile_cache.Program:
    """`gradient_fn`'s `run` compiled ahead of time for `args` through the
    run pipeline (cached per model and key; refused with the estimate when
    over `memory_budget`)."""
    key, run = gradient_fn(model, names, hooks, metric, reduce, bucket, hook_length)
    return pipeline.compiled(model, key, run, args, memory_budget, "These gradients", GRADIENT_ADVICE)


def zero_probes(model, names, shape: tuple[int, int]) -> tuple:
    """One zero array per name, the activation's shape for ids of `shape`
    and its dtype (the model's compute dtype; attention maps are float32),
    so gradients come back in the activation's precision."""
    compute = jnp.dtype(model.compute_dtype)
    return tuple(
        jnp.zeros(site_shape(model, name, *shape), jnp.float32 if name.endswith(ATTENTION_MAPS) else compute)
        for name in names
    )


def gradients(
    model,
    inputs,
    metric=None,
    answer=None,
    counterfactual=None,
    *,
    names: Selection = "blocks.*.hook_resid_pre",
    hooks=None,
    tokenizer=None,
    padding_mask=None,
    memory_budget: int | None = None,
) -> GradientTrace:
    """Activations and d metric / d activation at `names`, in one compiled
    forward+backward.

    Args:
        model: a `Phi3Backbone`.
        inputs: token ids `[T]` or `[B, T]`, or text with `tokenizer`.
        metric: None, or `metric(logits)` / `metric(logits, batch)` of the
            logits `[B, T, V]` (and `batch = {"token_ids", "padding_mask"}`)
            returning a scalar or one value per row `[B]` (rows are summed
            before differentiating); written with `jax.numpy`.
        answer, counterfactual: token ids (one, or one per row): with
            `metric=None` the metric is `logit[answer] - logit[counterfactual]`
            (or the logit alone) at each row's last real position.
        names: the sites (a name, glob pattern, list or predicate; not
            `hook_logits`): residual streams, `attn.hook_q/k/v`, per-head
            `attn.hook_z`, `attn.hook_pattern` / `hook_attn_scores`, MLP
            activations (`mlp.hook_post`...).
        hooks: interventions that run in the same forward (`phi3lab.hooks`);
            gradients are taken after them, at the values downstream sees.
        tokenizer: a `Phi3Tokenizer`, for text inputs.
        padding_mask: `[T]` or `[B, T]`, True for real tokens.
        memory_budget: bytes the forward+backward may use (default the
            device's free memory); refused before running when over it
            (`CaptureTooLarge`, with the estimate).

    The ids run padded to their length bucket (`phi3lab.tracing.pipeline`):
    the sites and gradients come back cut to the real positions.

    Returns:
        A `GradientTrace`: `g[name]` the activation, `g.grad(name)` its
        gradient (same shape), `g.metric` the metric per row (or total).

    Example:
    ```python
    g = phi3lab.gradients(model, ids, answer=mary, counterfactual=john,
                          names=["blocks.*.hook_resid_pre", "blocks.1.attn.hook_z"])
    g.grad("blocks.1.hook_resid_pre").shape        # [B, T, D], like g["blocks.1.hook_resid_pre"]
    attribution = (g.grad("blocks.1.attn.hook_z") * g["blocks.1.attn.hook_z"]).sum(-1)   # [B, T, Hq]
    ```
    """
    pipeline.check_budget(memory_budget)
    token_ids, mask = pipeline.prepare_inputs(model, inputs, padding_mask, tokenizer)
    chosen = tuple(select(names, all_names(model)))
    if "hook_logits" in chosen:
        raise ValueError(
            "`names` includes 'hook_logits': take gradients at hidden sites; the metric itself is the "
            "function of the logits (e.g. 'ln_final.hook_normalized' is the last site before them)."
        )
    resolved = resolve_metric(model, metric, answer, counterfactual, mask)
    user_hooks = as_hooks(hooks)
    length = token_ids.shape[1]
    bucket = pipeline.bucket(model, length)
    hook_length = pipeline.hook_length(user_hooks.entries, bucket)
    params = model.params()
    args = (
        params,
        jnp.asarray(bucket.pad(token_ids)),
        jnp.asarray(bucket.pad(mask)),
        tuple(h.data for _, h in user_hooks.entries),
        zero_probes(model, chosen, (token_ids.shape[0], hook_length or bucket.padded)),
        resolved.data,
    )
    run = gradient_program(
        model, chosen, user_hooks, resolved, args, memory_budget, bucket=bucket, hook_length=hook_length
    )
    values, hidden, captures, grads = run(*args)
    values = finite_metric(values)
    return GradientTrace(
        {name: bucket.unpad(name, np.asarray(captures[name])) for name in chosen},
        {name: bucket.unpad(name, np.asarray(grads[name])) for name in chosen},
        float(values) if values.ndim == 0 else values,
        token_ids=token_ids,
        padding_mask=mask,
        tokens=pipeline.display_tokens(tokenizer, token_ids),
        output=np.asarray(hidden)[:, :length],
        rope=describe_rotary(model.rotary, length),
        model=model,
    )
