"""Edge attribution patching: a score for every edge of a `Graph` from gradients.

Sign convention: the score of edge `u -> v` estimates how the metric of the
**clean** run changes when that edge alone carries the corrupted value,

    score(u -> v) = (a_u(corrupted) - a_u(clean)) . d metric / d x_v,

`a_u` the sender's output, `x_v` the receiver's input, the products summed
over the hidden axis, the positions (`positions="sum"`) and the prompts (the
metric being their mean). An edge the clean behaviour needs therefore scores
below 0 for a metric the corruption lowers; circuits rank edges by `|score|`.

* `"eap"` (Syed et al. 2023): the gradient at the clean run.
* `"eap-ig"` (Hanna et al. 2024): the gradient averaged over `steps` runs
  whose input **embeddings** move from the corrupted to the clean prompt,
  `e(alpha) = e_clean + (1 - alpha)(e_corrupted - e_clean)` at `alpha = k /
  steps`, `k = 1 ... steps` (the right-hand Riemann sum, so `steps=1` is
  EAP). Everything after the embedding runs as the interpolated input makes it.

Summed over every sender into a receiver, the scores are the receiver's node
attribution `(x_v(corrupted) - x_v(clean)) . d metric / d x_v`, since `x_v`
is the sum of its senders' outputs (levels `"heads+mlps"` and `"layers"`;
at `"heads"` the MLPs' part of `x_v` is not an edge).
"""

from __future__ import annotations

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_choice, check_positive_int
from phi3lab.circuits.circuit import EdgeScores
from phi3lab.circuits.graph import Graph
from phi3lab.circuits.inputs import prepare
from phi3lab.tracing import pipeline
from phi3lab.tracing.gradient_trace import GRADIENT_ADVICE, gradient_fn, zero_probes
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.metrics import Metric, finite_metric

METHODS = ("eap", "eap-ig")
POSITIONS = ("sum", "each")


def _toward_corrupted(x, ctx):
    """Hook on `hook_embed`: the clean embedding moved `1 - alpha` of the way
    to the corrupted one (`alpha = 1`: the clean embedding itself)."""
    corrupted, alpha = ctx.data
    return x + (1.0 - alpha).astype(x.dtype) * (corrupted.astype(x.dtype) - x)


def attribution_fn(model, graph: Graph, metric: Metric, steps: int, bucket: pipeline.Bucket):
    """`(key, program)`: the pure `program(params, clean, corrupted, mask,
    probes, metric_data, alphas) -> (scores [S, R, T], clean metric [B],
    corrupted metric [B])` over ids padded to `bucket` (a `pipeline.Bucket`),
    and the key it is cached under (model, graph level, metric, `steps` and
    the bucket's statics).

    One forward of each prompt captures the senders' outputs; a `lax.scan`
    over `alphas` runs a forward+backward per step with zero probes at the
    receiver sites (`phi3lab.tracing.gradient_fn`), summing their gradients.
    Padded positions hold the same (zero) ids in both prompts, so their
    senders' differences, and their scores, are 0.
    """
    senders = graph.sender_forward(model)
    hooks = Hooks({"hook_embed": Hook(_toward_corrupted)})
    gradient_key, gradient = gradient_fn(model, graph.site_names, hooks, metric, reduce="mean", bucket=bucket)
    length = metric.length(bucket)

    def program(params, clean, corrupted, mask, probes, metric_data, alphas):
        capture = lambda ids: senders.run(params, ids, mask, num_positions=bucket.num_positions)
        (_, clean_captures), (corrupted_hidden, corrupted_captures) = capture(clean), capture(corrupted)

        def step(total, alpha):
            hook_data = ((corrupted_captures["hook_embed"], alpha),)
            values, _, _, grads = gradient(params, clean, mask, hook_data, probes, metric_data)
            return jax.tree.map(jnp.add, total, grads), values

        zeros = {name: jnp.zeros_like(probe) for name, probe in zip(graph.site_names, probes)}
        total, values = jax.lax.scan(step, zeros, alphas)
        grads = graph.receiver_values(total).astype(jnp.float32) / alphas.shape[0]
        delta = graph.sender_values(corrupted_captures) - graph.sender_values(clean_captures)
        scores = jnp.einsum("sbtd,rbtd->srt", delta.astype(jnp.float32), grads)
        batch = {"token_ids": corrupted, "padding_mask": mask}
        unembed = lambda h: model.unembed(params, h)
        return scores, values[-1], metric.rows(corrupted_hidden, unembed, metric_data, batch, length)

    return ("circuits.edge_attribution", graph.key, steps, *gradient_key[1:]), program


