"""Sparse dictionaries: sparse autoencoders (SAEs) and transcoders.

Public names: `SparseDictionary` (a JAX pytree: `encode`, `decode`,
`__call__`), `DictionaryConfig`, `KINDS`, `load` / `from_pretrained` (SAELens'
file format, `hf://` handles) and `hooks` (splicing a dictionary into a run).

Example:
```python
import phi3lab.features as F
sae = F.load("path/to/sae")                        # cfg.json + sae_weights.safetensors
acts = sae.encode(x)                               # [..., d_sae]
tr = phi3lab.trace(model, ids, hooks=F.hooks.splice(sae))
```
"""

from phi3lab.features import hooks
from phi3lab.features.dictionary import KINDS, DictionaryConfig, SparseDictionary
from phi3lab.features.saelens_format import from_pretrained, load

__all__ = ["KINDS", "DictionaryConfig", "SparseDictionary", "from_pretrained", "hooks", "load"]
