"""Circuit discovery: edge attribution (EAP, EAP-IG), circuits and their
faithfulness, and feature attribution graphs.

Public names:
- `Graph` (senders, receivers and edges of a model at level `"heads"`,
  `"heads+mlps"` or `"layers"`), `edge_attribution` (-> `EdgeScores`),
  `Circuit` (a set of edges), `faithfulness`, `faithfulness_curve` (->
  `FaithfulnessCurve`) and `prune` (greedy pruning by exact edge patching);
- `attribution_graph` (the graph of direct effects among transcoder
  features, tokens, error nodes and one logit, in the replacement model
  with frozen attention and norms) -> `AttributionGraph` (the adjacency
  matrix, `prune`, the JSON of circuit-tracer's / Neuronpedia's graph
  viewer).
`EdgeScores`, `Circuit` and `AttributionGraph` expose the graph display
protocol (`.nodes`, `.edges`) that `phi3lab.widgets.CircuitView` draws.

Example:
```python
import phi3lab.circuits as C
scores = C.edge_attribution(model, clean, corrupted, answer=mary, counterfactual=john, level="heads+mlps")
circuit = scores.top(40)
C.faithfulness(model, circuit, clean, corrupted, answer=mary, counterfactual=john)   # ~1: keeps the behaviour
C.faithfulness_curve(model, scores, clean, corrupted, answer=mary, counterfactual=john).figure()
graph = C.attribution_graph(model, ids, "phi3lab_tiny_en", target=(mary, john))
graph.nodes, graph.edges                 # pandas tables
graph.save("graph.json")
```
"""

from phi3lab.circuits.attribution_graph import AttributionGraph, attribution_graph
from phi3lab.circuits.circuit import Circuit, EdgeScores
from phi3lab.circuits.edge_attribution import edge_attribution
from phi3lab.circuits.edge_patching import FaithfulnessCurve, faithfulness, faithfulness_curve, prune
from phi3lab.circuits.graph import LEVELS, Graph

__all__ = [
    "LEVELS",
    "AttributionGraph",
    "Circuit",
    "EdgeScores",
    "FaithfulnessCurve",
    "Graph",
    "attribution_graph",
    "edge_attribution",
    "faithfulness",
    "faithfulness_curve",
    "prune",
]
