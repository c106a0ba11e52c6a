"""Metrics of a run: what `gradients` differentiates and the patching sweeps read.

A `Metric` maps a run's final hidden states to one value per batch row
`[B]` or to one total `()`. Two kinds exist:

* the logit difference `logit[answer] - logit[counterfactual]` (or the
  logit alone) at each row's last real position, unembedding only those
  positions;
* a user function `metric(logits)` or `metric(logits, batch)` of the logits
  `[B, T, V]`, `batch` being `{"token_ids": [B, T], "padding_mask": [B, T]}`,
  written with `jax.numpy` (it runs compiled).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_finite, check_token, last_positions
from phi3lab.errors import bad_argument


@dataclasses.dataclass(frozen=True, eq=False)
class Metric:
    """A metric ready to run compiled.

    Attributes:
        key: identifies the compiled program (hashable; part of cache keys).
        evaluate: `evaluate(hidden, unembed, data, batch) -> [B] | ()`.
        data: the metric's arrays (positions and token ids), a compiled input.
    """

    key: Hashable
    evaluate: Callable
    data: Any = None
    reads_positions: bool = False

    def length(self, bucket) -> int | None:
        """The static real length the metric is cut to in a run padded to
        `bucket` (a `pipeline.Bucket`): the real length for a metric function
        (it may read any position, e.g. `logits[:, -1]`; its programs compile
        per length), None for the logit difference (it reads each row's last
        real position from the mask: one program per bucket)."""
        return bucket.length if self.reads_positions and bucket.padded != bucket.length else None

    def rows(self, hidden, unembed, data, batch, length: int | None = None):
        """The metric's value per row `[B]` or in total `()`, float32, of the
        first `length` positions (all when None); any other shape is refused
        (while tracing, before anything runs)."""
        if length is not None:
            hidden = hidden[:, :length]
            batch = {key: value[:, :length] for key, value in batch.items()}
        value = self.evaluate(hidden, unembed, data, batch)
        if value.shape not in ((), (hidden.shape[0],)):
            raise ValueError(
                f"`metric` must return a scalar or one value per batch row (shape () or ({hidden.shape[0]},)); "
                f"it returned shape {tuple(value.shape)}."
            )
        return value


def _logit_diff(hidden, unembed, data, batch):
    positions, answer, counter = data
    rows = jnp.arange(hidden.shape[0])
    logits = unembed(hidden[rows, positions]).astype(jnp.float32)
    diff = logits[rows, answer]
    if counter is not None:
        diff = diff - logits[rows, counter]
    return diff


def _takes_batch(metric: Callable) -> bool:
    try:
        parameters = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


def _user_metric(metric: Callable, takes_batch: bool) -> Callable:
    def evaluate(hidden, unembed, data, batch):
        logits = unembed(hidden)
        value = metric(logits, batch) if takes_batch else metric(logits)
        try:
            return jnp.asarray(value, jnp.float32)
        except TypeError:
            raise ValueError(
                f"`metric` must return a scalar or one value per batch row (a jax.numpy array); it returned {value!r}."
            ) from None

    return evaluate


def resolve_metric(model, metric, answer, counterfactual, padding_mask: np.ndarray) -> Metric:
    """The `Metric` for the user's `metric` or `answer`/`counterfactual`.

    Args:
        model: the `Phi3Backbone` (for the vocabulary size).
        metric: None, or `metric(logits)` / `metric(logits, batch)`.
        answer, counterfactual: token ids (one, or one per row) for the
            logit difference when `metric` is None.
        padding_mask: bool `[B, T]` (the last real position of each row).
    """
    if metric is not None:
        if not callable(metric):
            raise bad_argument(
                "metric",
                metric,
                "None or a function metric(logits [B, T, V]) or metric(logits, batch) -> a scalar or [B], "
                "written in jax.numpy",
            )
        if answer is not None or counterfactual is not None:
            raise bad_argument("answer", answer, "None when `metric` is given (pass one or the other)")
        takes_batch = _takes_batch(metric)
        return Metric(metric, _user_metric(metric, takes_batch), reads_positions=True)
    if answer is None:
        raise bad_argument("answer", None, "a token id (or one per row) when `metric` is None; or pass `metric`")
    rows = padding_mask.shape[0]
    data = (
        jnp.asarray(last_positions(padding_mask)),
        jnp.asarray(check_token("answer", answer, model.vocabulary_size, rows)),
        None
        if counterfactual is None
        else jnp.asarray(check_token("counterfactual", counterfactual, model.vocabulary_size, rows)),
    )
    return Metric("logit_diff", _logit_diff, data)


def finite_metric(values, what: str = "the metric") -> np.ndarray:
    """The metric's `values` (of `what`, e.g. "the patched runs") as float64,
    or a `ValueError` when any is NaN or infinite (`phi3lab.checks.check_finite`)."""
    accepted = "a function returning finite values (check for log(0), division by zero or -inf logits)"
    return check_finite("metric", values, accepted, what, np.float64)
