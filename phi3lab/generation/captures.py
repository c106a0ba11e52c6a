"""Per-step captures of a generation, put together as one `Trace`.

Each compiled step reports the activations of its own positions (a prefill:
the prompt; a decode step: one new token) and attention rows over every
cache slot. Concatenated along the position axis and cut to the final
sequence, they have the shapes `phi3lab.trace` gives for that sequence.
"""

from __future__ import annotations

import numpy as np

from phi3lab.tracing.names import (
    BLOCK_SITES,
    MODEL_SITES,
    site_shape,
    split_name,
)
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary


def _axes(name: str) -> tuple[int, int | None]:
    """(position axis, key axis or None) of `name` in the catalogue."""
    _, site = split_name(name)
    symbols = BLOCK_SITES.get(site) or MODEL_SITES[site]
    positions = [i for i, s in enumerate(symbols) if s == "T"]
    return positions[0], (positions[1] if len(positions) > 1 else None)


class StepCaptures:
    """Collects what each step captured, by hook name, on the host.

    Args:
        plan: the steps' `TracePlan` (nothing is recorded when it keeps
            nothing).
    """

    def __init__(self, plan):
        self.plan = plan
        self.steps: list[tuple[int, dict]] = []

    def reset(self) -> None:
        """Forget every step (the cache was rebuilt from the start)."""
        self.steps = []

    def add(self, rows: int, captures: dict) -> None:
        """Record a step whose first `rows` positions are real, from its
        captures by name."""
        if not self.plan.keep:
            return
        self.steps.append((rows, {name: np.asarray(value) for name, value in captures.items()}))

    def arrays(self, length: int, order: list[str]) -> dict:
        """Every name's activations over positions `0 .. length - 1`."""
        out = {}
        for name in order:
            if not self.steps or name not in self.steps[0][1]:
                continue
            position_axis, key_axis = _axes(name)
            parts = []
            for rows, arrays in self.steps:
                part = np.take(arrays[name], np.arange(rows), axis=position_axis)
                if key_axis is not None:
                    part = np.take(part, np.arange(length), axis=key_axis)
                parts.append(part)
            out[name] = np.take(np.concatenate(parts, axis=position_axis), np.arange(length), axis=position_axis)
        return out


def row_trace(arrays: dict, row: int, start: int, stop: int, *, token_ids, tokens, model, prompt_length) -> Trace:
    """The `Trace` of batch row `row`, positions `start .. stop - 1` (its
    own tokens, left padding dropped), as if that row had run alone."""
    cut = {}
    for name, value in arrays.items():
        position_axis, key_axis = _axes(name)
        value = value[row : row + 1]
        value = np.take(value, np.arange(start, stop), axis=position_axis)
        if key_axis is not None:
            value = np.take(value, np.arange(start, stop), axis=key_axis)
        cut[name] = value
    length = stop - start
    return Trace(
        cut,
        token_ids=np.asarray(token_ids, np.int32)[None],
        padding_mask=np.ones((1, length), bool),
        tokens=None if tokens is None else [tokens],
        output=cut.get("ln_final.hook_normalized"),
        rope=describe_rotary(model.rotary, length),
        model=model,
        prompt_length=prompt_length,
    )


def captured_bytes(model, names, batch: int, length: int) -> int:
    """Host bytes of `names` over a `[batch, length]` sequence (float32)."""
    return sum(4 * int(np.prod(site_shape(model, name, batch, length))) for name in names)
