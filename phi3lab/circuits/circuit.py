"""Edge tables: `EdgeScores` (every edge scored) and `Circuit` (a set of edges).

Both expose the graph display protocol (`.nodes`, `.edges`; see
`phi3lab.widgets.CircuitView`): `edges` has `sender, receiver, score` (and
`position` for per-position scores), `nodes` the graph's node rows with a
node's `score` the sum of the scores of the edges it sends (of the edges it
receives, for a node that sends none: the logits, a head's q/k/v input).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from phi3lab.checks import is_int
from phi3lab.circuits.graph import Graph
from phi3lab.errors import bad_argument


def _scored_nodes(graph: Graph, edges: pd.DataFrame, only_touched: bool) -> pd.DataFrame:
    """The graph's node table with each node's score from `edges` (module
    docstring); only the nodes `edges` touch with `only_touched`."""
    nodes = graph.nodes
    sent = edges.groupby("sender")["score"].sum()
    received = edges.groupby("receiver")["score"].sum()
    nodes["score"] = [sent.get(node, received.get(node, np.nan)) for node in nodes["node"]]
    if only_touched:
        touched = set(edges["sender"]) | set(edges["receiver"])
        nodes = nodes[nodes["node"].isin(touched)].reset_index(drop=True)
    return nodes


class Circuit:
    """A set of edges of a `Graph`: what `faithfulness` keeps, all else ablated.

    Args:
        graph: the `Graph` the edges belong to.
        edges: a DataFrame with `sender` and `receiver` columns (node ids),
            optionally `score` and `position` (an edge kept at one position
            only; without the column, at every position), or `(sender,
            receiver)` pairs.

    Attributes:
        graph, edges: as given (`edges` with a `score` column, NaN if none).
        sender_index, receiver_index: int `[E]`, each edge's sender and
            receiver as indices into `graph.senders` / `graph.receivers`.

    Example:
    >>> graph = phi3lab.circuits.Graph(model, "heads+mlps")
    >>> circuit = phi3lab.circuits.Circuit(graph, [("embed", "a0.h1.q"), ("a0.h1", "logits")])
    >>> len(circuit), circuit.nodes.node.tolist()
    (2, ['embed', 'a0.h1.q', 'a0.h1', 'logits'])
    """

    def __init__(self, graph: Graph, edges):
        self.graph = graph
        if not isinstance(edges, pd.DataFrame):
            edges = pd.DataFrame(list(edges), columns=["sender", "receiver"])
        if not {"sender", "receiver"} <= set(edges.columns):
            raise bad_argument("edges", f"columns {list(edges.columns)}", "a DataFrame with `sender` and `receiver`")
        edges = edges.reset_index(drop=True).copy()
        if "score" not in edges:
            edges["score"] = np.nan
        self.sender_index = self._indices(edges["sender"], graph.senders, "sender")
        self.receiver_index = self._indices(edges["receiver"], graph.receivers, "receiver")
        backwards = ~graph.allowed[self.sender_index, self.receiver_index]
        if backwards.any():
            row = edges[backwards].iloc[0]
            raise bad_argument(
                "edges",
                f"the edge {row.sender!r} -> {row.receiver!r}",
                "edges from a sender to a later receiver: a receiver reads only the senders before it (a "
                "layer's heads reach that layer's MLP, not its own heads)",
            )
        self.edges = edges

    @staticmethod
    def _indices(ids: pd.Series, nodes: list[str], what: str) -> np.ndarray:
        index = {node: i for i, node in enumerate(nodes)}
        unknown = [node for node in ids if node not in index]
        if unknown:
            raise bad_argument("edges", f"the {what} {unknown[0]!r}", f"a {what} of the graph ({nodes[:4]}...)")
        return np.array([index[node] for node in ids], np.int64)

    @property
    def nodes(self) -> pd.DataFrame:
        """The nodes the circuit's edges touch (display protocol)."""
        return _scored_nodes(self.graph, self.edges, only_touched=True)

    def keep_mask(self, length: int) -> np.ndarray:
        """bool `[S, R, length]`, True where an edge is kept at a position;
        `[S, R, 1]` (kept at every position) for a circuit without a
        `position` column, which edge patching runs as plain matmuls."""
        positions = length if "position" in self.edges else 1
        keep = np.zeros((len(self.graph.senders), len(self.graph.receivers), positions), bool)
        if "position" in self.edges:
            positions = self.edges["position"].to_numpy(np.int64)
            if len(positions) and positions.max() >= length:
                raise bad_argument("circuit", f"an edge at position {positions.max()}", f"positions < {length}")
            keep[self.sender_index, self.receiver_index, positions] = True
        else:
            keep[self.sender_index, self.receiver_index, 0] = True
        return keep

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        return f"<Circuit level={self.graph.level!r} edges={len(self)} of {len(self.graph)}>"


class EdgeScores:
    """Every edge of a `Graph` with its attribution score (`edge_attribution`).

    Attributes:
        graph: the `Graph`.
        edges: DataFrame `sender, receiver, score` (and `position` for
            per-position scores), one row per edge in the graph's order;
            sort and filter it as any DataFrame.
        nodes: the node table, each node scored (module docstring).
        clean_metric, corrupted_metric: the mean metric of each run.
        method, steps: how the scores were computed.

    Example:
    >>> scores.edges.sort_values("score").head(3)
    >>> scores.top(40)            # a Circuit of the 40 edges of largest |score|
    >>> scores.threshold(0.05)    # a Circuit of the edges with |score| >= 0.05
    """

    def __init__(self, graph: Graph, scores: np.ndarray, *, clean_metric, corrupted_metric, method, steps):
        self.graph = graph
        self.clean_metric = clean_metric
        self.corrupted_metric = corrupted_metric
        self.method = method
        self.steps = steps
        senders, receivers = np.nonzero(graph.allowed)
        columns = {
            "sender": np.array(graph.senders, object)[senders],
            "receiver": np.array(graph.receivers, object)[receivers],
        }
        if scores.ndim == 2:
            self.edges = pd.DataFrame({**columns, "score": scores[senders, receivers]})
        else:
            length = scores.shape[2]
            self.edges = pd.DataFrame(
                {
                    **{name: np.repeat(values, length) for name, values in columns.items()},
                    "position": np.tile(np.arange(length), len(senders)),
                    "score": scores[senders, receivers].reshape(-1),
                }
            )

    @property
    def nodes(self) -> pd.DataFrame:
        """Every node of the graph, scored (display protocol)."""
        return _scored_nodes(self.graph, self.edges, only_touched=False)

    def ranked(self) -> pd.DataFrame:
        """The edges by decreasing `|score|` (ties in graph order)."""
        order = np.argsort(-np.abs(self.edges["score"].to_numpy()), kind="stable")
        return self.edges.iloc[order]

    def top(self, n: int) -> Circuit:
        """A `Circuit` of the `n` edges of largest `|score|`."""
        if not is_int(n) or n < 0:
            raise bad_argument("n", n, f"an int >= 0 (edges to keep, of {len(self)})")
        return Circuit(self.graph, self.ranked().head(n))

    def threshold(self, value: float) -> Circuit:
        """A `Circuit` of the edges with `|score| >= value`."""
        return Circuit(self.graph, self.edges[np.abs(self.edges["score"]) >= float(value)])

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        return (
            f"<EdgeScores level={self.graph.level!r} method={self.method!r} edges={len(self)} "
            f"clean={self.clean_metric:.4g} corrupted={self.corrupted_metric:.4g}>"
        )
