"""Hook points that capture and intervene: the tracer's side of the protocol
in `phi3lab.model.hook_points`."""

from __future__ import annotations

import dataclasses

import jax
from jax import numpy as jnp

from phi3lab.model.hook_points import HookPoints
from phi3lab.tracing.hook_types import Hook, HookContext
from phi3lab.tracing.names import block_name, position_index, split_name

ATTENTION_MAPS = ("attn.hook_attn_scores", "attn.hook_pattern")

#: What JAX raises when Python code asks a traced value for a concrete one.
_CONCRETE_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


class HookTracingError(TypeError):
    """A hook function did Python-side work on a traced value."""


def _call_hook(hook: Hook, x, ctx: HookContext):
    """`hook.fn(x, ctx)`, with JAX's errors about concrete values explained
    in terms of the hook."""
    try:
        return hook.fn(x, ctx)
    except _CONCRETE_VALUE_ERRORS as error:
        fn = getattr(hook.fn, "__qualname__", None) or repr(hook.fn)
        raise HookTracingError(
            f"The hook {fn} on {ctx.name!r} needs a concrete value of a traced array "
            f"({type(error).__name__}). Hooks run inside a compiled program (jax.jit): `x` (shape "
            f"{tuple(x.shape)}, {x.dtype}) and `ctx.data` are tracers, stand-ins without values, so Python "
            "cannot turn them into numbers or decide on them: float(x), int(x), `if x > 0:`, np.asarray(x) "
            "and x.item() fail, and print(x) shows the tracer. Write the hook with `jnp` operations "
            "(jnp.where(x > 0, a, b) instead of `if`), print values with jax.debug.print('{}', x), or run "
            "Python on them with jax.debug.callback(fn, x)."
        ) from error


@dataclasses.dataclass(frozen=True)
class TracePlan:
    """What a trace keeps and which hooks run where (static, hashable).

    Attributes:
        keep: names whose values are returned.
        hooked: name -> indices into the hook list, in order.
        num_layers: depth of the model.
        query_window: `(start, stop)` rows of the attention maps kept, or None.
        attention_heads: query heads of the attention maps kept, or None.
        capture_dtype: None (captures keep the computation's dtype) or
            `"bfloat16"` for the captured attention scores and patterns.
    """

    keep: frozenset
    hooked: tuple  # ((name, (entry indices...)), ...)
    num_layers: int
    query_window: tuple | None = None  # (start, stop) rows of scores/pattern
    attention_heads: tuple | None = None  # query heads of scores/pattern kept
    capture_dtype: str | None = None  # dtype of captured scores/pattern

    def hooks_at(self, name: str) -> tuple:
        return dict(self.hooked).get(name, ())

    def alone_layers(self) -> frozenset:
        """The layers that run on their own rather than in a scan: a layer
        with a hook (so hooks see an int `ctx.layer`) and a layer that
        captures (so its captures leave the program as arrays of their own;
        a scan would zero-fill one `[n_layers, ...]` buffer per name and then
        write it, and on CPU buffers that large are mapped fresh, page by
        page, on every call, which cost more than the forward's attention at
        T=512)."""
        names = [*self.keep, *(name for name, _ in self.hooked)]
        return frozenset(layer for layer, _ in map(split_name, names) if layer is not None)

    def segments(self) -> list[tuple[int, int]]:
        """Consecutive layer ranges `(start, stop)`: each of `alone_layers`
        by itself, and every run of the other layers as one scanned block."""
        alone = self.alone_layers()
        ranges, start = [], 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or layer in alone or start in alone:
                ranges.append((start, layer))
                start = layer
        return ranges


def _write_back(x, value):
    """`x` with its leading corner (the real positions) replaced by `value`,
    axis by axis with concatenations (the rest is padding)."""
    for axis in range(x.ndim):
        if value.shape[axis] != x.shape[axis]:
            rest = jax.lax.slice_in_dim(x, value.shape[axis], x.shape[axis], axis=axis)
            index = tuple(slice(0, n) if a != axis else slice(None) for a, n in enumerate(value.shape))
            value = jnp.concatenate([value, rest[index]], axis=axis)
    return value


class TraceSites(HookPoints):
    """Runs the plan's hooks and records the kept values.

    Args:
        plan: the `TracePlan`.
        hooks: the `Hook`s the plan's indices refer to.
        data: each hook's (traced) data, in the same order.
        prefix_layer: None for model-level sites; for a block's sites, the
            first layer of its range (names resolve against it).
        length: None, or the real length of inputs padded on the right:
            hooks then see (and return) only the first `length` positions.
        captured: the dict kept values go to, by full name (a block's
            sites share their model's).
        seen: the dict of hooked sites' values (after their hooks) so far
            in this run, by full name, shared the same way; hooks read it
            as `ctx.seen`.
    """

    def __init__(
        self,
        plan: TracePlan,
        hooks: tuple[Hook, ...],
        data: tuple,
        prefix_layer: int | None = None,
        length: int | None = None,
        captured: dict | None = None,
        seen: dict | None = None,
    ):
        super().__init__()
        if captured is not None:
            self.captured = captured
        self.seen = {} if seen is None else seen
        self.plan = plan
        self.hooks = hooks
        self.data = data
        self.prefix_layer = prefix_layer
        self.length = length
        self.query_window = plan.query_window

    def _full(self, name: str) -> str:
        return name if self.prefix_layer is None else block_name(self.prefix_layer, name)

    def wants(self, name: str) -> bool:
        full = self._full(name)
        return full in self.plan.keep or bool(self.plan.hooks_at(full))

    def __call__(self, name: str, x):
        full = self._full(name)
        indices = self.plan.hooks_at(full)
        if indices:
            real = None if self.length is None else position_index(name, self.length)
            value = x if real is None else x[real]
            for index in indices:
                hook = self.hooks[index]
                layer, _ = split_name(full)
                result = _call_hook(hook, value, HookContext(full, layer, self.data[index], hook.static, self.seen))
                if result is not None:
                    if result.shape != value.shape:
                        raise ValueError(
                            f"The hook on {full!r} returned shape {result.shape}; it must "
                            f"return the activation's shape {value.shape} (or None)."
                        )
                    value = result.astype(x.dtype)
            self.seen[full] = value
            x = value if real is None else _write_back(x, value)
        if full in self.plan.keep:
            self.captured[full] = self._as_captured(name, x)
        return x

    def _as_captured(self, name: str, x):
        """The value kept for `name`: attention maps reduced to the plan's
        heads and cast to its `capture_dtype`; everything else as computed."""
        if name not in ATTENTION_MAPS:
            return x
        if self.plan.attention_heads is not None:
            x = x[:, list(self.plan.attention_heads)]
        if self.plan.capture_dtype is not None:
            x = x.astype(self.plan.capture_dtype)
        return x

    def segments(self, num_layers: int) -> list[tuple[int, int]]:
        return self.plan.segments()

    def block(self, start: int) -> "TraceSites":
        # Every layer of a range shares the signature of its first layer, and
        # hooked layers are ranges of one, so names resolve against `start`.
        return TraceSites(self.plan, self.hooks, self.data, start, self.length, self.captured, self.seen)
