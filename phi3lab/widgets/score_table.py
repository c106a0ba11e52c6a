"""`score_table`: per-head scores from the analysis results `HeadGrid` shows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from phi3lab.errors import bad_argument

_KEYS = ("layer", "head", "kv_head")


def score_table(scores, num_layers: int, num_heads: int, group_size: int) -> pd.DataFrame:
    """Per-head scores as a `[num_layers * num_heads]` table indexed by
    (layer, head), one numeric column per score.

    Accepts a DataFrame with `layer` and `head` columns (`analysis.head_scores`;
    `direct_logit_attribution`, whose rows without a head are dropped), a
    `PatchingResult` over heads or kv heads (`values [layers, units]`), a
    mapping name -> `[layers, heads]` array, or one `[layers, heads]` array.
    """
    index = pd.MultiIndex.from_product([range(num_layers), range(num_heads)], names=["layer", "head"])
    if isinstance(scores, pd.DataFrame):
        missing = [c for c in ("layer", "head") if c not in scores.columns]
        if missing:
            raise bad_argument(
                "scores",
                f"a DataFrame with columns {list(scores.columns)}",
                "a table with `layer` and `head` columns (e.g. analysis.head_scores)",
            )
        rows = scores.dropna(subset=["layer", "head"])
        numeric = [c for c in rows.columns if c not in _KEYS and pd.api.types.is_numeric_dtype(rows[c])]
        table = rows.astype({"layer": int, "head": int}).set_index(["layer", "head"])[numeric]
        return table.groupby(level=[0, 1]).first().reindex(index).astype(np.float64)
    if hasattr(scores, "values") and hasattr(scores, "axes") and not isinstance(scores, (np.ndarray, Mapping)):
        unit = scores.axes[1]
        values = np.asarray(scores.values, np.float64)
        if unit == "kv_head":  # a kv head's value for each query head reading it
            values = np.repeat(values, group_size, axis=1)
        elif unit != "head":
            raise bad_argument("scores", f"a PatchingResult over {unit!r}", "a PatchingResult over heads or kv heads")
        scores = {f"patching {scores.site}": values}
    if not isinstance(scores, Mapping):
        scores = {"score": scores}
    table = pd.DataFrame(index=index)
    for name, values in scores.items():
        values = np.asarray(values, np.float64)
        if values.shape != (num_layers, num_heads):
            raise bad_argument(
                "scores",
                f"an array of shape {values.shape}",
                f"one score per (layer, head): shape ({num_layers}, {num_heads})",
            )
        table[str(name)] = values.ravel()
    return table
