"""Corpus-scale activations: collect hook sites over many documents, store them.

`collect(model, data, names, ...)` runs a corpus through the compiled forward
in length-bucketed batches and keeps the rows of real tokens, tagged with
their document, position and token id, in an `ActivationStore` (in memory,
or a Zarr v3 directory written as it goes and reopened with `open`).

Example:
```python
store = phi3lab.activations.collect(model, texts, "blocks.1.hook_resid_post", tokenizer=tok, store="acts.zarr")
store = phi3lab.activations.open("acts.zarr")
store.mean("blocks.1.hook_resid_post"), store.tokens
```
"""

from phi3lab.activations.collect import collect
from phi3lab.activations.store import TAGS, ActivationStore, LazyRows
from phi3lab.activations.store import open_store as open

__all__ = ["TAGS", "ActivationStore", "LazyRows", "collect", "open"]
