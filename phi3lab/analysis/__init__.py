"""Analyses of traces: logit lens, attribution, patching, heads, rotary, probes.

Every analysis reuses the model's own final norm, LM head and rotary code
(one formula, one place) and returns NumPy arrays, DataFrames or
dataclasses.

Example:
```python
tr = phi3lab.trace(model, ids)
phi3lab.analysis.logit_lens(model, tr, k=3)
phi3lab.analysis.direct_logit_attribution(model, tr, answer=17, counterfactual=4)
phi3lab.analysis.activation_patching(model, clean_ids, corrupted_ids, answer=17, counterfactual=4)
phi3lab.analysis.attribution_patching(model, clean_ids, corrupted_ids, answer=17, counterfactual=4)
phi3lab.analysis.head_scores(model)
phi3lab.analysis.rotary_table(model, seq_len=4096)
phi3lab.analysis.probe(store, labels, site="blocks.2.hook_resid_post")   # over phi3lab.activations stores
```
"""

from phi3lab.analysis.attribution import (
    ResidualDecomposition,
    decompose_resid,
    direct_logit_attribution,
    frozen_norm_scale,
    next_token_attribution,
)
from phi3lab.analysis.attribution_patching import attribution_patching
from phi3lab.analysis.heads import (
    attention_stats,
    detector_scores,
    group_heads,
    head_scores,
)
from phi3lab.analysis.lens import answer_curve, logit_lens, logit_lens_logits
from phi3lab.analysis.patching import PatchingResult, activation_patching
from phi3lab.analysis.path_patching import PathPatchingResult, path_patching
from phi3lab.analysis.probes import ProbeResult, ProbeSweep, contrast_vector, probe, probe_sweep
from phi3lab.analysis.rotary import rotary_band_scores, rotary_table
from phi3lab.tasks import repeated_tokens

__all__ = [
    "PatchingResult",
    "PathPatchingResult",
    "ProbeResult",
    "ProbeSweep",
    "ResidualDecomposition",
    "activation_patching",
    "answer_curve",
    "attention_stats",
    "attribution_patching",
    "contrast_vector",
    "decompose_resid",
    "detector_scores",
    "direct_logit_attribution",
    "next_token_attribution",
    "frozen_norm_scale",
    "group_heads",
    "head_scores",
    "logit_lens",
    "logit_lens_logits",
    "path_patching",
    "probe",
    "probe_sweep",
    "repeated_tokens",
    "rotary_band_scores",
    "rotary_table",
]
