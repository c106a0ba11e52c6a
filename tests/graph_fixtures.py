"""Small objects in the graph display protocol (`nodes` / `edges` DataFrames),
built by hand for the CircuitView tests (the browser test runs this file's
text in its notebook)."""

import dataclasses

import numpy as np
import pandas as pd


@dataclasses.dataclass
class ToyGraph:
    nodes: pd.DataFrame
    edges: pd.DataFrame


def _node(node, kind, layer, position=-1, label=None, score=np.nan, **extra):
    return dict(node=node, kind=kind, layer=layer, position=position, label=label or node, score=score, **extra)


def head_graph(
    layers: int = 2, heads: int = 2, seed: int = 0, positions: int = 1, kv_heads: int | None = None
) -> ToyGraph:
    """Embedding -> each head's q/k/v receivers and each MLP -> logits, every
    sender to every later receiver, random signed scores. With `positions`
    > 1, one copy of every node per position (edges within a position);
    with `kv_heads`, k/v receivers per key/value head (grouped-query
    attention, named as phi3lab.circuits does: `a0.kv1.k`)."""
    rng = np.random.default_rng(seed)
    nodes, senders, receivers = [], [], []
    for p in range(positions):
        where = p if positions > 1 else -1
        tag = f"@{p}" if positions > 1 else ""
        nodes.append(_node(f"embed{tag}", "embed", -1, where, head=-1))
        senders.append((f"embed{tag}", -1, p))
        for layer in range(layers):
            for h in range(heads):
                name = f"a{layer}.h{h}{tag}"
                nodes.append(_node(name, "head", layer, where, f"L{layer}H{h}", rng.normal(), head=h))
                senders.append((name, layer, p))
                for part in "q" if kv_heads else "qkv":
                    nodes.append(_node(f"{name}.{part}", f"head_{part}", layer, where, f"L{layer}H{h}.{part}", head=h))
                    receivers.append((f"{name}.{part}", layer, p))
            for j in range(kv_heads or 0):
                for part in "kv":
                    name = f"a{layer}.kv{j}.{part}{tag}"
                    nodes.append(_node(name, f"head_{part}", layer, where, f"L{layer}KV{j}.{part}", head=j))
                    receivers.append((name, layer, p))
            nodes.append(_node(f"m{layer}{tag}", "mlp", layer, where, f"MLP {layer}", rng.normal(), head=-1))
            senders.append((f"m{layer}{tag}", layer + 0.5, p))
            receivers.append((f"m{layer}{tag}", layer + 0.5, p))
        nodes.append(_node(f"logits{tag}", "logits", layers, where, "logits", head=-1))
        receivers.append((f"logits{tag}", layers, p))
    edges = [(s, r) for s, sl, sp in senders for r, rl, rp in receivers if sl < rl and sp == rp]
    table = pd.DataFrame(edges, columns=["sender", "receiver"])
    table["score"] = rng.normal(size=len(table)) * rng.exponential(size=len(table))
    return ToyGraph(pd.DataFrame(nodes), table)


def feature_graph(seed: int = 0) -> ToyGraph:
    """A per-position attribution graph: tokens, transcoder features of
    layers 0 and 2 at several positions, error nodes, the logit; feature 91
    of `resid_post_2` at position 8 among them."""
    rng = np.random.default_rng(seed)
    words = "When Mary and John went to the store , John gave a drink to".split()
    nodes = [_node(f"tok{p}", "token", -1, p, w, feature=-1, dictionary="") for p, w in enumerate(words)]
    for layer, dictionary in ((0, "transcoder_0"), (2, "resid_post_2")):
        for p in (1, 3, 8, 13):
            for f in rng.choice(np.delete(np.arange(1024), 91), 3, replace=False):
                nodes.append(
                    _node(
                        f"f{layer}.{p}.{f}",
                        "feature",
                        layer,
                        p,
                        f"{dictionary}[{f}]",
                        rng.random(),
                        feature=int(f),
                        dictionary=dictionary,
                        activation=rng.random() * 3,
                    )
                )
            nodes.append(_node(f"err{layer}.{p}", "error", layer, p, f"error L{layer}", feature=-1, dictionary=""))
    nodes.append(
        _node(
            "f2.8.91", "feature", 2, 8, "resid_post_2[91]", 2.0, feature=91, dictionary="resid_post_2", activation=1.5
        )
    )
    nodes.append(_node("logit", "logits", 4, 13, "logit ' Mary'", feature=-1, dictionary=""))
    table = pd.DataFrame(nodes)
    edges = []
    for r in table.itertuples():
        earlier = table[(table["layer"] < r.layer) & (table["position"] <= r.position)]
        for s in earlier.itertuples():
            if rng.random() < 0.5 or s.node == "f2.8.91":
                edges.append((s.node, r.node, rng.normal()))
    edges.append(("f2.8.91", "logit", 9.0))  # the strongest edge of the graph
    return ToyGraph(table, pd.DataFrame(edges, columns=["sender", "receiver", "score"]))
