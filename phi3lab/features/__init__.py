"""Sparse dictionaries: sparse autoencoders (SAEs) and transcoders.

Public names: `SparseDictionary` (a JAX pytree: `encode`, `decode`,
`__call__`), `DictionaryConfig`, `KINDS`, `load` / `from_pretrained` (SAELens'
file format, `hf://` handles), `from_preset` (the dictionaries a preset
ships), `train` (-> `TrainResult`), `evaluate` (a DataFrame row),
`attribute` (activation x gradient per feature and position, ->
`FeatureAttribution`), `summarize` (every feature's top rows, density and
histogram over an activation store, -> `FeatureSummary`) and `hooks`
(splicing a dictionary into a run).

Example:
```python
import phi3lab.features as F
sae = F.from_preset("phi3lab_tiny_en", "resid_post_2")  # shipped; card in docs/features.md
sae = F.load("path/to/sae")                        # cfg.json + sae_weights.safetensors
sae = F.train(model, ids, site="blocks.2.hook_resid_post", kind="topk", width=1024, k=16,
              tokens=1_000_000, batch_size=1024).dictionary
acts = sae.encode(x)                               # [..., d_sae]
F.evaluate(model, sae, held_out_ids)               # explained variance, L0, CE-loss recovered
tr = phi3lab.trace(model, ids, hooks=F.hooks.splice(sae))
```
"""

from phi3lab.features import hooks
from phi3lab.features.attribution import FeatureAttribution, attribute
from phi3lab.features.dictionary import KINDS, DictionaryConfig, SparseDictionary
from phi3lab.features.evaluation import evaluate
from phi3lab.features.saelens_format import from_preset, from_pretrained, load
from phi3lab.features.summary import FeatureSummary, summarize
from phi3lab.features.training import TrainResult, train

__all__ = [
    "KINDS",
    "attribute",
    "DictionaryConfig",
    "FeatureAttribution",
    "FeatureSummary",
    "SparseDictionary",
    "TrainResult",
    "evaluate",
    "from_preset",
    "from_pretrained",
    "hooks",
    "load",
    "summarize",
    "train",
]
