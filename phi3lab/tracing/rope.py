"""The rotary embedding of one run, described as arrays and a table."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from phi3lab.model.rotary import RotarySpec
from phi3lab.runtime import compile_cache


@dataclasses.dataclass(frozen=True)
class RotaryDescription:
    """The rotary embedding exactly as the model applies it to `num_positions`
    positions (built by `describe_rotary` from the model's own `RotarySpec`).

    Attributes:
        num_positions: positions in use (largest position + 1).
        factor_set: `"none"`, `"short"` or `"long"`.
        reason: why that factor set is in force.
        head_dim: size of one attention head.
        rotary_dim: leading dimensions of each head that are rotated; the
            others (`pass_through_dims`) enter attention unrotated.
        factors: per-pair frequency divisors in force `[P]` (P = rotary_dim/2).
        short_factor, long_factor: both "su" lists `[P]` (None without "su").
        inverse_frequencies: radians per token `[P]`.
        wavelengths: tokens per full turn, `2 pi / inverse_frequencies`.
        attention_factor: multiplier of the cos/sin tables.
        cos, sin: tables `[num_positions, rotary_dim]` as applied to the
            rotary dimensions.
        pretraining_sequence_length, max_sequence_length: the context sizes.
    """

    num_positions: int
    factor_set: str
    reason: str
    head_dim: int
    rotary_dim: int
    factors: np.ndarray
    short_factor: np.ndarray | None
    long_factor: np.ndarray | None
    inverse_frequencies: np.ndarray
    wavelengths: np.ndarray
    attention_factor: float
    cos: np.ndarray
    sin: np.ndarray
    pretraining_sequence_length: int
    max_sequence_length: int

    @property
    def pass_through_dims(self) -> range:
        """Head dimensions left unrotated (empty with full rotary)."""
        return range(self.rotary_dim, self.head_dim)

    def to_pandas(self) -> pd.DataFrame:
        """One row per rotary dimension pair: factors, frequency, wavelength,
        and how many turns the pair makes over the positions in use. `attrs`
        names the factor set, the attention factor, `head_dim`,
        `rotary_dim` and the unrotated `pass_through_dims`."""
        pairs = len(self.inverse_frequencies)
        table = pd.DataFrame(
            {
                "pair": np.arange(pairs),
                "dims": [f"{i},{i + pairs}" for i in range(pairs)],
                "factor": self.factors,
                "inverse_frequency": self.inverse_frequencies,
                "wavelength": self.wavelengths,
                "turns_in_context": self.num_positions / self.wavelengths,
                "wavelength_over_pretraining": self.wavelengths / self.pretraining_sequence_length,
            }
        )
        if self.short_factor is not None:
            table.insert(3, "short_factor", self.short_factor)
            table.insert(4, "long_factor", self.long_factor)
        table.attrs.update(
            factor_set=self.factor_set,
            reason=self.reason,
            attention_factor=self.attention_factor,
            head_dim=self.head_dim,
            rotary_dim=self.rotary_dim,
            pass_through_dims=list(self.pass_through_dims),
        )
        return table


def _tables(spec: RotarySpec, num_positions: int):
    """`spec.tables(num_positions)`, computed as a run padded to its length
    bucket computes them (`compile_cache.bucket_length`; the factors of
    `num_positions`) and cut back: one compiled program per (spec, bucket,
    factor set) in the process-wide compile cache, so a new length in a
    known bucket compiles nothing (run eagerly, the tables' eight operations
    compile one by one, 0.1-0.3 s of the first trace of each length). The
    same operations as in the model's program, so the same values."""
    padded = compile_cache.bucket_length(num_positions, spec.max_sequence_length)
    key = ("rope.tables", spec, padded, spec.factor_set(num_positions))
    make = lambda: spec.tables(padded, factor_positions=num_positions)
    cos, sin = compile_cache.ahead_of_time(None, key, make, ())()
    return np.asarray(cos)[:num_positions], np.asarray(sin)[:num_positions]  # on the host: no program per length


def describe_rotary(spec: RotarySpec, num_positions: int) -> RotaryDescription:
    """Describe `spec` applied to positions `0 .. num_positions - 1`."""
    chosen = spec.factor_set(num_positions)
    limit = spec.pretraining_sequence_length
    reason = {
        "none": "no rotary scaling (rope_scaling_type=None)",
        "short": f"largest position + 1 = {num_positions} <= pretraining_sequence_length = {limit}",
        "long": f"largest position + 1 = {num_positions} > pretraining_sequence_length = {limit}",
    }[chosen]
    inverse = spec.inverse_frequencies(num_positions)
    cos, sin = _tables(spec, num_positions)
    as_array = lambda v: None if v is None else np.asarray(v, np.float32)
    return RotaryDescription(
        num_positions=num_positions,
        factor_set=chosen,
        reason=reason,
        head_dim=spec.head_dim,
        rotary_dim=spec.rotary_dim,
        factors=spec.factors(num_positions),
        short_factor=as_array(spec.short_factor),
        long_factor=as_array(spec.long_factor),
        inverse_frequencies=inverse,
        wavelengths=(2 * np.pi / inverse.astype(np.float64)),
        attention_factor=spec.attention_factor,
        cos=np.asarray(cos),
        sin=np.asarray(sin),
        pretraining_sequence_length=limit,
        max_sequence_length=spec.max_sequence_length,
    )


class MixedRotaryWarning(UserWarning):
    """A batch mixes prompts within and beyond the pretraining window, so the
    short ones run with the long rotary factors."""


def warn_mixed_rotary(spec: RotarySpec, padding_mask: np.ndarray) -> None:
    """Warn (`MixedRotaryWarning`) when the rows of a batch of `padding_mask
    [B, T]` would pick other rotary factors if run alone.

    The factors follow the largest position in use, `T` for the whole batch
    (as in transformers), so a row with at most `pretraining_sequence_length`
    real tokens in a longer batch gets the long factors, and its results
    differ from running it alone.
    """
    counts = np.asarray(padding_mask).sum(axis=1)
    length = padding_mask.shape[1]
    if spec.factor_set(length) != "long":
        return
    rows = [int(b) for b in np.flatnonzero((counts > 0) & (counts <= spec.pretraining_sequence_length))]
    if not rows:
        return
    limit = spec.pretraining_sequence_length
    warnings.warn(
        f"Rows {rows} of this batch have {sorted({int(counts[b]) for b in rows})} real tokens, within the "
        f"pretraining window ({limit}), but the batch is {length} positions long, so every row runs with the "
        f"long rotary factors (they follow the largest position in use, as in transformers). Those rows' "
        f"results differ from running them alone, with the short factors. To avoid it, run prompts of at most "
        f"{limit} tokens and longer prompts in separate batches (or give every prompt of a batch more than "
        f"{limit} tokens).",
        MixedRotaryWarning,
        stacklevel=_stacklevel_outside_phi3lab(),
    )


def _stacklevel_outside_phi3lab() -> int:
    """The `warnings.warn` stack level of the first caller outside phi3lab."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
