"""Checks of the backbone's constructor arguments, with clear messages."""

from __future__ import annotations

import math
import numbers

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.model.rotary import SCALING_TYPES


def _check_factors(name: str, factors, length: int) -> tuple[float, ...]:
    if factors is None:
        raise bad_argument(
            name, None, f'a list of {length} positive floats when rope_scaling_type="su"'
        )
    if isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__"):
        raise bad_argument(name, factors, f"a list of {length} positive floats")
    values = list(factors)
    if len(values) != length:
        raise ValueError(
            f"`{name}` must have one factor per rotary dimension pair, "
            f"hidden_dim // num_query_heads // 2 = {length}; received a list "
            f"of length {len(values)}."
        )
    for value in values:
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise bad_argument(
                name, value, f"a list of {length} positive finite floats (bad entry)"
            )
    return tuple(float(v) for v in values)


def check_backbone_arguments(
    vocabulary_size,
    num_layers,
    hidden_dim,
    intermediate_dim,
    num_query_heads,
    num_key_value_heads,
    layer_norm_epsilon,
    dropout,
    max_sequence_length,
    pretraining_sequence_length,
    rope_max_wavelength,
    rope_scaling_type,
    rope_scaling_short_factor,
    rope_scaling_long_factor,
    sliding_window,
) -> dict:
    """Validate `Phi3Backbone`'s arguments; return the normalized rope ones.

    Raises `ValueError`/`TypeError` naming the argument, the value received and
    what is accepted. Returns `{"rope_scaling_type", "rope_scaling_short_factor",
    "rope_scaling_long_factor"}` with `"longrope"` normalized to `"su"` and the
    factors as tuples of floats.
    """
    for name, value in {
        "vocabulary_size": vocabulary_size,
        "num_layers": num_layers,
        "hidden_dim": hidden_dim,
        "intermediate_dim": intermediate_dim,
        "num_query_heads": num_query_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_sequence_length": max_sequence_length,
        "pretraining_sequence_length": pretraining_sequence_length,
    }.items():
        check_positive_int(name, value)
    if hidden_dim % num_query_heads:
        raise ValueError(
            "`hidden_dim` must be divisible by `num_query_heads`; received "
            f"hidden_dim={hidden_dim}, num_query_heads={num_query_heads}."
        )
    head_dim = hidden_dim // num_query_heads
    if head_dim % 2:
        raise ValueError(
            "`hidden_dim // num_query_heads` (the head size) must be even for "
            f"the rotary embedding; received hidden_dim={hidden_dim}, "
            f"num_query_heads={num_query_heads} (head size {head_dim})."
        )
    if num_query_heads % num_key_value_heads:
        divisors = [d for d in range(1, num_query_heads + 1) if num_query_heads % d == 0]
        raise ValueError(
            "`num_query_heads` must be a multiple of `num_key_value_heads`; "
            f"received num_query_heads={num_query_heads}, "
            f"num_key_value_heads={num_key_value_heads}. Accepted "
            f"num_key_value_heads for {num_query_heads} query heads: {divisors}."
        )
    for name, value in {
        "layer_norm_epsilon": layer_norm_epsilon,
        "rope_max_wavelength": rope_max_wavelength,
    }.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise bad_argument(name, value, "a positive finite number")
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not 0.0 <= dropout < 1.0
    ):
        raise bad_argument("dropout", dropout, "a number in [0, 1)")
    if sliding_window is not None:
        check_positive_int("sliding_window", sliding_window)
    if rope_scaling_type not in SCALING_TYPES:
        raise bad_argument(
            "rope_scaling_type", rope_scaling_type, 'None, "su" or "longrope"'
        )
    if rope_scaling_type is None:
        for name, value in {
            "rope_scaling_short_factor": rope_scaling_short_factor,
            "rope_scaling_long_factor": rope_scaling_long_factor,
        }.items():
            if value is not None:
                raise bad_argument(
                    name, value, 'None when rope_scaling_type is None (or set rope_scaling_type="su")'
                )
        return {
            "rope_scaling_type": None,
            "rope_scaling_short_factor": None,
            "rope_scaling_long_factor": None,
        }
    if pretraining_sequence_length == 1 and max_sequence_length > 1:
        raise bad_argument(
            "pretraining_sequence_length", pretraining_sequence_length,
            'at least 2 with rope_scaling_type="su" and max_sequence_length > 1 (the attention '
            "factor divides by its log)",
        )
    return {
        "rope_scaling_type": "su",
        "rope_scaling_short_factor": _check_factors(
            "rope_scaling_short_factor", rope_scaling_short_factor, head_dim // 2
        ),
        "rope_scaling_long_factor": _check_factors(
            "rope_scaling_long_factor", rope_scaling_long_factor, head_dim // 2
        ),
    }
