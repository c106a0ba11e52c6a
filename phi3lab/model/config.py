"""The backbone's constructor arguments, in one table, with their checks.

`BackboneConfig` is the single description of `Phi3Backbone`'s arguments:
their names, order and defaults (the constructor's signature is built from
it), their validation (clear messages naming the argument), the attributes
the backbone exposes, `get_config()`, and the lists the preset formats read
and write. Adding an argument means adding one field here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from typing import ClassVar

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.model.rotary import SCALING_TYPES, RotarySpec

QUANTIZATION_MODES = (None, "int8")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _check_factors(name: str, factors, length: int) -> tuple[float, ...]:
    accepted = f'a list of {length} positive floats (one per rotary dimension pair) when rope_scaling_type="su"'
    if factors is None or isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__"):
        raise bad_argument(name, factors, accepted)
    values = list(factors)
    if len(values) != length:
        raise ValueError(
            f"`{name}` must have one factor per rotary dimension pair, rotary_dim // 2 = {length} "
            "(rotary_dim = int(hidden_dim // num_query_heads * partial_rotary_factor)); received a list "
            f"of length {len(values)}."
        )
    for value in values:
        if not _is_real(value) or value <= 0:
            raise bad_argument(name, value, f"a list of {length} positive finite floats (bad entry)")
    return tuple(float(v) for v in values)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """The architecture of a Phi-3 family model, validated.

    Fields are `Phi3Backbone`'s constructor arguments (see its docstring) in
    keras-hub's order, followed by phi3lab's additions. Construction checks
    every value and normalizes the rotary ones (`"longrope"` is stored as
    `"su"`, factor lists as tuples of floats).

    Example:
    >>> config = BackboneConfig(100, 2, 32, 64, 4, 2, partial_rotary_factor=0.5)
    >>> config.head_dim, config.rotary_dim
    (8, 4)
    """

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    intermediate_dim: int
    num_query_heads: int
    num_key_value_heads: int
    layer_norm_epsilon: float = 1e-6
    dropout: float = 0.0
    max_sequence_length: int = 4096
    pretraining_sequence_length: int = 4096
    rope_max_wavelength: float = 10000
    rope_scaling_type: str | None = None
    rope_scaling_short_factor: tuple[float, ...] | None = None
    rope_scaling_long_factor: tuple[float, ...] | None = None
    # phi3lab's additions (keras-hub's Phi3Backbone has none of these).
    sliding_window: int | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    quantization: str | None = None

    # Arguments keras-hub does not know: its preset format carries them
    # only when they differ from the default.
    EXTENSIONS: ClassVar[tuple[str, ...]] = (
        "sliding_window",
        "partial_rotary_factor",
        "tie_word_embeddings",
        "quantization",
    )

    def __post_init__(self):
        for name in (
            "vocabulary_size",
            "num_layers",
            "hidden_dim",
            "intermediate_dim",
            "num_query_heads",
            "num_key_value_heads",
            "max_sequence_length",
            "pretraining_sequence_length",
        ):
            check_positive_int(name, getattr(self, name))
        if self.hidden_dim % self.num_query_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_query_heads`; received "
                f"hidden_dim={self.hidden_dim}, num_query_heads={self.num_query_heads}."
            )
        if self.num_query_heads % self.num_key_value_heads:
            heads = self.num_query_heads
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`; "
                f"received num_query_heads={heads}, num_key_value_heads={self.num_key_value_heads}. "
                f"Accepted num_key_value_heads for {heads} query heads: {divisors}."
            )
        for name in ("layer_norm_epsilon", "rope_max_wavelength"):
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise bad_argument(name, value, "a positive finite number")
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise bad_argument("dropout", self.dropout, "a number in [0, 1)")
        if self.sliding_window is not None:
            check_positive_int("sliding_window", self.sliding_window)
        if not isinstance(self.tie_word_embeddings, bool):
            raise bad_argument("tie_word_embeddings", self.tie_word_embeddings, "True or False")
        if self.quantization not in QUANTIZATION_MODES:
            raise bad_argument("quantization", self.quantization, 'None or "int8"')
        self._check_rotary()

    def _check_rotary(self):
        factor = self.partial_rotary_factor
        if not _is_real(factor) or not 0.0 < factor <= 1.0:
            raise bad_argument("partial_rotary_factor", factor, "a number in (0, 1]")
        rotary_dim = self.rotary_dim
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                "The rotary part of each head, int(head_dim * partial_rotary_factor), must be even and at "
                f"least 2; received head_dim={self.head_dim} (hidden_dim={self.hidden_dim} // "
                f"num_query_heads={self.num_query_heads}) and partial_rotary_factor={factor}, "
                f"which give {rotary_dim}."
            )
        if self.rope_scaling_type not in SCALING_TYPES:
            raise bad_argument("rope_scaling_type", self.rope_scaling_type, 'None, "su" or "longrope"')
        set_ = lambda name, value: object.__setattr__(self, name, value)
        if self.rope_scaling_type is None:
            for name in ("rope_scaling_short_factor", "rope_scaling_long_factor"):
                if getattr(self, name) is not None:
                    raise bad_argument(
                        name, getattr(self, name), 'None when rope_scaling_type is None (or set rope_scaling_type="su")'
                    )
            return
        if self.pretraining_sequence_length == 1 and self.max_sequence_length > 1:
            raise bad_argument(
                "pretraining_sequence_length",
                self.pretraining_sequence_length,
                'at least 2 with rope_scaling_type="su" and max_sequence_length > 1 (the attention '
                "factor divides by its log)",
            )
        set_("rope_scaling_type", "su")
        for name in ("rope_scaling_short_factor", "rope_scaling_long_factor"):
            set_(name, _check_factors(name, getattr(self, name), rotary_dim // 2))

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_query_heads

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each query/key head that are rotated (the first
        ones); the rest pass through unchanged, as in transformers' Phi-3."""
        return int(self.head_dim * self.partial_rotary_factor)

    def rotary_spec(self) -> RotarySpec:
        return RotarySpec(
            head_dim=self.head_dim,
            max_wavelength=float(self.rope_max_wavelength),
            scaling_type=self.rope_scaling_type,
            short_factor=self.rope_scaling_short_factor,
            long_factor=self.rope_scaling_long_factor,
            max_sequence_length=self.max_sequence_length,
            pretraining_sequence_length=self.pretraining_sequence_length,
            rotary_dim=self.rotary_dim,
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every argument name, in constructor order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """Plain JSON-able values (factor tuples as lists), as `get_config` writes them."""
        as_list = lambda v: list(v) if isinstance(v, tuple) else v
        return {name: as_list(getattr(self, name)) for name in self.names()}

    def keras_hub_dict(self) -> dict:
        """`to_dict()` without the extensions that are at their default, so
        keras-hub can read what phi3lab writes whenever the model is one it knows."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        return {
            name: value
            for name, value in self.to_dict().items()
            if name not in self.EXTENSIONS or value != defaults[name]
        }

    @classmethod
    def constructor_signature(cls) -> inspect.Signature:
        """`Phi3Backbone.__init__`'s signature: `self`, the fields, with
        `dtype` where keras-hub's constructor has it (after the rotary
        factors), then `**kwargs` for Keras' layer arguments."""
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        fields = [
            inspect.Parameter(field.name, kind, default=field.default)
            if field.default is not dataclasses.MISSING
            else inspect.Parameter(field.name, kind)
            for field in dataclasses.fields(cls)
        ]
        at = [p.name for p in fields].index("rope_scaling_long_factor") + 1
        return inspect.Signature(
            [inspect.Parameter("self", kind)]
            + fields[:at]
            + [inspect.Parameter("dtype", kind, default=None)]
            + fields[at:]
            + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        )
