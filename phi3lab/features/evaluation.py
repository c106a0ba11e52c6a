"""`evaluate(model, dictionary, data)`: how well a dictionary stands in for its site.

One row (a pandas DataFrame) with:

- `explained_variance`: `1 - Σ(output - y)² / Σ(y - mean y)²` over the
  tokens (y the site, or a transcoder's target);
- `mse`: the mean squared error per value;
- `l0`: mean active features per token;
- `dead_fraction`: features that never fire on the data;
- `dense_fraction`: features firing on more than `DENSE` of the tokens;
- with token ids or texts, next-token losses: `loss_clean`, `loss_spliced`
  (the site replaced by the dictionary's output, no error term),
  `loss_zero_ablated` (the site set to zeros) and
  `ce_loss_recovered = (zero - spliced) / (zero - clean)` (1 is perfect).
  With activations only, those columns are NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.errors import bad_argument
from phi3lab.features import data as data_sources
from phi3lab.features import hooks as feature_hooks
from phi3lab.features.dictionary import SparseDictionary

DENSE = 0.1
ROWS_PER_TRACE = 16


def _zero(x, ctx):
    return jnp.zeros_like(x)


def evaluate(model, dictionary: SparseDictionary, data, *, tokenizer=None, batch_size: int = 4096) -> pd.DataFrame:
    """Explained variance, MSE, L0, dead and dense fractions and CE-loss recovered.

    Args:
        model: the `Phi3Backbone` (None when `data` holds activations).
        dictionary: a `SparseDictionary` with its `site` (and a transcoder's
            `target_site`) set.
        data: token ids `[B, T]` or texts (with `tokenizer=`): every
            column; or activations (`[N, D]`, a pair for a transcoder, an
            activation store): the reconstruction columns only.
        tokenizer: a `Phi3Tokenizer`, when `data` is text.
        batch_size: rows per batch when reading a store.

    Returns:
        A one-row DataFrame (see the module).

    Example:
    >>> phi3lab.features.evaluate(model, sae, held_out_texts, tokenizer=tok)
    """
    if not isinstance(dictionary, SparseDictionary):
        raise bad_argument("dictionary", dictionary, "a phi3lab.features.SparseDictionary")
    config = dictionary.config
    if not isinstance(config.site, str) or (config.transcoder and not isinstance(config.target_site, str)):
        raise bad_argument("dictionary", dictionary, "a dictionary whose config names its site (and target_site)")
    stats = _Stats(config.d_sae)
    losses = {"loss_clean": np.nan, "loss_spliced": np.nan, "loss_zero_ablated": np.nan}
    if hasattr(data, "batches") or data_sources.is_activations(data) or isinstance(data, tuple):
        _add_arrays(stats, dictionary, data, batch_size)
    else:
        losses = _from_model(stats, model, dictionary, data, tokenizer)
    row = {**stats.summary(), **losses}
    recovered = (losses["loss_zero_ablated"] - losses["loss_spliced"]) / (
        losses["loss_zero_ablated"] - losses["loss_clean"]
    )
    return pd.DataFrame([{**row, "ce_loss_recovered": recovered}])


class _Stats:
    """Running sums over tokens."""

    def __init__(self, d_sae: int):
        self.fired = np.zeros(d_sae, np.int64)
        self.tokens = 0
        self.active = 0
        self.sums = {"error": 0.0, "y": 0.0, "y2": 0.0, "values": 0}
        self.y_sum = None

    def add(self, dictionary: SparseDictionary, x: np.ndarray, y: np.ndarray):
        acts = dictionary.encode(jnp.asarray(x))
        output = np.asarray(dictionary.decode(acts, jnp.asarray(x)), np.float64)
        on = np.asarray(acts) > 0
        self.fired += on.sum(0)
        self.active += int(on.sum())
        self.tokens += len(x)
        y = y.astype(np.float64)
        self.sums["error"] += float(((output - y) ** 2).sum())
        self.sums["y2"] += float((y**2).sum())
        self.sums["values"] += y.size
        self.y_sum = y.sum(0) if self.y_sum is None else self.y_sum + y.sum(0)

    def summary(self) -> dict:
        variance = self.sums["y2"] - float((self.y_sum**2).sum()) / self.tokens
        return {
            "tokens": self.tokens,
            "explained_variance": 1 - self.sums["error"] / variance,
            "mse": self.sums["error"] / self.sums["values"],
            "l0": self.active / self.tokens,
            "dead_fraction": float(np.mean(self.fired == 0)),
            "dense_fraction": float(np.mean(self.fired > DENSE * self.tokens)),
        }


def _add_arrays(stats: _Stats, dictionary, data, batch_size: int):
    if hasattr(data, "batches"):
        config = dictionary.config
        inputs = data.batches(config.site, batch_size, shuffle=False, seed=0)
        targets = data.batches(config.target_site, batch_size, shuffle=False, seed=0) if config.transcoder else None
        for x in inputs:
            x = data_sources.finite_activations(np.asarray(x, np.float32))
            y = x if targets is None else data_sources.finite_activations(np.asarray(next(targets), np.float32))
            stats.add(dictionary, x, y)
        return
    x, y = data if isinstance(data, tuple) else (data, data)
    x = data_sources.finite_activations(np.asarray(x, np.float32))
    y = data_sources.finite_activations(np.asarray(y, np.float32))
    for start in range(0, len(x), batch_size):
        stats.add(dictionary, x[start : start + batch_size], y[start : start + batch_size])


def _from_model(stats: _Stats, model, dictionary: SparseDictionary, data, tokenizer) -> dict:
    from phi3lab.tracing.tracer import trace

    if model is None:
        raise bad_argument("model", None, "a Phi3Backbone to evaluate on token ids or texts")
    config = dictionary.config
    ids, mask = data_sources.token_ids(model, data, tokenizer)
    replaced = config.target_site if config.transcoder else config.site
    names = sorted({config.site, replaced, "hook_logits"})
    totals = {"loss_clean": [], "loss_spliced": [], "loss_zero_ablated": []}
    runs = {
        "loss_clean": None,
        "loss_spliced": feature_hooks.splice(dictionary),
        "loss_zero_ablated": {replaced: _zero},
    }
    for start in range(0, len(ids), ROWS_PER_TRACE):
        rows = slice(start, start + ROWS_PER_TRACE)
        for column, hooks in runs.items():
            tr = trace(
                model, ids[rows], padding_mask=mask[rows], names=names if hooks is None else "hook_logits", hooks=hooks
            )
            totals[column].append(tr.loss(per_token=True).ravel())
            if hooks is None:
                real = mask[rows]
                x = tr[config.site].reshape(*real.shape, -1)[real]
                stats.add(dictionary, x, tr[replaced].reshape(*real.shape, -1)[real])
    return {column: float(np.nanmean(np.concatenate(values))) for column, values in totals.items()}
