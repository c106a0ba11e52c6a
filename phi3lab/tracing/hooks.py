"""Interventions: functions that run at hook points inside the compiled trace.

A hook is `fn(x, ctx) -> x | None`: it receives the activation and a
`HookContext` and returns a replacement (or None to leave it unchanged).
`ctx.name` is the full hook name, `ctx.layer` the block index (an int, or
None for model-level names) and `ctx.data` the hook's array data.

Array data (patch sources, steering vectors) travels into the compiled
function as an input, so new values never recompile; `fn` and the hashable
`static` settings are part of the compiled program, so define hook functions
once (not a new lambda per call) to reuse compilations.

The ready-made interventions return `Hooks`, which combine with `|`:

    hooks = ablate_heads(0, [1, 2]) | add("blocks.3.hook_resid_post", v)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import numpy as np
from jax import numpy as jnp

from phi3lab.errors import bad_argument
from phi3lab.tracing.names import block_name


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook function knows about the site it runs at."""

    name: str
    layer: int | None
    data: Any = None
    static: tuple = ()


@dataclasses.dataclass(frozen=True)
class Hook:
    """A hook function with its array `data` and hashable `static` settings.

    Args:
        fn: `fn(x, ctx) -> x | None`.
        data: a pytree of arrays given to `fn` as `ctx.data` (a compiled
            input, not a constant).
        static: hashable settings given as `ctx.static` (part of the
            compiled program).
        check: optional `check(model)` run before compiling, to reject bad
            settings with a clear error.
    """

    fn: Callable
    data: Any = None
    static: tuple = ()
    check: Callable | None = None


class Hooks:
    """An ordered list of `(name_or_pattern, Hook)`; combine with `|`.

    Two hooks on the same site both run, in order.

    Example:
    >>> hooks = Hooks({"blocks.0.hook_resid_post": lambda x, ctx: x * 0})
    >>> hooks = hooks | ablate_heads(1, [0])
    """

    def __init__(self, entries: Iterable | dict = ()):
        if isinstance(entries, dict):
            entries = entries.items()
        self.entries: tuple[tuple[str, Hook], ...] = tuple(
            (pattern, _as_hook(pattern, hook)) for pattern, hook in entries
        )

    def __or__(self, other) -> "Hooks":
        other = other if isinstance(other, Hooks) else Hooks(other)
        return Hooks(self.entries + other.entries)

    def __ror__(self, other) -> "Hooks":
        return Hooks(other) | self

    def __len__(self):
        return len(self.entries)

    def __repr__(self):
        inner = ", ".join(f"{p!r}: {h.fn.__name__}{h.static or ''}" for p, h in self.entries)
        return f"Hooks({{{inner}}})"


def _as_hook(pattern, hook) -> Hook:
    if not isinstance(pattern, str):
        raise TypeError(f"`hooks` keys must be hook names or patterns; received {pattern!r}.")
    if isinstance(hook, Hook):
        return hook
    if callable(hook):
        return Hook(hook)
    raise TypeError(
        f"`hooks[{pattern!r}]` must be a function fn(x, ctx) -> x or a phi3lab.hooks.Hook; "
        f"received {hook!r}."
    )


# === Ready-made interventions ===


def _ablate(z, ctx):
    heads = np.asarray(ctx.static[0])
    mode = ctx.static[1]
    if mode == "zero":
        replacement = jnp.zeros_like(z[:, :, heads])
    else:
        replacement = jnp.broadcast_to(
            jnp.mean(z[:, :, heads], axis=(0, 1), keepdims=True), z[:, :, heads].shape
        )
    return z.at[:, :, heads].set(replacement)


