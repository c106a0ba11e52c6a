"""Which computation of attention a compiled program runs: a frozen value.

Every path gives `Phi3Attention.attend`'s result (tests/test_attention_paths.py);
they differ only in speed and memory. The choice is read while a program is
traced, so it is an immutable value that `Phi3Backbone.apply` passes down to
every attention layer, and the model's own value (`model.attention_paths`)
is part of every compile-cache key: replacing it compiles new programs, and
setting it back finds the old ones again.
"""

from __future__ import annotations

import dataclasses
import warnings

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument


@dataclasses.dataclass(frozen=True)
class AttentionPaths:
    """How attention is computed when no attention map is reported (the plain
    forward, a trace with a query window, a prefill).

    Args:
        fused: bool. Run flash attention where there is one (cuDNN, 16-bit,
            GPU), else the causal blocks. False: always the explicit scores
            -> softmax -> z of `Phi3Attention.attend` over every key (long
            inputs still run in chunks).
        causal_block: positive int. Queries per block of the causal-block
            path, each block over the keys up to its last query (the last
            block may be shorter). On CPU, blocks of 256 ran the 12-layer
            benchmark model's plain forward 3-4% faster than blocks of
            max(64, T / 8) at T=256, 512 and 1024, and than 128 or 512
            (`benchmarks/forward.py --causal-blocks`).
        query_chunk_size: positive int. Inputs longer than twice this many
            tokens are attended this many queries against this many keys at
            a time, with a running softmax (bounded memory).

    Example:
    ```python
    model.attention_paths = phi3lab.model.AttentionPaths(fused=False)
    model.attention_paths = dataclasses.replace(model.attention_paths, causal_block=128)
    ```
    """

    fused: bool = True
    causal_block: int = 256
    query_chunk_size: int = 512

    def __post_init__(self):
        if not isinstance(self.fused, bool):
            raise bad_argument("fused", self.fused, "True or False")
        for name in ("causal_block", "query_chunk_size"):
            object.__setattr__(self, name, check_positive_int(name, getattr(self, name)))


DEFAULT_PATHS = AttentionPaths()


def check_attention_paths(name: str, value) -> AttentionPaths:
    """`value` if it is an `AttentionPaths`, else a clear error naming `name`."""
    if not isinstance(value, AttentionPaths):
        raise bad_argument(
            name, value, "a phi3lab.model.AttentionPaths, e.g. AttentionPaths(fused=True, causal_block=256)"
        )
    return value


def deprecated_attribute(old: str, field: str) -> property:
    """A property for the mutable attribute `old` that attention layers had
    before `AttentionPaths` (kept one release): reading or setting it warns,
    naming the new form, and reads or replaces the layer's `attention_paths`."""
    message = (
        f"`Phi3Attention.{old}` is deprecated and will be removed in the next release; the attention paths are "
        f"one frozen value now: `model.attention_paths = dataclasses.replace(model.attention_paths, {field}=...)` "
        "(phi3lab.model.AttentionPaths)."
    )

    def get(layer):
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(layer.attention_paths, field)

    def set_(layer, value):
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        layer.attention_paths = dataclasses.replace(layer.attention_paths, **{field: value})

    return property(get, set_, doc=f"Deprecated: `attention_paths.{field}`.")
