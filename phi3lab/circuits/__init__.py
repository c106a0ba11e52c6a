"""Circuits: feature attribution graphs.

Public names: `attribution_graph` (the graph of direct effects among
transcoder features, tokens, error nodes and one logit, in the replacement
model with frozen attention and norms) and `AttributionGraph` (its nodes and
edges in the display protocol, the adjacency matrix, `prune`, the JSON of
circuit-tracer's / Neuronpedia's graph viewer).

Example:
```python
import phi3lab.circuits as C
graph = C.attribution_graph(model, ids, "phi3lab_tiny_en", target=(mary, john))
graph.nodes, graph.edges                 # pandas tables
graph.save("graph.json")
```
"""

from phi3lab.circuits.attribution_graph import AttributionGraph, attribution_graph

__all__ = ["AttributionGraph", "attribution_graph"]