def ablate_heads(layer: int, heads: int | Iterable[int], mode: str = "zero") -> Hooks:
    """Remove query heads' contributions at `layer` (on `attn.hook_z`).

    Grouped-query aware: each query head is ablated alone, leaving the other
    query heads that share its key/value head untouched.

    Args:
        layer: int. Decoder block index.
        heads: an int or a list of query-head indices.
        mode: `"zero"` sets the head's output to 0; `"mean"` replaces it by
            its mean over batch and positions of the same run.

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=ablate_heads(0, [1, 2]))
    """
    heads = (heads,) if isinstance(heads, (int, np.integer)) else tuple(int(h) for h in heads)
    if mode not in ("zero", "mean"):
        raise bad_argument("mode", mode, '"zero" or "mean"')
    if not heads:
        raise bad_argument("heads", heads, "a non-empty list of query-head indices")

    def check(model):
        if not 0 <= layer < model.num_layers:
            raise bad_argument("layer", layer, f"an int in [0, {model.num_layers})")
        bad = [h for h in heads if not 0 <= h < model.num_query_heads]
        if bad:
            raise bad_argument("heads", list(heads), f"query-head indices in [0, {model.num_query_heads})")

    return Hooks({block_name(layer, "attn.hook_z"): Hook(_ablate, static=(heads, mode), check=check)})


def _patch(x, ctx):
    source, positions = ctx.data
    if positions is None:
        return source.astype(x.dtype)
    return x.at[:, positions].set(source[:, positions].astype(x.dtype))


def patch(name: str, source_trace, positions=None) -> Hooks:
    """Replace activation `name` by its value in another run (`source_trace`).

    Args:
        name: a hook name captured in `source_trace` (or a pattern: every
            matching captured name is patched).
        source_trace: a `Trace` of the same shapes.
        positions: None (all positions) or a list/array of positions to
            patch (the position axis is axis 1 for every site but attention
            scores/pattern, where it is the query axis 2).

    Example:
    >>> clean = phi3lab.trace(model, clean_ids)
    >>> tr = phi3lab.trace(model, corrupt_ids, hooks=patch("blocks.0.hook_resid_pre", clean))
    """
    import fnmatch

    matched = fnmatch.filter(source_trace.names, name)
    if not matched:
        raise ValueError(
            f"`name` {name!r} is not captured in `source_trace`; capture it with "
            f"phi3lab.trace(..., names=[{name!r}]). Captured: {source_trace.names[:6]}..."
        )
    index = None if positions is None else jnp.asarray(np.atleast_1d(positions), jnp.int32)
    entries = []
    for site in matched:
        source = jnp.asarray(source_trace[site])
        fn = _patch_queries if site.endswith(("hook_attn_scores", "hook_pattern")) else _patch
        entries.append((site, Hook(fn, data=(source, index))))
    return Hooks(entries)


def _patch_queries(x, ctx):
    source, positions = ctx.data
    if positions is None:
        return source.astype(x.dtype)
    return x.at[:, :, positions].set(source[:, :, positions].astype(x.dtype))


def _add(x, ctx):
    vector, scale = ctx.data
    return x + (scale * vector).astype(x.dtype)


def add(name: str, vector, scale: float = 1.0) -> Hooks:
    """Add `scale * vector` to activation `name` (steering).

    `vector` broadcasts against the activation (e.g. `[D]` for a residual
    stream `[B, T, D]`). Both are compiled inputs: new vectors or scales
    reuse the compiled trace.

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=add("blocks.1.hook_resid_post", v, scale=4.0))
    """
    vector = jnp.asarray(vector)
    if not jnp.issubdtype(vector.dtype, jnp.floating):
        raise bad_argument("vector", vector, "a float array")
    return Hooks({name: Hook(_add, data=(vector, jnp.float32(scale)))})


def query_heads_sharing(model, key_value_head: int) -> list[int]:
    """The query heads that read key/value head `key_value_head`.

    Example:
    >>> query_heads_sharing(model, 0)   # e.g. [0, 1] with 4 query, 2 kv heads
    """
    group = model.num_query_heads // model.num_key_value_heads
    if not 0 <= key_value_head < model.num_key_value_heads:
        raise bad_argument("key_value_head", key_value_head, f"an int in [0, {model.num_key_value_heads})")
    return list(range(key_value_head * group, (key_value_head + 1) * group))


def key_value_head_of(model, query_head: int) -> int:
    """The key/value head that query head `query_head` reads."""
    if not 0 <= query_head < model.num_query_heads:
        raise bad_argument("query_head", query_head, f"an int in [0, {model.num_query_heads})")
    return query_head // (model.num_query_heads // model.num_key_value_heads)
