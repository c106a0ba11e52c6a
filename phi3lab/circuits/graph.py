"""The computational graph whose edges circuits are made of.

A node *sends* what it writes into the residual stream (the embedding, an
attention head's or layer's output, an MLP's output) and *receives* what it
reads from it (a head's query, key or value input, an MLP's input, the
logits' input). The residual stream entering a block is exactly the sum of
the embedding and every earlier output (Phi-3 has no biases), so every
receiver's input is a sum over its senders: an **edge** `u -> v` is sender
`u`'s term in receiver `v`'s input. Edges run from every sender to every
later receiver; an attention output of layer `l` reaches the MLP of layer `l`
but not the heads of layer `l`.

Levels:
* `"heads"`: senders are the embedding and every query head (its `z @ W_O`,
  `attn.hook_result`); receivers are each query head's query input, each
  key/value head's key and value inputs, and the logits. MLPs are not nodes:
  their outputs are part of the stream every receiver reads, always computed
  in the running forward (never ablated).
* `"heads+mlps"`: the same, with each MLP a sender (`hook_mlp_out`) and a
  receiver (`hook_mlp_in`).
* `"layers"`: one node per attention layer (sender `hook_attn_out`, receiver
  its q, k and v inputs together) and per MLP.

Grouped-query attention: a key/value head's key (value) input is one
receiver, read by every query head of its group (`key_value_heads`); query
inputs are per query head. Receiver ids: `a{l}.h{n}.q`, `a{l}.kv{k}.k`,
`a{l}.kv{k}.v` (`a{l}.h{k}.k` when every query head has its own key/value
head); senders `embed`, `a{l}.h{n}`, `a{l}`, `m{l}`; the last receiver is
`logits`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.checks import check_choice
from phi3lab.tracing.forward import forward_fn
from phi3lab.tracing.names import block_name

LEVELS = ("heads", "heads+mlps", "layers")
NODE_COLUMNS = ["node", "kind", "layer", "position", "label", "score", "head"]


@dataclasses.dataclass(frozen=True)
class SenderGroup:
    """Senders that write one hook site: `site`'s value is `[B, T, n, D]`
    with one sender per head (`per_head`), or `[B, T, D]` for one sender."""

    site: str
    nodes: tuple[str, ...]
    per_head: bool


@dataclasses.dataclass(frozen=True)
class ReceiverSite:
    """A hook site where receivers read the stream.

    Attributes:
        site: the full hook name (`blocks.2.attn.hook_q_input`, ...).
        receivers: indices into `Graph.receivers`: one per head of a
            per-head site, or one receiver for the whole site.
        heads: whether the site has a head axis (`[B, T, n, D]`); with one
            receiver it reads every head's copy.
        senders: how many senders (a prefix of `Graph.senders`) reach it.
        groups: how many sender groups (a prefix of `Graph.groups`) reach it.
    """

    site: str
    receivers: tuple[int, ...]
    heads: bool
    senders: int
    groups: int


class Graph:
    """Senders, receivers and edges of `model` at one level of detail.

    Args:
        model: a `Phi3Backbone`.
        level: `"heads"`, `"heads+mlps"` or `"layers"` (module docstring).

    Attributes:
        senders, receivers: node ids in forward order.
        groups: the `SenderGroup`s (senders in order), `sites` the
            `ReceiverSite`s.
        allowed: bool `[S, R]`, True where sender `s` reaches receiver `r`.
        nodes, edges: the display protocol's DataFrames (edge scores NaN).

    Example (the shipped `phi3lab_tiny_en`: 4 layers, 4 query heads over 2
    key/value heads):
    >>> graph = phi3lab.circuits.Graph(model, level="heads+mlps")
    >>> len(graph), graph.nodes.query("kind == 'head_k'").node.tolist()[:2]
    (343, ['a0.kv0.k', 'a0.kv1.k'])
    """

    def __init__(self, model, level: str = "heads"):
        check_choice("level", level, LEVELS)
        self.level = level
        self.num_layers = layers = model.num_layers
        self._node_rows: dict[str, dict] = {}
        self.groups: list[SenderGroup] = [SenderGroup("hook_embed", (self._node("embed", "embed", -1),), False)]
        self.sites: list[ReceiverSite] = []
        self.receivers: list[str] = []
        shared = model.num_key_value_heads != model.num_query_heads
        for layer in range(layers):
            before = len(self.groups)
            if level == "layers":
                attention = self._node(f"a{layer}", "attention", layer)
                for kind in "qkv":
                    self._site(block_name(layer, f"attn.hook_{kind}_input"), [attention], True, before)
                self.groups.append(SenderGroup(block_name(layer, "hook_attn_out"), (attention,), False))
            else:
                queries = [self._node(f"a{layer}.h{n}.q", "head_q", layer, n) for n in range(model.num_query_heads)]
                self._site(block_name(layer, "attn.hook_q_input"), queries, True, before)
                for kind in "kv":
                    inputs = [
                        self._node(f"a{layer}.{'kv' if shared else 'h'}{k}.{kind}", f"head_{kind}", layer, k)
                        for k in range(model.num_key_value_heads)
                    ]
                    self._site(block_name(layer, f"attn.hook_{kind}_input"), inputs, True, before)
                heads = tuple(self._node(f"a{layer}.h{n}", "head", layer, n) for n in range(model.num_query_heads))
                self.groups.append(SenderGroup(block_name(layer, "attn.hook_result"), heads, True))
            if level != "heads":
                mlp = self._node(f"m{layer}", "mlp", layer)
                self._site(block_name(layer, "hook_mlp_in"), [mlp], False, len(self.groups))
                self.groups.append(SenderGroup(block_name(layer, "hook_mlp_out"), (mlp,), False))
        logits = self._node("logits", "logits", layers)
        self._site(block_name(layers - 1, "hook_resid_post"), [logits], False, len(self.groups))
        self.senders = [node for group in self.groups for node in group.nodes]
        self.allowed = np.zeros((len(self.senders), len(self.receivers)), bool)
        for site in self.sites:
            self.allowed[: site.senders, list(site.receivers)] = True

    def _node(self, node: str, kind: str, layer: int, head: int = -1) -> str:
        if node not in self._node_rows:
            label = {"embed": "embed", "logits": "logits"}.get(kind, node)
            self._node_rows[node] = dict(
                node=node, kind=kind, layer=layer, position=-1, label=label, score=np.nan, head=head
            )
        return node

    def _site(self, site: str, receivers: list[str], heads: bool, groups: int) -> None:
        indices = []
        for node in receivers:
            if node not in self.receivers:
                self.receivers.append(node)
            indices.append(self.receivers.index(node))
        senders = sum(len(group.nodes) for group in self.groups[:groups])
        self.sites.append(ReceiverSite(site, tuple(indices), heads, senders, groups))

    @property
    def key(self) -> tuple:
        """What compiled programs over this graph depend on (with the model)."""
        return ("circuits.graph", self.level)

    @property
    def site_names(self) -> tuple[str, ...]:
        """Every receiver site's hook name, in forward order."""
        return tuple(site.site for site in self.sites)

    @property
    def nodes(self) -> pd.DataFrame:
        """One row per node (display protocol): `node, kind, layer,
        position, label, score, head` (`head` is the query head, or the
        key/value head of a `head_k` / `head_v` node; -1 if none)."""
        return pd.DataFrame(list(self._node_rows.values()), columns=NODE_COLUMNS)

    @property
    def edges(self) -> pd.DataFrame:
        """Every edge (display protocol): `sender, receiver, score` (NaN)."""
        senders, receivers = np.nonzero(self.allowed)
        return pd.DataFrame(
            {
                "sender": np.array(self.senders, object)[senders],
                "receiver": np.array(self.receivers, object)[receivers],
                "score": np.full(len(senders), np.nan),
            }
        )

    def sender_forward(self, model):
        """A `forward_fn` of `model` capturing every sender site."""
        return forward_fn(model, names=[group.site for group in self.groups])

    def sender_values(self, values: dict):
        """Each sender's output stacked, `[S, B, T, D]`, from the sender
        sites' values `{site: [B, T, n, D] or [B, T, D]}`."""
        parts = [
            jnp.moveaxis(values[group.site], 2, 0) if group.per_head else values[group.site][None]
            for group in self.groups
        ]
        return jnp.concatenate(parts, axis=0)

    def receiver_values(self, values: dict):
        """Each receiver's input gradient (or any per-site value) stacked,
        `[R, B, T, D]`: a per-head site gives one row per head; a site with
        one receiver adds up its heads; receivers at several sites (a
        layer's q, k and v inputs) add up their sites."""
        rows = [None] * len(self.receivers)
        for site in self.sites:
            value = values[site.site]
            if site.heads and len(site.receivers) > 1:
                parts = list(jnp.moveaxis(value, 2, 0))
            else:
                parts = [value.sum(axis=2) if site.heads else value]
            for receiver, part in zip(site.receivers, parts):
                rows[receiver] = part if rows[receiver] is None else rows[receiver] + part
        return jnp.stack(rows)

    def __len__(self) -> int:
        return int(self.allowed.sum())

    def __repr__(self) -> str:
        counts = f"senders={len(self.senders)} receivers={len(self.receivers)} edges={len(self)}"
        return f"<Graph level={self.level!r} {counts}>"
