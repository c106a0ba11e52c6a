"""Influence on the logit, and pruning by it (Ameisen et al. 2025, "Circuit
tracing", the graph-pruning appendix).

The adjacency matrix `A [n, n]` holds direct effects, receivers in rows and
senders in columns. Its *normalised* form `Â` takes absolute values and
scales each row to sum to 1 (each receiver splits its unit of input among its
senders). The influence of the nodes on the logit is then the logit's row of
`Â + Â² + Â³ + ...` (`(I - Â)^-1 - I`; the graph has no cycles, so the
series ends), weighted by `logit_weights` (1 on the target logit).
"""

from __future__ import annotations

import numpy as np

from phi3lab.errors import bad_argument


def normalized(adjacency: np.ndarray) -> np.ndarray:
    """`|A|` with each row scaled to sum to 1 (rows of zeros stay zero)."""
    magnitude = np.abs(np.asarray(adjacency, np.float64))
    return magnitude / np.maximum(magnitude.sum(axis=1, keepdims=True), 1e-10)


def influence(matrix: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`weights @ (M + M² + ...)` of a nilpotent `matrix` (an acyclic graph's
    normalised adjacency): every node's total influence on the weighted rows."""
    step = np.asarray(weights, np.float64) @ matrix
    total = step.copy()
    for _ in range(len(matrix)):
        if not step.any():
            return total
        step = step @ matrix
        total += step
    raise ValueError("the adjacency matrix has a cycle: influence does not converge")


def node_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each node's influence on the logit through the normalised graph `[n]`."""
    return influence(normalized(adjacency), weights)


def edge_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each edge's share of the influence `[n, n]`: its normalised weight
    times its receiver's influence (the logit's own weight included)."""
    matrix = normalized(adjacency)
    return matrix * (influence(matrix, weights) + weights)[:, None]


def graph_scores(adjacency: np.ndarray, weights: np.ndarray, errors: np.ndarray, tokens: np.ndarray) -> dict:
    """How much of the graph runs through interpretable nodes (the paper's
    two scores, as circuit-tracer defines them).

    `replacement`: of the influence the tokens and error nodes have on the
    logit, the tokens' share (1 when no path needs an error node).
    `completeness`: each node's share of incoming normalised weight that
    does not come from error nodes, averaged with weights `influence +
    weights` (partial credit for mostly explained nodes).
    `errors` and `tokens` are boolean node masks.
    """
    matrix = normalized(adjacency)
    scores = influence(matrix, weights)
    token, error = scores[tokens].sum(), scores[errors].sum()
    reach = scores + weights
    explained = 1.0 - matrix[:, errors].sum(axis=1)
    return {"replacement": float(token / (token + error)), "completeness": float(explained @ reach / reach.sum())}


def threshold_for(scores: np.ndarray, fraction: float) -> float:
    """The smallest score among the top scores that together carry
    `fraction` of their total (every score at least this one is kept)."""
    ordered = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    total = ordered.sum()
    if total <= 0:
        return 0.0
    index = int(np.searchsorted(np.cumsum(ordered) / total, fraction))
    return float(ordered[min(index, len(ordered) - 1)])


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise bad_argument(name, value, "a fraction of the influence in [0, 1]")
    return float(value)


def prune_masks(
    adjacency: np.ndarray,
    weights: np.ndarray,
    always: np.ndarray,
    needs_input: np.ndarray,
    node_threshold,
    edge_threshold,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which nodes and edges carry the asked fractions of the influence.

    Nodes are kept when their influence is among the top carrying
    `node_threshold` of it (plus every node marked `always`: the tokens and
    the logit). Edges between kept nodes are kept when their edge influence is
    among the top carrying `edge_threshold` of it. Then, until nothing
    changes, a node that is not `always` kept loses its place when no kept
    edge leaves it, and a node that `needs_input` (a feature) when none
    reaches it; their edges go with them.

    Returns:
        `(node_mask [n], edge_mask [n, n], influence [n])`.
    """
    node_threshold = check_fraction("node_threshold", node_threshold)
    edge_threshold = check_fraction("edge_threshold", edge_threshold)
    scores = node_influence(adjacency, weights)
    nodes = (scores >= threshold_for(scores, node_threshold)) | always
    kept = np.where(nodes[:, None] & nodes[None, :], adjacency, 0.0)
    edge_scores = edge_influence(kept, weights)
    edges = edge_scores >= threshold_for(edge_scores, edge_threshold)
    while True:
        edges &= nodes[:, None] & nodes[None, :]
        keep = nodes & (always | edges.any(axis=0)) & (~needs_input | edges.any(axis=1))
        if (keep == nodes).all():
            return nodes, edges, scores
        nodes = keep