def edge_attribution(
    model,
    clean,
    corrupted,
    metric=None,
    *,
    answer=None,
    counterfactual=None,
    level: str = "heads",
    method: str = "eap-ig",
    steps: int = 16,
    positions: str = "sum",
    padding_mask=None,
    memory_budget: int | None = None,
) -> EdgeScores:
    """Score every edge of `Graph(model, level)` in one compiled program.

    Args:
        model: a `Phi3Backbone`.
        clean, corrupted: token ids `[T]` or `[B, T]`, one shape (prompts of
            different lengths: pad them and pass `padding_mask`).
        metric: None, or `metric(logits)` / `metric(logits, batch)` returning
            a scalar or one value per row (written in `jax.numpy`); rows are
            averaged.
        answer, counterfactual: token ids (one or one per row) for the
            default metric `logit[answer] - logit[counterfactual]` at each
            row's last real position.
        level: `"heads"`, `"heads+mlps"` or `"layers"` (see `Graph`).
        method: `"eap"` (gradient at the clean run) or `"eap-ig"` (averaged
            over `steps` embeddings from the corrupted to the clean input).
        steps: int. Integration steps of `"eap-ig"` (`"eap"` is 1).
        positions: `"sum"` (one score per edge) or `"each"` (one per edge
            and position, a `position` column).
        padding_mask: `[B, T]` mask shared by both inputs, True for real tokens.
        memory_budget: bytes the compiled program may use (default the
            device's free memory); refused before running when over it
            (`CaptureTooLarge`, with the estimate).

    The prompts run padded to their length bucket (`phi3lab.tracing.pipeline`):
    padded positions score 0 and `positions="each"` scores cover the real
    positions only.

    Returns:
        An `EdgeScores` (see the module docstring for the sign convention).

    Example:
    ```python
    scores = phi3lab.circuits.edge_attribution(model, clean, corrupted, answer=mary, counterfactual=john,
                                               level="heads+mlps", method="eap-ig", steps=16)
    scores.edges.sort_values("score").head()     # sender, receiver, score
    circuit = scores.top(50)
    ```
    """
    pipeline.check_budget(memory_budget)
    check_choice("method", method, METHODS)
    check_choice("positions", positions, POSITIONS)
    steps = 1 if method == "eap" else check_positive_int("steps", steps)
    graph = Graph(model, level)
    clean_ids, corrupted_ids, mask, resolved = prepare(
        model, clean, corrupted, padding_mask, metric, answer, counterfactual
    )
    bucket = pipeline.bucket(model, clean_ids.shape[1])
    key, program = attribution_fn(model, graph, resolved, steps, bucket)
    args = (
        model.params(),
        jnp.asarray(bucket.pad(clean_ids)),
        jnp.asarray(bucket.pad(corrupted_ids)),
        jnp.asarray(bucket.pad(mask)),
        zero_probes(model, graph.site_names, (clean_ids.shape[0], bucket.padded)),
        resolved.data,
        jnp.arange(1, steps + 1, dtype=jnp.float32) / steps,
    )
    compiled = pipeline.compiled(model, key, program, args, memory_budget, "These edge scores", GRADIENT_ADVICE)
    scores, clean_values, corrupted_values = compiled(*args)
    scores = np.asarray(scores)[:, :, : bucket.length]
    scores = finite_metric(scores, "the edge scores") * graph.allowed[:, :, None]
    return EdgeScores(
        graph,
        scores if positions == "each" else scores.sum(axis=2),
        clean_metric=float(np.mean(finite_metric(clean_values, "the clean run"))),
        corrupted_metric=float(np.mean(finite_metric(corrupted_values, "the corrupted run"))),
        method=method,
        steps=steps,
    )
