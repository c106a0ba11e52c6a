"""The checks every circuits entry point runs on its clean and corrupted prompts."""

from __future__ import annotations

import numpy as np

from phi3lab.checks import check_ids, check_mask
from phi3lab.errors import bad_argument
from phi3lab.tracing.metrics import Metric, resolve_metric


def _ragged(name: str, ids) -> None:
    """A clear error for prompts of different lengths given as lists."""
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(row, (list, tuple, np.ndarray)) for row in ids):
        lengths = sorted({len(row) for row in ids})
        if len(lengths) > 1:
            raise bad_argument(
                name,
                f"prompts of lengths {lengths}",
                "prompts of one length [B, T]: pad them on the right (`tokenizer.encode_batch`) and pass "
                "their `padding_mask`",
            )


def prepare(
    model, clean, corrupted, padding_mask, metric, answer, counterfactual
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Metric]:
    """`(clean, corrupted, padding_mask, metric)`: ids int32 `[B, T]` of one
    shape, their shared bool mask, and the resolved `Metric` (the logit
    difference at each row's last real position with `answer`)."""
    _ragged("clean", clean)
    _ragged("corrupted", corrupted)
    clean_ids = check_ids("clean", clean, model)
    corrupted_ids = check_ids("corrupted", corrupted, model)
    if clean_ids.shape != corrupted_ids.shape:
        raise bad_argument(
            "corrupted", f"ids of shape {corrupted_ids.shape}", f"the shape of `clean`, {clean_ids.shape}"
        )
    mask = check_mask(padding_mask, clean_ids.shape)
    return clean_ids, corrupted_ids, mask, resolve_metric(model, metric, answer, counterfactual, mask)
