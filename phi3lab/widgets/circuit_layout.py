"""The graph display protocol read and laid out: where `CircuitView` draws
each node, and its edges ranked by |score|.

An object in the protocol (`docs/design.md`, "Widgets") has `nodes` (a
DataFrame with `node, kind, layer, position, label, score`, extra columns
allowed) and `edges` (`sender, receiver, score`). Layers go up the y axis
(the embedding and tokens at -1, the logits at the top); the receivers of a
head (`head_q`, `head_k`, `head_v`) sit just below their layer's row, under
their head, and a layer's MLP just above it (it reads its own layer's
heads, so their edges into it are not drawn along the row). Per-position
graphs (any `position >= 0`) put positions along x, the nodes of one (layer,
position) spread inside its column; other graphs centre each layer's nodes in
one row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from phi3lab.errors import bad_argument

NODE_COLUMNS = ("node", "kind", "layer", "position", "label", "score")
EDGE_COLUMNS = ("sender", "receiver", "score")
RECEIVER_KINDS = ("head_q", "head_k", "head_v")
KIND_ORDER = ("token", "embed", "feature", "error", "head", *RECEIVER_KINDS, "mlp", "logits")
RECEIVER_DROP = 0.32  # how far below its layer's row a head's q/k/v receivers sit
MLP_RISE = 0.4  # how far above its layer's row an MLP sits
_PROTOCOL = (
    "an object with `nodes` (a pandas DataFrame with columns node, kind, layer, position, label, score) and "
    "`edges` (sender, receiver, score), the graph display protocol (EdgeScores, Circuit, AttributionGraph)"
)


@dataclasses.dataclass(frozen=True)
class GraphLayout:
    """A protocol object's tables, where each node is drawn, and its edges ranked.

    Attributes:
        nodes: the node table (index 0..N-1).
        edges: the edge table (index 0..E-1).
        x, y: `[N]` node coordinates.
        sender, receiver: `[E]` node indices of each edge.
        order: `[E]` edge indices by |score|, largest first (NaN scores last).
        per_position: True when positions run along x.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    x: np.ndarray
    y: np.ndarray
    sender: np.ndarray
    receiver: np.ndarray
    order: np.ndarray
    per_position: bool

    def top(self, count: int) -> np.ndarray:
        """The indices of the `count` edges of largest |score|."""
        return self.order[:count]


def graph_tables(obj) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`obj.nodes` and `obj.edges`, checked against the protocol."""
    try:
        nodes, edges = obj.nodes, obj.edges
    except AttributeError:
        raise bad_argument("obj", obj, _PROTOCOL) from None
    for name, table, columns in (("nodes", nodes, NODE_COLUMNS), ("edges", edges, EDGE_COLUMNS)):
        if not isinstance(table, pd.DataFrame):
            raise bad_argument(f"obj.{name}", type(table).__name__, f"a pandas DataFrame: {_PROTOCOL}")
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise bad_argument(f"obj.{name}", f"a table without columns {missing}", f"a table with columns {columns}")
    if nodes.empty:
        raise bad_argument("obj.nodes", "an empty table", "at least one node")
    if nodes["node"].duplicated().any():
        twice = nodes["node"][nodes["node"].duplicated()].tolist()[:5]
        raise bad_argument("obj.nodes", f"a table repeating node ids {twice}", "unique node ids")
    known = pd.Index(nodes["node"])
    for end in ("sender", "receiver"):
        unknown = ~edges[end].isin(known)
        if unknown.any():
            raise bad_argument(
                f"obj.edges.{end}", edges[end][unknown].tolist()[:5], "node ids that appear in obj.nodes['node']"
            )
    return nodes.reset_index(drop=True), edges.reset_index(drop=True)


def _head_columns(nodes: pd.DataFrame) -> np.ndarray:
    """Each node's column among its layer's heads (-1: not a head's): the
    `head` column, with grouped-query key/value receivers (`head` = the
    key/value head) moved to the middle of the query heads they serve."""
    if "head" not in nodes:
        return np.full(len(nodes), -1.0)
    head = nodes["head"].fillna(-1).to_numpy(np.float64)
    shared = nodes["kind"].isin(("head_k", "head_v")).to_numpy()
    queries = head[nodes["kind"].isin(("head", "head_q")).to_numpy()]
    if shared.any() and len(queries) and queries.max() > head[shared].max():
        group = (queries.max() + 1) / (head[shared].max() + 1)
        head = np.where(shared & (head >= 0), head * group + (group - 1) / 2, head)
    return head


def layout(obj) -> GraphLayout:
    """Where each node of `obj` is drawn and its edges ranked by |score|."""
    nodes, edges = graph_tables(obj)
    layer = nodes["layer"].to_numpy(np.float64)
    position = nodes["position"].to_numpy(np.float64)
    receiver_row = nodes["kind"].isin(RECEIVER_KINDS).to_numpy()
    y = layer - RECEIVER_DROP * receiver_row + MLP_RISE * (nodes["kind"] == "mlp").to_numpy()
    per_position = bool((position >= 0).any())
    head = _head_columns(nodes)
    kind_rank = nodes["kind"].map({k: i for i, k in enumerate(KIND_ORDER)}).fillna(len(KIND_ORDER)).to_numpy()
    # A slot is a column of one layer: a head and its receivers share one; every other node has its own.
    slot = np.where(head >= 0, -1.0, np.arange(len(nodes)))
    column = position if per_position else np.zeros(len(nodes))
    x = np.zeros(len(nodes))
    frame = pd.DataFrame({"layer": layer, "column": column, "head": head, "slot": slot, "rank": kind_rank})
    frame["name"] = nodes["node"].astype(str)
    for _, group in frame.groupby(["layer", "column"], sort=False):
        slots = group.sort_values(["head", "rank", "name"]).drop_duplicates(["head", "slot"])
        keys = list(zip(slots["head"], slots["slot"]))
        index = {key: i for i, key in enumerate(keys)}
        spread = (np.arange(len(keys)) - (len(keys) - 1) / 2) * (
            min(0.8 / max(len(keys), 1), 0.25) if per_position else 1.0
        )
        for row in group.itertuples():
            x[row.Index] = row.column + spread[index[(row.head, row.slot)]]
    # A head's q, k and v receivers spread a little around their head's column.
    offsets = nodes["kind"].map({"head_q": -1.0, "head_k": 0.0, "head_v": 1.0}).fillna(0.0).to_numpy()
    x += offsets * (0.25 if not per_position else 0.02)
    ids = pd.Index(nodes["node"])
    scores = np.abs(edges["score"].to_numpy(np.float64))
    order = np.argsort(np.where(np.isnan(scores), -1.0, -scores), kind="stable")
    return GraphLayout(
        nodes=nodes,
        edges=edges,
        x=x,
        y=y,
        sender=ids.get_indexer(edges["sender"]),
        receiver=ids.get_indexer(edges["receiver"]),
        order=order,
        per_position=per_position,
    )
