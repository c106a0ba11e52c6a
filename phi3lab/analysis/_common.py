"""Checks that only the analysis functions need (traces, captured names).

The general input checks (indices, ids, masks, tokens) are `phi3lab.checks`.
"""

from __future__ import annotations

import re

import numpy as np

from phi3lab.errors import bad_argument


def as_list(name: str, values) -> list:
    """`values` (a scalar or a 1-D sequence) as a list, or a `ValueError` naming `name`."""
    try:
        array = np.atleast_1d(np.asarray(values))
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 1:
        raise bad_argument(name, values, "an int or a 1-D list of ints")
    return array.tolist()


def check_trace(model, tr) -> None:
    """Raise unless `tr` is a `Trace` of a model shaped like `model`."""
    from phi3lab.tracing import Trace

    if not isinstance(tr, Trace):
        raise bad_argument("tr", tr, "a phi3lab.Trace (from phi3lab.trace(model, ids))")
    ours = (model.num_layers, model.num_query_heads, model.num_key_value_heads)
    theirs = (tr.num_layers, tr.num_query_heads, tr.num_key_value_heads)
    if ours != theirs:
        raise ValueError(
            "`tr` was traced from a different model: it has (num_layers, num_query_heads, "
            f"num_key_value_heads) = {theirs}, `model` has {ours}."
        )


def require(tr, names: list[str], purpose: str) -> None:
    """Raise a `KeyError` naming the first of `names` missing from `tr` and
    the `phi3lab.trace` call that captures them all."""
    missing = [n for n in names if n not in tr.names]
    if missing:
        patterns = list(dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in names))
        raise KeyError(
            f"{purpose} needs {missing[0]!r}, which `tr` did not capture. Capture it with "
            f"phi3lab.trace(model, ids, names={patterns}) (or names=None for everything)."
        )
