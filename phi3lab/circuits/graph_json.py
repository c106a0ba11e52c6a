"""Attribution graphs in the JSON that circuit-tracer's and Neuronpedia's
graph viewer reads: schema version 1, as circuit-tracer 0.5.0 writes it
(`circuit_tracer/frontend/graph_models.py`: `Model` = `metadata`, `qParams`,
`nodes`, `links`).

Node ids are circuit-tracer's: a feature `"{layer}_{feature}_{position}"`, an
error `"0_{layer}_{position}"`, a token `"E_{token_id}_{position}"`, the logit
`"{L + 1}_{token_id}_{position}"`; a feature's `feature` field is the Cantor
pairing of (layer, feature), as there. phi3lab's own node ids come back when
the file is read.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from phi3lab.errors import bad_argument

SCHEMA_VERSION = 1
_FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logits": "logit",
}
_KINDS = {value: key for key, value in _FEATURE_TYPES.items()}


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _viewer_id(row, num_layers: int) -> tuple[str, str]:
    """`(node_id, jsNodeId)` of one node row, as circuit-tracer names them."""
    layer, position, kind = int(row.layer), int(row.position), row.kind
    if kind == "feature":
        return f"{layer}_{int(row.feature)}_{position}", f"{layer}_{int(row.feature)}-0"
    if kind == "error":
        return f"0_{layer}_{position}", f"{layer}_{position}-0"
    if kind == "token":
        return f"E_{int(row.token_id)}_{position}", f"E_{int(row.token_id)}-{position}"
    return f"{num_layers + 1}_{int(row.token_id)}_{position}", f"L_{int(row.token_id)}-{position}"


def _viewer_node(row, num_layers: int, cumulative: float) -> dict:
    node_id, js_id = _viewer_id(row, num_layers)
    layer = {"token": "E", "logits": str(num_layers + 1)}.get(row.kind, str(int(row.layer)))
    feature = {
        "feature": _cantor(int(row.layer), int(row.feature)) if row.kind == "feature" else 0,
        "error": -1,
        "token": int(row.position),
        "logits": int(row.token_id),
    }[row.kind]
    activation = float(row.activation) if row.kind in ("feature", "logits") else None
    return {
        "node_id": node_id,
        "feature": feature,
        "layer": layer,
        "ctx_idx": int(row.position),
        "feature_type": _FEATURE_TYPES[row.kind],
        "token_prob": 0.0,
        "is_target_logit": row.kind == "logits",
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": row.label if row.kind == "logits" else "",
        "influence": None if row.kind == "logits" else cumulative,
        "activation": activation,
    }


def to_json(graph, slug: str = "phi3lab-graph", scan: str | None = None) -> dict:
    """`graph` as the viewer's JSON dict (every node and non-zero edge of it:
    prune first for a readable graph).

    `influence` is circuit-tracer's cumulative score: the share of the total
    influence carried by the nodes at least as influential as this one.
    `scan` names the transcoder set (default: the dictionaries' names joined).
    """
    table = graph.node_table
    num_layers = len(graph.dictionaries)
    score = np.nan_to_num(table["score"].to_numpy(np.float64))
    order = np.argsort(-score, kind="stable")
    cumulative = np.empty_like(score)
    cumulative[order] = np.cumsum(score[order]) / max(score.sum(), 1e-30)
    nodes = [_viewer_node(row, num_layers, float(c)) for row, c in zip(table.itertuples(), cumulative)]
    ids = [node["node_id"] for node in nodes]
    receivers, senders = np.nonzero(graph.adjacency)
    links = [
        {"source": ids[s], "target": ids[r], "weight": float(graph.adjacency[r, s])} for r, s in zip(receivers, senders)
    ]
    metadata = {
        "slug": slug,
        "scan": scan or "-".join(graph.dictionaries),
        "transcoder_list": list(graph.dictionaries),
        "prompt_tokens": [str(token) for token in graph.tokens],
        "prompt": graph.prompt or "".join(str(token) for token in graph.tokens),
        "node_threshold": None,
        "schema_version": SCHEMA_VERSION,
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def save(graph, path, slug: str | None = None, scan: str | None = None) -> None:
    """Write `to_json(graph)` to `path`; the slug defaults to the file's stem."""
    slug = slug or os.path.splitext(os.path.basename(os.fspath(path)))[0]
    with open(path, "w", encoding="utf-8") as file:
        json.dump(to_json(graph, slug, scan), file, indent=1)


def _read_node(node: dict, metadata: dict, names: list, num_layers: int, token_ids: dict, is_target: bool) -> tuple:
    """One node table row (in `from_json`'s column order) of a viewer node."""
    kind = _KINDS.get(node.get("feature_type"))
    if kind is None:
        raise bad_argument("data", node.get("feature_type"), f"nodes whose feature_type is one of {list(_KINDS)}")
    first, second = (node["node_id"].split("_") + ["", ""])[:2]
    pos = int(node["ctx_idx"])
    if kind == "feature":
        layer, feature = int(first), int(second)
        row = (f"F{layer}.{feature}@{pos}", kind, layer, pos, f"L{layer} #{feature}", feature, names[layer], -1)
    elif kind == "error":
        layer = int(second)
        row = (f"E{layer}@{pos}", kind, layer, pos, f"error L{layer}", -1, names[layer], -1)
    elif kind == "token":
        token_ids[pos] = int(second)
        row = (f"T@{pos}", kind, -1, pos, str(metadata["prompt_tokens"][pos]), -1, "", int(second))
    else:
        label = node.get("clerp") or f"logit {second}"
        row = ("logit" if is_target else f"logit@{second}", kind, num_layers, pos, label, -1, "", int(second))
    return (*row, node.get("activation"))


def from_json(cls, data):
    """An `AttributionGraph` (`cls`) from the viewer's JSON (a dict or a path).

    The file holds no biases (they read as zeros) and no counterfactual
    token (the target reads as the logit's token; the label keeps the
    difference); scores are the influence measured on the graph read."""
    if isinstance(data, (str, os.PathLike)):
        with open(data, encoding="utf-8") as file:
            data = json.load(file)
    if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
        raise bad_argument("data", data, "the graph JSON (a dict or a path) with 'metadata', 'nodes' and 'links'")
    metadata = data["metadata"]
    if metadata.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise bad_argument(
            "data", f"schema_version={metadata['schema_version']}", f"a graph of schema version {SCHEMA_VERSION}"
        )
    logits = [node for node in data["nodes"] if node.get("feature_type") == "logit"]
    per_layer = (_FEATURE_TYPES["feature"], _FEATURE_TYPES["error"])
    layered = [int(n["layer"]) + 1 for n in data["nodes"] if n.get("feature_type") in per_layer]
    num_layers = int(logits[0]["layer"]) - 1 if logits else max(layered, default=0)
    # circuit-tracer leaves transcoder_list empty when `scan` names a whole transcoder set
    names = list(
        metadata.get("transcoder_list") or [f"{metadata.get('scan', 'layer')}_{layer}" for layer in range(num_layers)]
    )
    target = next((n for n in logits if n.get("is_target_logit")), logits[0] if logits else None)
    rows, token_ids = [], {}
    for node in data["nodes"]:
        rows.append(_read_node(node, metadata, names, num_layers, token_ids, node is target))
    columns = ["node", "kind", "layer", "position", "label", "feature", "dictionary", "token_id", "activation"]
    table = pd.DataFrame(rows, columns=columns).astype({"activation": float})
    table["score"] = np.nan
    index = {node["node_id"]: i for i, node in enumerate(data["nodes"])}
    adjacency = np.zeros((len(rows), len(rows)), np.float32)
    for link in data["links"]:
        adjacency[index[link["target"]], index[link["source"]]] = link["weight"]
    from phi3lab.circuits.attribution_graph import NODE_COLUMNS

    graph = cls(
        node_table=table[NODE_COLUMNS],
        adjacency=adjacency,
        bias=np.zeros(len(rows), np.float32),
        tokens=list(metadata["prompt_tokens"]),
        token_ids=np.array([token_ids.get(i, -1) for i in range(len(metadata["prompt_tokens"]))]),
        target=() if target is None else (int(target["node_id"].split("_")[1]),),
        position=-1 if target is None else int(target["ctx_idx"]),
        dictionaries=names,
        prompt=metadata.get("prompt", ""),
    )
    graph.node_table["score"] = graph.influence()
    return graph
