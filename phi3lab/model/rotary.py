"""Rotary position embedding of Phi-3, with "su" (LongRoPE) scaling.

One place for the rotary formulas: the attention layer applies them, and the
trace and the analysis library describe them with the same functions.

Phi-3 rotates the two halves of the rotary part of each head (`rotate_half`,
not interleaved pairs). The rotary part is the first `rotary_dim` dimensions
(`rotary_dim = int(head_dim * partial_rotary_factor)`: all of them for
Phi-3 and Phi-4, three quarters for Phi-4-mini); the remaining
`head_dim - rotary_dim` dimensions pass through unrotated, as in
transformers. Dimension `i` and `i + rotary_dim / 2` form pair `i`, turned by
the angle `position * inverse_frequency[i]`, with

    inverse_frequency[i] = 1 / (factor[i] * max_wavelength ** (2 i / rotary_dim))

`factor` is all ones without scaling. Under "su" scaling it is the short
factor list while every position in use fits the pretraining window and the
long list beyond it, and the cos/sin tables are multiplied by the attention
factor `sqrt(1 + ln(s) / ln(pretraining_sequence_length))`,
`s = max_sequence_length / pretraining_sequence_length` (1 when `s <= 1`).

The short/long switch is decided by the largest position in use plus one, as
Hugging Face transformers does. keras-hub decides by the length of the chunk
being processed, which differs during cached decoding: a one-token step at
position 5000 of a 4k-pretrained model uses the long factors here (as in the
reference implementation), the short ones in keras-hub.

Cached generation follows transformers' `generate`, which gives at every step
what the uncached forward of the sequence so far gives: while the sequence
fits the pretraining window, every key is rotated with the short factors;
at the step where it first outgrows the window, transformers' Phi-3 drops its
key/value cache and recomputes the whole sequence with the long factors
(`Phi3ForCausalLM.prepare_inputs_for_generation`), and later steps add long
keys to that cache. `phi3lab.generate` rebuilds its cache at the same step
(see `phi3lab.generation`). keras-hub's chunk-length rule instead keeps
short factors for every one-token decode step.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax import numpy as jnp

SCALING_TYPES = (None, "su", "longrope")


@dataclasses.dataclass(frozen=True)
class RotarySpec:
    """The rotary embedding of a Phi-3 model, as data.

    Args:
        head_dim: int. Size of one attention head.
        max_wavelength: float. The base of the geometric frequency ladder.
        scaling_type: `None` or `"su"`.
        short_factor: tuple of floats or None, length `rotary_dim // 2`.
        long_factor: tuple of floats or None, length `rotary_dim // 2`.
        max_sequence_length: int. Longest context the model supports.
        pretraining_sequence_length: int. Context of pretraining.
        rotary_dim: int or None. Leading dimensions of each head that are
            rotated (even, at most `head_dim`); None means all of them.
            Pairs are `rotary_dim // 2`.

    Example:
    >>> spec = RotarySpec(64, 10000.0, None, None, None, 4096, 4096)
    >>> spec.inverse_frequencies(10).shape
    (32,)
    """

    head_dim: int
    max_wavelength: float
    scaling_type: str | None
    short_factor: tuple[float, ...] | None
    long_factor: tuple[float, ...] | None
    max_sequence_length: int
    pretraining_sequence_length: int
    rotary_dim: int | None = None

    def __post_init__(self):
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2

    @property
    def pass_through_dims(self) -> range:
        """Dimensions of each head left unrotated (empty with full rotary)."""
        return range(self.rotary_dim, self.head_dim)

    @staticmethod
    def su_attention_factor(max_sequence_length: int, pretraining_sequence_length: int) -> float:
        """`sqrt(1 + ln(s) / ln(pretraining))`, `s = max / pretraining`, or 1
        when `s <= 1`: the "su" multiplier of the cos/sin tables."""
        scale = max_sequence_length / pretraining_sequence_length
        if scale <= 1.0:
            return 1.0
        return math.sqrt(1.0 + math.log(scale) / math.log(pretraining_sequence_length))

    @property
    def attention_factor(self) -> float:
        """Multiplier of the cos/sin tables (1.0 without "su" scaling)."""
        if self.scaling_type is None:
            return 1.0
        return self.su_attention_factor(self.max_sequence_length, self.pretraining_sequence_length)

    def factor_set(self, num_positions: int) -> str:
        """`"none"`, `"short"` or `"long"`: the factors in force when the
        largest position in use is `num_positions - 1`."""
        if self.scaling_type is None:
            return "none"
        if num_positions > self.pretraining_sequence_length:
            return "long"
        return "short"

    def factors(self, num_positions: int) -> np.ndarray:
        """The per-pair frequency divisors in force, float32 `[rotary_dim/2]`."""
        chosen = self.factor_set(num_positions)
        if chosen == "none":
            return np.ones(self.num_pairs, np.float32)
        values = self.long_factor if chosen == "long" else self.short_factor
        return np.asarray(values, np.float32)

    def inverse_frequencies(self, num_positions: int) -> np.ndarray:
        """Radians per token for each dimension pair, float32 `[rotary_dim/2]`."""
        exponent = np.arange(0, self.rotary_dim, 2).astype(np.float32) / np.float32(self.rotary_dim)
        base = np.float32(self.max_wavelength) ** exponent
        return (np.float32(1.0) / (self.factors(num_positions) * base)).astype(np.float32)

    def tables(self, num_positions: int, start: int = 0, factor_positions: int | None = None):
        """cos and sin tables `[num_positions - start, rotary_dim]` (float32).

        Rows are positions `start, ..., num_positions - 1`; both halves of
        the rotary part share the pair's angle. The attention factor is applied.
        The factors in force follow `factor_positions` (default
        `num_positions`): inputs padded to a longer length keep the factors
        of their real length.
        """
        chosen = num_positions if factor_positions is None else factor_positions
        inverse = jnp.asarray(self.inverse_frequencies(chosen))
        positions = jnp.arange(start, num_positions, dtype=jnp.float32)
        angles = positions[:, None] * inverse[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        scale = jnp.float32(self.attention_factor)
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale

    def tables_at(self, positions):
        """cos and sin tables `[B, n, rotary_dim]` for int `positions [B, n]`
        (each row its own positions, e.g. left-padded prompts), float32.

        The factors follow the largest position in the array (which may be a
        traced value), as `tables(max(positions) + 1)` would choose them.
        """
        positions = jnp.asarray(positions)
        num_positions = jnp.max(positions) + 1
        inverse = jnp.where(
            num_positions > self.pretraining_sequence_length,
            jnp.asarray(self.inverse_frequencies(self.pretraining_sequence_length + 1)),
            jnp.asarray(self.inverse_frequencies(1)),
        )
        angles = positions.astype(jnp.float32)[..., None] * inverse
        angles = jnp.concatenate([angles, angles], axis=-1)
        scale = jnp.float32(self.attention_factor)
        return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rotary(x, cos, sin):
    """Rotate `x` `[batch, seq, heads, head_dim]` by tables `[seq, rotary_dim]`
    (shared by the batch) or `[batch, seq, rotary_dim]` (per row).

    The first `rotary_dim` dimensions (the tables' width) become
    `x * cos + rotate_half(x) * sin` in `x`'s dtype, where
    `rotate_half([a, b]) = [-b, a]` over their two halves; the remaining
    dimensions are returned unchanged (partial rotary).
    """
    rotary_dim = cos.shape[-1]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    part, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = jnp.split(part, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return jnp.concatenate([part * cos + rotated * sin, passed], axis=-1)
