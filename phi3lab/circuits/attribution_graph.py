"""Feature attribution graphs: `attribution_graph()` -> `AttributionGraph`.

For one prompt and one output logit, the graph of direct effects in the
replacement model (`phi3lab.circuits.replacement`): nodes are the active
transcoder features (per layer, position and feature), the token embeddings
(per position), the error terms (per layer and position) and the target logit;
an edge is the direct effect of its sender on its receiver, so each receiver's
value is exactly the sum of its incoming edges plus its bias. Pruned by
influence on the logit (`phi3lab.circuits.influence`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd

from phi3lab.checks import check_index, check_positive_int, check_token_ids
from phi3lab.circuits import influence as graph_influence
from phi3lab.circuits.direct_effects import DirectEffects
from phi3lab.circuits.replacement import READS, WRITES, replacement_parts, resolve_transcoders
from phi3lab.errors import bad_argument
from phi3lab.tracing import pipeline, trace
from phi3lab.tracing.names import block_name

NODE_COLUMNS = [
    "node",
    "kind",
    "layer",
    "position",
    "label",
    "score",
    "feature",
    "dictionary",
    "activation",
    "token_id",
]


@dataclasses.dataclass(frozen=True, eq=False)
class AttributionGraph:
    """An attribution graph: nodes, the adjacency matrix of direct effects and
    what it was computed from.

    Nodes come in circuit-tracer's order: features, then error nodes (layer
    by layer, position by position), then tokens, then the logit.

    Attributes:
        node_table: one row per node, the display protocol's columns
            (`node`, `kind` in "feature" / "error" / "token" / "logits",
            `layer`, `position`, `label`, `score` = influence on the logit)
            plus `feature`, `dictionary`, `activation` (a feature's
            activation; a token's or error's NaN; the logit's value) and
            `token_id`.
        adjacency: float `[n, n]`, receivers in rows, senders in columns.
        bias: float `[n]`: each receiver's value not carried by an edge of
            this graph (its encoder bias, the transcoders' decoder biases
            reaching it and, once pruned, its dropped edges), so
            `values() = adjacency.sum(1) + bias` is each feature's
            pre-activation and the logit.
        tokens: the prompt's token strings.
        token_ids: int `[T]`.
        target: `(token,)` or `(token, counterfactual)`: the logit (or
            logit difference) at `position` that the graph explains.
        position: the position of that logit.
        dictionaries: the transcoders' names, one per layer (the node
            table's `dictionary` column).
        prompt: the prompt's text ("" when unknown).
        transcoders: the transcoders themselves, one per layer (empty for a
            graph read from JSON, which names them only).
    """

    node_table: pd.DataFrame
    adjacency: np.ndarray
    bias: np.ndarray
    tokens: list
    token_ids: np.ndarray
    target: tuple
    position: int
    dictionaries: list
    prompt: str = ""
    transcoders: tuple = ()

    @property
    def nodes(self) -> pd.DataFrame:
        """The nodes (display protocol): a copy of `node_table`."""
        return self.node_table.copy()

    @property
    def edges(self) -> pd.DataFrame:
        """One row per non-zero direct effect: `sender`, `receiver`, `score`
        (signed, in the receiver's units), largest magnitude first."""
        receivers, senders = np.nonzero(self.adjacency)
        ids = self.node_table["node"].to_numpy()
        table = pd.DataFrame(
            {"sender": ids[senders], "receiver": ids[receivers], "score": self.adjacency[receivers, senders]}
        )
        return table.iloc[np.argsort(-np.abs(table["score"].to_numpy()), kind="stable")].reset_index(drop=True)

    @property
    def feature_dictionaries(self) -> dict:
        """The transcoders by name (`{"transcoder_0": ..., ...}`), matching
        the feature nodes' `dictionary` column; what `CircuitView` opens a
        feature's `FeatureView` with. Empty for a graph read from JSON."""
        return dict(zip(self.dictionaries, self.transcoders))

    def values(self) -> np.ndarray:
        """Each receiver's value as the graph sums it: incoming edges plus bias."""
        return self.adjacency.sum(axis=1, dtype=np.float64) + self.bias

    def logit_weights(self) -> np.ndarray:
        """1 on the logit node, 0 elsewhere: where influence is measured."""
        return (self.node_table["kind"] == "logits").to_numpy(np.float64)

    def influence(self) -> np.ndarray:
        """Each node's influence on the logit through the normalised graph."""
        return graph_influence.node_influence(self.adjacency, self.logit_weights())

    def scores(self) -> dict:
        """`{"replacement", "completeness"}`: the share of the tokens'
        influence on the logit that avoids error nodes, and the
        influence-weighted share of each node's input not from error nodes
        (`phi3lab.circuits.influence.graph_scores`; 1.0 means the
        transcoders explain everything)."""
        kinds = self.node_table["kind"].to_numpy()
        return graph_influence.graph_scores(self.adjacency, self.logit_weights(), kinds == "error", kinds == "token")

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "AttributionGraph":
        """The subgraph carrying the asked fractions of the influence.

        Keeps the nodes whose influence is among the top carrying
        `node_threshold` of the total (always the tokens and the logit), then
        the edges among them carrying `edge_threshold` of the edge influence,
        then drops, until none is left, error and feature nodes with no kept
        outgoing edge and features with no kept incoming edge
        (`phi3lab.circuits.influence.prune_masks`). Scores stay the influence
        measured on the graph pruned.

        Example:
        ```python
        small = graph.prune(node_threshold=0.8, edge_threshold=0.98)
        ```
        """
        kinds = self.node_table["kind"].to_numpy()
        always = np.isin(kinds, ("token", "logits"))
        nodes, edges, _ = graph_influence.prune_masks(
            self.adjacency, self.logit_weights(), always, kinds == "feature", node_threshold, edge_threshold
        )
        kept = np.flatnonzero(nodes)
        adjacency = np.where(edges, self.adjacency, 0.0)[np.ix_(kept, kept)].astype(np.float32)
        dropped = np.where(edges, 0.0, self.adjacency).sum(axis=1)[kept]
        table = self.node_table.iloc[kept].reset_index(drop=True)
        return dataclasses.replace(self, node_table=table, adjacency=adjacency, bias=self.bias[kept] + dropped)

    def to_json(self, slug: str = "phi3lab-graph", scan: str | None = None) -> dict:
        """The graph in the JSON of circuit-tracer's / Neuronpedia's graph
        viewer (schema version 1; `phi3lab.circuits.graph_json`)."""
        from phi3lab.circuits.graph_json import to_json

        return to_json(self, slug, scan)

    def save(self, path, slug: str | None = None, scan: str | None = None) -> None:
        """Write `to_json` to `path` (a `.json` file)."""
        from phi3lab.circuits.graph_json import save

        save(self, path, slug, scan)

    @classmethod
    def from_json(cls, data: dict | Any) -> "AttributionGraph":
        """Read a graph written by `to_json` / `save` (or circuit-tracer): a
        dict, or a path to a `.json` file. Biases are not in the format, so
        they read as zeros."""
        from phi3lab.circuits.graph_json import from_json

        return from_json(cls, data)

    def __repr__(self):
        counts = self.node_table["kind"].value_counts().to_dict()
        edges = int(np.count_nonzero(self.adjacency))
        return f"<AttributionGraph target={self.target} position={self.position} nodes={counts} edges={edges}>"


def attribution_graph(
    model,
    ids,
    transcoders,
    *,
    target=None,
    position: int = -1,
    tokenizer=None,
    max_feature_nodes: int | None = None,
    node_threshold: float | None = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 128,
    memory_budget: int | None = None,
) -> AttributionGraph:
    """The attribution graph of one logit of one prompt, through transcoders.

    Every MLP is replaced by its transcoder plus an error node, attention
    patterns and RMS scales are frozen at the clean run's values, and an edge
    is a direct effect, computed for a batch of receivers at a time by one
    compiled `jax.vjp` of the frozen model (docs/design.md, "Attribution
    graphs"). The target is the **raw logit** (not minus the mean logit), or
    the logit difference for a `(token, counterfactual)` pair.

    Args:
        model: a `Phi3Backbone`.
        ids: one prompt: token ids `[T]` (or `[1, T]`), or text with `tokenizer`.
        transcoders: a preset name (`"phi3lab_tiny_en"` loads its shipped
            `transcoder_0 ...`) or one `phi3lab.features.SparseDictionary`
            transcoder per layer (reading `blocks.l.ln2.hook_normalized`,
            writing `blocks.l.hook_mlp_out`).
        target: None (the model's top token at `position`), a token id, or
            `(token, counterfactual)` for the logit difference.
        position: the position whose next-token logit is explained.
        tokenizer: a `Phi3Tokenizer`, for text and token labels.
        max_feature_nodes: None (every active feature), or at most this many
            features, picked by influence on the logit in batches
            (circuit-tracer's rule); the effects of those left out move into
            `bias`, so the sums stay exact.
        node_threshold, edge_threshold: the fractions of influence `prune`
            keeps; `node_threshold=None` returns the whole graph.
        batch_size: receivers per compiled backward pass.
        memory_budget: bytes the clean run and the backward passes may each
            use (default the device's free memory); refused before running
            when over it (`CaptureTooLarge`, with the estimate).

    Returns:
        An `AttributionGraph`.

    Example:
    ```python
    graph = phi3lab.circuits.attribution_graph(model, "When Mary and John went to the store, John gave a drink to",
                                               "phi3lab_tiny_en", tokenizer=tok)
    graph.nodes.sort_values("score", ascending=False).head()
    graph.save("graph.json")                      # opens in circuit-tracer's / Neuronpedia's viewer
    ```
    """
    pipeline.check_budget(memory_budget)
    dictionaries, names = resolve_transcoders(model, transcoders)
    batch_size = check_positive_int("batch_size", batch_size)
    if node_threshold is not None:  # checked before any work
        graph_influence.check_fraction("node_threshold", node_threshold)
        graph_influence.check_fraction("edge_threshold", edge_threshold)
    if max_feature_nodes is not None:
        max_feature_nodes = check_positive_int("max_feature_nodes", max_feature_nodes)
    layers = range(model.num_layers)
    sites = ["hook_embed", *(block_name(l, s) for l in layers for s in (READS, WRITES)), "hook_logits"]
    tr = trace(model, ids, names=sites, tokenizer=tokenizer, memory_budget=memory_budget)
    if tr.token_ids.shape[0] != 1:
        raise bad_argument("ids", f"{tr.token_ids.shape[0]} rows", "one prompt: token ids [T] or [1, T], or one text")
    token_ids = tr.token_ids[0]
    position = check_index("position", position, len(token_ids), "position")
    logits = np.asarray(tr.logits[0, position], np.float64)
    target, direction = _target(model, target, logits)
    stack = lambda site: np.stack([tr[block_name(l, site)][0] for l in layers])
    parts = replacement_parts(dictionaries, stack(READS), stack(WRITES))
    embed = tr["hook_embed"][0]
    effects = DirectEffects(model, token_ids, position, direction, parts, embed, batch_size, memory_budget)
    chosen, rows, biases = effects.rows(max_feature_nodes)
    tokens = tr.tokens[0] if tr.tokens is not None else [f"#{t}" for t in token_ids.tolist()]
    shown = tokenizer.display_tokens(list(target)) if tokenizer is not None else [f"#{t}" for t in target]
    table = _node_table(parts, chosen, names, tokens, token_ids, target, shown, position, float(direction @ logits))
    graph = AttributionGraph(
        node_table=table,
        adjacency=rows,
        bias=biases,
        tokens=list(tokens),
        token_ids=token_ids,
        target=target,
        position=position,
        dictionaries=names,
        prompt=tokenizer.decode(token_ids.tolist()) if tokenizer is not None else "",
        transcoders=tuple(dictionaries),
    )
    graph.node_table["score"] = graph.influence()
    return graph if node_threshold is None else graph.prune(node_threshold, edge_threshold)


def _target(model, target, logits: np.ndarray) -> tuple[tuple, np.ndarray]:
    """`(target tuple, logit direction [V])`: +1 on the token, -1 on the counterfactual."""
    vocabulary = logits.shape[0]
    if target is None:
        tokens = (int(np.argmax(logits)),)
    elif isinstance(target, (tuple, list)) and len(target) == 2:
        tokens = tuple(int(t) for t in check_token_ids("target", list(target), model.vocabulary_size, ndim=1))
        if tokens[0] == tokens[1]:
            raise bad_argument("target", target, "(token, counterfactual) with two different tokens")
    else:
        tokens = (int(check_token_ids("target", target, model.vocabulary_size, ndim=0)),)
    direction = np.zeros(vocabulary, np.float32)
    direction[tokens[0]] = 1.0
    if len(tokens) == 2:
        direction[tokens[1]] = -1.0
    return tokens, direction


def _node_table(parts, chosen, names, tokens, token_ids, target, shown, position, value) -> pd.DataFrame:
    """The display protocol's node table, in the adjacency's order."""
    num_layers, length = parts.errors.shape[:2]
    rows = []
    for layer, pos, feature in parts.features[chosen].tolist():
        rows.append((f"F{layer}.{feature}@{pos}", "feature", layer, pos, f"L{layer} #{feature}", feature, names[layer]))
    for layer in range(num_layers):
        rows += [(f"E{layer}@{pos}", "error", layer, pos, f"error L{layer}", -1, names[layer]) for pos in range(length)]
    rows += [(f"T@{pos}", "token", -1, pos, str(tokens[pos]), -1, "") for pos in range(length)]
    label = "logit " + " - ".join(repr(str(token)) for token in shown)
    rows.append(("logit", "logits", num_layers, position, label, -1, ""))
    table = pd.DataFrame(rows, columns=["node", "kind", "layer", "position", "label", "feature", "dictionary"])
    activation = np.full(len(table), np.nan)
    activation[: len(chosen)] = parts.activations[chosen]
    activation[-1] = value
    token = np.full(len(table), -1)
    token[table["kind"] == "token"] = token_ids
    token[-1] = target[0]
    table["score"] = np.nan
    table["activation"] = activation
    table["token_id"] = token
    return table[NODE_COLUMNS]
