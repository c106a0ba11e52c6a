"""Edge patching: run the model with chosen edges carrying ablated values.

Receiver `v`'s input is the sum of its senders' outputs, so replacing edge
`u -> v` alone means adding `a_u(ablated) - a_u(current)` to `v`'s input and
nowhere else. Hooks at the receiver sites do exactly that, reading the
senders' current outputs of this very run through `ctx.seen` (a sender whose
own inputs were patched passes its changed output on through the edges that
are kept), the ablated values and the edge mask being hook data: one
compiled program per (model, level, metric, input shape) serves every
circuit. `ablation="corrupted"` replaces with the senders' outputs on the
corrupted prompts, `"mean"` with their mean over the clean prompts (per
position, over the rows where it is a real token).

`faithfulness` normalises a circuit's metric between the full graph (1: the
clean run) and the empty circuit (0: every edge ablated; with corrupted
ablation at levels `"heads+mlps"` and `"layers"` that is the corrupted run).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.checks import check_choice, is_int
from phi3lab.circuits.circuit import Circuit, EdgeScores
from phi3lab.circuits.graph import Graph
from phi3lab.circuits.inputs import prepare
from phi3lab.errors import bad_argument
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import forward_fn
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.metrics import Metric, finite_metric

ABLATIONS = ("corrupted", "mean")


def _see(x, ctx):
    """Hook on a sender site: changes nothing; a hooked site's value is
    what later hooks read in `ctx.seen`."""
    return None


def _patch(x, ctx):
    """Hook on a receiver site: add each ablated edge's replacement minus
    its sender's current output (`ctx.static`: the reaching sender groups
    `(site, per_head)` and whether this site has a head axis; `ctx.data`:
    the groups' replacements and the ablation mask `[senders, receivers
    here, T or 1]`, 1 where an edge is ablated)."""
    groups, heads = ctx.static
    replacements, ablate = ctx.data
    ablate = ablate.astype(x.dtype)
    # A mask of one position applies at every position: plain matmuls instead
    # of one small matmul per position.
    per_head, single = ("btnd,nct->btcd", "btd,ct->btcd") if ablate.shape[2] > 1 else ("btnd,nc->btcd", "btd,c->btcd")
    ablate = ablate if ablate.shape[2] > 1 else ablate[:, :, 0]
    delta, row = 0.0, 0
    for (site, has_heads), replacement in zip(groups, replacements):
        diff = replacement.astype(x.dtype) - ctx.seen[site]
        count = diff.shape[2] if has_heads else 1
        rows = ablate[row : row + count]
        delta = delta + (jnp.einsum(per_head, diff, rows) if has_heads else jnp.einsum(single, diff, rows[0]))
        row += count
    return x + (delta if heads else delta[:, :, 0])


def patching_fn(model, graph: Graph, metric: Metric, bucket: pipeline.Bucket):
    """`(key, program)`: the pure `program(params, ids, mask, replacements,
    ablate, metric_data) -> metric [B]`, a forward of `ids` (padded to
    `bucket`) with the edges where `ablate [S, R, T or 1]` is 1 carrying
    `replacements` (one array per sender group), and the key it is cached
    under (model, level, metric and the bucket's statics)."""
    static = lambda site: (tuple((g.site, g.per_head) for g in graph.groups[: site.groups]), site.heads)
    hooks = Hooks(
        [(group.site, Hook(_see)) for group in graph.groups]
        + [(site.site, Hook(_patch, static=static(site))) for site in graph.sites]
    )
    forward = forward_fn(model, hooks=hooks)
    length = metric.length(bucket)

    def program(params, ids, mask, replacements, ablate, metric_data):
        data = [None] * len(graph.groups) + [
            (tuple(replacements[: site.groups]), ablate[: site.senders][:, list(site.receivers)])
            for site in graph.sites
        ]
        hidden, _ = forward.run(params, ids, mask, tuple(data), num_positions=bucket.num_positions)
        unembed = lambda h: model.unembed(params, h)
        return metric.rows(hidden, unembed, metric_data, {"token_ids": ids, "padding_mask": mask}, length)

    return ("circuits.edge_patching", graph.key, metric.key, bucket.num_positions, length), program


PATCHING_ADVICE = "Use fewer or shorter prompts, a coarser graph level, or load the model in bfloat16."


class EdgePatcher:
    """Prepared edge-patching runs of one set of prompts: `patcher(keep)` is
    the mean metric with every edge outside `keep` ablated.

    The prompts run padded to their length bucket through the run pipeline
    (`phi3lab.tracing.pipeline`): each program is compiled ahead of time and
    its memory estimate checked against `memory_budget` before it runs.

    Args:
        model, graph: the model and its `Graph`.
        clean, corrupted, mask, metric: checked inputs (`inputs.prepare`).
        ablation: `"corrupted"` or `"mean"`.
        memory_budget: None or bytes each program may use.
    """

    def __init__(
        self,
        model,
        graph: Graph,
        clean,
        corrupted,
        mask,
        metric: Metric,
        ablation: str,
        memory_budget: int | None = None,
    ):
        check_choice("ablation", ablation, ABLATIONS)
        self.model, self.graph, self.metric, self.length = model, graph, metric, clean.shape[1]
        self.bucket, self.memory_budget = pipeline.bucket(model, self.length), memory_budget
        self.key, self.run = patching_fn(model, graph, metric, self.bucket)
        self.programs = {}
        self.params, self.ids = model.params(), jnp.asarray(self.bucket.pad(clean))
        self.mask = jnp.asarray(self.bucket.pad(mask))
        source = corrupted if ablation == "corrupted" else clean
        senders = graph.sender_forward(model)
        run = lambda params, ids, mask: senders.run(params, ids, mask, num_positions=self.bucket.num_positions)[1]
        args = (self.params, jnp.asarray(self.bucket.pad(source)), self.mask)
        key = ("circuits.senders", graph.key, self.bucket.num_positions)
        captures = pipeline.compiled(model, key, run, args, memory_budget, "This edge patching", PATCHING_ADVICE)(*args)
        replacements = [captures[group.site] for group in graph.groups]
        if ablation == "mean":
            replacements = [_row_mean(value, self.mask) for value in replacements]
        self.replacements = tuple(replacements)

    def __call__(self, keep: np.ndarray) -> float:
        """The mean metric with the edges outside bool `keep` ablated: `[S,
        R, T]` per position (T the real length), or `[S, R, 1]` the same at
        every position (a second compiled program, of plain matmuls: 1.6x a
        plain forward against 2.9x per position, 6 layers of width 384 at
        T=64 on CPU)."""
        ablate = ~keep if keep.shape[2] == 1 else self.bucket.pad(~keep, (2,))
        args = (self.params, self.ids, self.mask, self.replacements, jnp.asarray(ablate, jnp.float32), self.metric.data)
        if ablate.shape not in self.programs:  # compiled and guarded once per mask shape
            self.programs[ablate.shape] = pipeline.compiled(
                self.model, self.key, self.run, args, self.memory_budget, "This edge patching", PATCHING_ADVICE
            )
        return float(np.mean(finite_metric(self.programs[ablate.shape](*args), "the patched run")))

    def keep_all(self) -> np.ndarray:
        """bool `[S, R, 1]`: every edge of the graph kept, at every position."""
        return self.graph.allowed[:, :, None].copy()

    def bounds(self) -> tuple[float, float]:
        """`(full graph, empty circuit)` metrics: faithfulness 1 and 0."""
        return self(self.keep_all()), self(np.zeros_like(self.keep_all()))


def _row_mean(value, mask):
    """`value [B, T, ...]` replaced in every row by its mean over the rows
    where each position is real."""
    weights = jnp.asarray(mask, value.dtype).reshape(mask.shape + (1,) * (value.ndim - 2))
    mean = jnp.sum(value * weights, axis=0) / jnp.maximum(jnp.sum(weights, axis=0), 1)
    return jnp.broadcast_to(mean, value.shape)


def _normalized(value: float, full: float, empty: float) -> float:
    return (value - empty) / (full - empty) if full != empty else float("nan")


def _patcher(
    model, graph, clean, corrupted, metric, answer, counterfactual, ablation, padding_mask, memory_budget
) -> EdgePatcher:
    pipeline.check_budget(memory_budget)
    clean_ids, corrupted_ids, mask, resolved = prepare(
        model, clean, corrupted, padding_mask, metric, answer, counterfactual
    )
    return EdgePatcher(model, graph, clean_ids, corrupted_ids, mask, resolved, ablation, memory_budget)


def _check_circuit(circuit) -> Circuit:
    if not isinstance(circuit, Circuit):
        raise bad_argument("circuit", circuit, "a phi3lab.circuits.Circuit (e.g. scores.top(n))")
    return circuit


def faithfulness(
    model,
    circuit: Circuit,
    clean,
    corrupted,
    metric=None,
    *,
    answer=None,
    counterfactual=None,
    ablation: str = "corrupted",
    padding_mask=None,
    memory_budget: int | None = None,
) -> float:
    """The fraction of the clean metric a circuit keeps with every other edge ablated.

    Args:
        model: a `Phi3Backbone`.
        circuit: a `Circuit` (`scores.top(n)`, `scores.threshold(x)`, ...).
        clean, corrupted: token ids `[B, T]` of one shape.
        metric, answer, counterfactual: the metric, as in `edge_attribution`.
        ablation: `"corrupted"` (edges outside the circuit carry their
            senders' outputs on `corrupted`) or `"mean"` (the senders' mean
            output over the clean prompts).
        padding_mask: `[B, T]` mask shared by both inputs.
        memory_budget: bytes each compiled program may use (default the
            device's free memory); refused before running when over it
            (`CaptureTooLarge`, with the estimate). The prompts run padded
            to their length bucket (`phi3lab.tracing.pipeline`).

    Returns:
        `(m - m_empty) / (m_full - m_empty)`: 1 for the full graph, 0 for
        the empty circuit (the corrupted run's metric under corrupted
        ablation at levels `"heads+mlps"` and `"layers"`).

    Example:
    ```python
    scores = phi3lab.circuits.edge_attribution(model, clean, corrupted, answer=a, counterfactual=c)
    phi3lab.circuits.faithfulness(model, scores.top(30), clean, corrupted, answer=a, counterfactual=c)
    ```
    """
    circuit = _check_circuit(circuit)
    patcher = _patcher(
        model, circuit.graph, clean, corrupted, metric, answer, counterfactual, ablation, padding_mask, memory_budget
    )
    return _normalized(patcher(circuit.keep_mask(patcher.length)), *patcher.bounds())


class FaithfulnessCurve(pd.DataFrame):
    """A DataFrame `edges, fraction, metric, faithfulness` (one row per
    circuit size) with a `figure()`."""

    @property
    def _constructor(self):
        return FaithfulnessCurve

    def figure(self):
        """A plotly figure of faithfulness against the number of edges."""
        import plotly.graph_objects as go

        figure = go.Figure(go.Scatter(x=self["edges"], y=self["faithfulness"], mode="lines+markers"))
        figure.update_layout(xaxis_title="edges kept (largest |score| first)", yaxis_title="faithfulness")
        return figure


def faithfulness_curve(
    model,
    scores: EdgeScores,
    clean,
    corrupted,
    metric=None,
    *,
    answer=None,
    counterfactual=None,
    sizes: Sequence[int] | None = None,
    ablation: str = "corrupted",
    padding_mask=None,
    memory_budget: int | None = None,
) -> FaithfulnessCurve:
    """Faithfulness of the top-`n` circuits of `scores` for each `n` in `sizes`.

    Args:
        model, clean, corrupted, metric, answer, counterfactual, ablation,
            padding_mask, memory_budget: as in `faithfulness`.
        scores: `EdgeScores` (their top `n` edges by `|score|` form each circuit).
        sizes: edge counts; by default 0, 1%, 2%, 5%, 10%, 20%, 50% and
            100% of the edges.

    Returns:
        A `FaithfulnessCurve` (a DataFrame; `.figure()` plots it). Every
        circuit runs through one compiled program (the edge mask is its data).

    Example:
    ```python
    curve = phi3lab.circuits.faithfulness_curve(model, scores, clean, corrupted, answer=a, counterfactual=c)
    curve.figure().show()
    ```
    """
    if not isinstance(scores, EdgeScores):
        raise bad_argument("scores", scores, "phi3lab.circuits.EdgeScores (from edge_attribution)")
    total = len(scores)
    if sizes is None:
        sizes = sorted({round(total * f) for f in (0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    if not all(is_int(n) and 0 <= n <= total for n in sizes):
        raise bad_argument("sizes", sizes, f"edge counts between 0 and {total}")
    patcher = _patcher(
        model, scores.graph, clean, corrupted, metric, answer, counterfactual, ablation, padding_mask, memory_budget
    )
    full, empty = patcher.bounds()
    rows = []
    for n in sizes:
        value = patcher(scores.top(int(n)).keep_mask(patcher.length))
        rows.append(
            {"edges": int(n), "fraction": n / total, "metric": value, "faithfulness": _normalized(value, full, empty)}
        )
    return FaithfulnessCurve(rows)


def prune(
    model,
    circuit: Circuit,
    clean,
    corrupted,
    metric=None,
    *,
    answer=None,
    counterfactual=None,
    tolerance: float = 0.02,
    ablation: str = "corrupted",
    padding_mask=None,
    memory_budget: int | None = None,
) -> Circuit:
    """Greedy edge pruning (ACDC, Conmy et al. 2023), by exact edge patching.

    Receivers are visited from the logits back to the first layer; each
    edge into a receiver is removed when the circuit without it keeps
    faithfulness at least `start - tolerance`, `start` the given circuit's.
    Every try is one run of the compiled edge-patching program, so the
    result checks a gradient ranking exactly (an edge it keeps matters when
    patched, whatever its score).

    Args:
        model, clean, corrupted, metric, answer, counterfactual, ablation,
            padding_mask, memory_budget: as in `faithfulness`.
        circuit: the `Circuit` to prune (e.g. `scores.top(n)`, or
            `Circuit(graph, graph.edges)` for the whole graph).
        tolerance: float >= 0, the faithfulness the pruned circuit may lose.

    Returns:
        The pruned `Circuit` (its faithfulness is `>= start - tolerance`).

    Example:
    ```python
    small = phi3lab.circuits.prune(model, scores.top(60), clean, corrupted, answer=a, counterfactual=c)
    ```
    """
    circuit = _check_circuit(circuit)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise bad_argument("tolerance", tolerance, "a number >= 0 (faithfulness the pruned circuit may lose)")
    patcher = _patcher(
        model, circuit.graph, clean, corrupted, metric, answer, counterfactual, ablation, padding_mask, memory_budget
    )
    full, empty = patcher.bounds()
    keep = circuit.keep_mask(patcher.length)
    floor = _normalized(patcher(keep), full, empty) - tolerance
    edges = circuit.edges
    receiver_order = {node: i for i, node in enumerate(circuit.graph.receivers)}
    order = sorted(range(len(edges)), key=lambda i: -receiver_order[edges["receiver"].iloc[i]])
    kept = np.ones(len(edges), bool)
    for i in order:
        row = edges.iloc[i]
        sender, receiver = circuit.sender_index[i], circuit.receiver_index[i]
        where = (sender, receiver, int(row["position"])) if "position" in edges else (sender, receiver)
        trial = keep.copy()
        trial[where] = False
        if _normalized(patcher(trial), full, empty) >= floor:
            keep, kept[i] = trial, False
    return Circuit(circuit.graph, edges[kept])
