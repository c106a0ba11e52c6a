"""Circuit discovery: edge attribution (EAP, EAP-IG), circuits and their faithfulness.

Public names: `Graph` (senders, receivers and edges of a model at level
`"heads"`, `"heads+mlps"` or `"layers"`), `edge_attribution` (-> `EdgeScores`),
`Circuit` (a set of edges), `faithfulness`, `faithfulness_curve` (->
`FaithfulnessCurve`) and `prune` (greedy pruning by exact edge patching).
`EdgeScores` and `Circuit` expose the graph display protocol (`.nodes`,
`.edges`) that `phi3lab.widgets.CircuitView` draws.

Example:
```python
import phi3lab.circuits as C
scores = C.edge_attribution(model, clean, corrupted, answer=mary, counterfactual=john, level="heads+mlps")
circuit = scores.top(40)
C.faithfulness(model, circuit, clean, corrupted, answer=mary, counterfactual=john)   # ~1: keeps the behaviour
C.faithfulness_curve(model, scores, clean, corrupted, answer=mary, counterfactual=john).figure()
```
"""

from phi3lab.circuits.circuit import Circuit, EdgeScores
from phi3lab.circuits.edge_attribution import edge_attribution
from phi3lab.circuits.edge_patching import FaithfulnessCurve, faithfulness, faithfulness_curve, prune
from phi3lab.circuits.graph import LEVELS, Graph

__all__ = [
    "LEVELS",
    "Circuit",
    "EdgeScores",
    "FaithfulnessCurve",
    "Graph",
    "edge_attribution",
    "faithfulness",
    "faithfulness_curve",
    "prune",
]
