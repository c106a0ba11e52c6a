"""Ready-made interventions that run at hook points inside the compiled trace:
head ablation, patching from another run, adding a vector, and the
grouped-query helpers. What a hook is (`Hook`, `HookContext`, `Hooks`) lives
in `phi3lab.tracing.hook_types` and is importable from here too.

The ready-made interventions return `Hooks`, which combine with `|`:

    hooks = ablate_heads(0, [1, 2]) | add("blocks.3.hook_resid_post", v)
"""

from __future__ import annotations

import math
from typing import Iterable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_index, is_int
from phi3lab.errors import bad_argument
from phi3lab.model.attention import key_value_heads
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.hook_types import HookContext as HookContext  # re-exported: its import path before hook_types
from phi3lab.tracing.names import block_name

ABLATION_MODES = ("zero", "mean", "resample")


def _ablate(z, ctx):
    """Replace the heads in `ctx.data[0]` (int indices: hook data, so a loop
    over heads reuses one program) by zeros, their mean or a source run."""
    heads, source = ctx.data
    mode = ctx.static[0]
    chosen = jnp.zeros(z.shape[2], bool).at[heads].set(True)[:, None]
    if mode == "zero":
        replacement = jnp.zeros_like(z)
    elif mode == "mean":
        replacement = jnp.broadcast_to(jnp.mean(z, axis=(0, 1), keepdims=True), z.shape)
    else:
        _check_source(z, source, ctx.name, "source")
        replacement = source
    return jnp.where(chosen, replacement.astype(z.dtype), z)


def _head_list(heads) -> tuple[int, ...]:
    if is_int(heads):
        return (int(heads),)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise bad_argument("heads", heads, "an int or a list of int query-head indices")
    heads = tuple(heads)
    if not all(is_int(h) for h in heads):
        raise bad_argument("heads", heads, "an int or a list of int query-head indices")
    if not heads:
        raise bad_argument("heads", heads, "a non-empty list of query-head indices")
    return tuple(int(h) for h in heads)


def _layer_pairs(pairs) -> dict[int, tuple[int, ...]]:
    """`{(layer, head), ...}` grouped as layer -> heads."""
    grouped: dict[int, list[int]] = {}
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and is_int(pair[0]) and is_int(pair[1])):
            raise bad_argument("layer", pairs, "an int layer with `heads`, or a set of (layer, head) pairs")
        grouped.setdefault(int(pair[0]), []).append(int(pair[1]))
    if not grouped:
        raise bad_argument("layer", pairs, "a non-empty set of (layer, head) pairs")
    return {layer: tuple(heads) for layer, heads in grouped.items()}


def _resample_source(source, model, layer: int):
    """The `attn.hook_z` of `layer` in the resample source (a `Trace`, or
    token ids run through `model`)."""
    from phi3lab.tracing.result import Trace

    if not isinstance(source, Trace):
        if model is None:
            raise ValueError(
                '`mode`="resample" needs `source`: a phi3lab.Trace that captured the heads\' attn.hook_z, or '
                f"token ids together with `model=`; received source={source!r:.80}, model=None."
            )
        from phi3lab.tracing.tracer import trace

        source = trace(model, source, names=block_name("*", "attn.hook_z"))
    if not -source.num_layers <= layer < source.num_layers:
        raise bad_argument("layer", layer, f"an int in [{-source.num_layers}, {source.num_layers})")
    name = block_name(layer % source.num_layers, "attn.hook_z")
    if name not in source.names:
        raise bad_argument("source", source, f"a phi3lab.Trace that captured {name!r}")
    return jnp.asarray(source[name])


def ablate_heads(
    layer, heads: int | Iterable[int] | None = None, mode: str = "zero", *, source=None, model=None
) -> Hooks:
    """Remove query heads' contributions (on `attn.hook_z`).

    Grouped-query aware: each query head is ablated alone, leaving the other
    query heads that share its key/value head untouched.

    Args:
        layer: int (a decoder block index) with `heads`, or a set of
            `(layer, head)` pairs (then leave `heads` out): every pair is
            ablated in the same run.
        heads: an int or a list of query-head indices.
        mode: `"zero"` sets the head's output to 0; `"mean"` replaces it by
            its mean over batch and positions of the same run;
            `"resample"` replaces it by the same head's output in another
            run (`source`), same shape.
        source: for `"resample"`, a `Trace` that captured the layers'
            `attn.hook_z`, or token ids (then pass `model=` to run them).
        model: the `Phi3Backbone` to run `source` ids through.

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=ablate_heads(0, [1, 2]))
    >>> tr = phi3lab.trace(model, ids, hooks=ablate_heads({(0, 1), (2, 3)}, mode="mean"))
    >>> tr = phi3lab.trace(model, ids, hooks=ablate_heads(1, 0, mode="resample", source=other_ids, model=model))
    """
    if not isinstance(mode, str) or mode not in ABLATION_MODES:
        raise bad_argument("mode", mode, '"zero", "mean" or "resample"')
    if is_int(layer):
        if heads is None:
            raise bad_argument("heads", heads, "an int or a list of int query-head indices (with an int `layer`)")
        grouped = {int(layer): _head_list(heads)}
    elif isinstance(layer, Iterable) and not isinstance(layer, (str, bytes)) and heads is None:
        grouped = _layer_pairs(layer)
    else:
        raise bad_argument(
            "layer",
            layer,
            "an int (a decoder block index; negative values count from the end) "
            "or, without `heads`, a set of (layer, head) pairs",
        )
    hooks = Hooks()
    for block, chosen in sorted(grouped.items()):
        data = (jnp.asarray(chosen, jnp.int32), _resample_source(source, model, block) if mode == "resample" else None)

        def check(model, block=block, chosen=chosen):
            check_index("layer", block, model.num_layers, "layer")
            for head in chosen:
                check_index("heads", head, model.num_query_heads, "query head")

        hooks = hooks | {block_name(block, "attn.hook_z"): Hook(_ablate, data=data, static=(mode,), check=check)}
    return hooks


def _check_source(x, source, name, argument="source_trace"):
    if source.shape != x.shape:
        raise ValueError(
            f"`{argument}` holds {name!r} with shape {tuple(source.shape)}, but this run's is "
            f"{tuple(x.shape)}: patch from a run of inputs of the same shape."
        )


# Sites with a head axis: local name -> that axis.
HEAD_AXES = {
    "attn.hook_q": 2,
    "attn.hook_rot_q": 2,
    "attn.hook_z": 2,
    "attn.hook_k": 2,
    "attn.hook_rot_k": 2,
    "attn.hook_v": 2,
    "attn.hook_attn_scores": 1,
    "attn.hook_pattern": 1,
}


def _patch(x, ctx):
    """Take `source` where the boolean `chosen` (positions x heads, hook
    data broadcasting against `x`) is True."""
    source, chosen = ctx.data
    _check_source(x, source, ctx.name)
    return jnp.where(chosen, source.astype(x.dtype), x)


def _along(size: int, chosen) -> np.ndarray:
    """A bool `[size]`: True at the `chosen` indices (None: everywhere)."""
    if chosen is None:
        return np.ones(size, bool)
    mask = np.zeros(size, bool)
    mask[list(chosen)] = True
    return mask


def _patch_mask(shape, axis: int, positions, head_axis: int | None, heads) -> np.ndarray:
    """A bool array broadcasting against a site of `shape`: True at the
    chosen `positions` (None: all) along `axis` and `heads` (None: all)
    along `head_axis`. Hook data, so every choice shares one program."""
    mask = np.expand_dims(_along(shape[axis], positions), [a for a in range(len(shape)) if a != axis])
    if head_axis is not None:
        if heads is not None:
            heads = [check_index("heads", head, shape[head_axis], "head") for head in heads]
        mask = mask & np.expand_dims(_along(shape[head_axis], heads), [a for a in range(len(shape)) if a != head_axis])
    return mask


def patch(name: str, source_trace, positions=None, heads=None) -> Hooks:
    """Replace activation `name` by its value in another run (`source_trace`).

    Args:
        name: a hook name captured in `source_trace` (or a pattern: every
            matching captured name is patched).
        source_trace: a `Trace` of the same shapes.
        positions: None (all positions) or a list/array of positions to
            patch (the position axis is axis 1 for every site but attention
            scores/pattern, where it is the query axis 2).
        heads: None (all heads) or a list of heads to patch, on sites with
            a head axis (`attn.hook_q/k/v/z`, rotated q/k, scores and
            pattern); key/value heads for `hook_k`, `hook_v`, `hook_rot_k`.

    Example:
    >>> clean = phi3lab.trace(model, clean_ids)
    >>> tr = phi3lab.trace(model, corrupt_ids, hooks=patch("blocks.0.hook_resid_pre", clean))
    >>> tr = phi3lab.trace(model, corrupt_ids, hooks=patch("blocks.2.attn.hook_z", clean, positions=[-1], heads=[1]))
    """
    import fnmatch

    from phi3lab.tracing.names import split_name
    from phi3lab.tracing.result import Trace

    if not isinstance(name, str):
        raise bad_argument("name", name, "a hook name or glob pattern (a str)")
    if not isinstance(source_trace, Trace):
        raise bad_argument("source_trace", source_trace, "a phi3lab.Trace (from phi3lab.trace(model, ids))")
    matched = fnmatch.filter(source_trace.names, name)
    if not matched:
        raise ValueError(
            f"`name` {name!r} is not captured in `source_trace`; capture it with "
            f"phi3lab.trace(..., names=[{name!r}]). Captured: {source_trace.names[:6]}..."
        )
    index = None
    if positions is not None:
        length = source_trace.token_ids.shape[1]
        try:
            chosen = np.atleast_1d(np.asarray(positions))
        except (TypeError, ValueError):
            chosen = None
        if (
            chosen is None
            or chosen.ndim != 1
            or chosen.size == 0
            or not np.issubdtype(chosen.dtype, np.integer)
            or chosen.min() < -length
            or chosen.max() >= length
        ):
            raise bad_argument("positions", positions, f"None or int positions in [-{length}, {length})")
        index = chosen % length
    if heads is not None:
        heads = _head_list(heads)
        without = [site for site in matched if split_name(site)[1] not in HEAD_AXES]
        if without:
            raise bad_argument("heads", heads, f"None for sites without a head axis (such as {without[0]!r})")
    entries = []
    for site in matched:
        local = split_name(site)[1]
        axis = 2 if local.endswith(("hook_attn_scores", "hook_pattern")) else 1
        head_axis = HEAD_AXES.get(local)
        source = source_trace[site]
        chosen = _patch_mask(source.shape, axis, index, head_axis, heads)
        entries.append((site, Hook(_patch, data=(jnp.asarray(source), jnp.asarray(chosen)))))
    return Hooks(entries)


def _add(x, ctx):
    vector, scale = ctx.data
    try:
        fits = np.broadcast_shapes(x.shape, vector.shape) == x.shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"`vector` of shape {tuple(vector.shape)} does not broadcast against {ctx.name!r} "
            f"of shape {tuple(x.shape)}."
        )
    return x + (scale * vector).astype(x.dtype)


def _is_tracer(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _float_array(name: str, value):
    """`value` as a float JAX array (tracers pass through, so hook data can
    be differentiated), or a clear error naming `name`."""
    if not _is_tracer(value):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError):
            value = None
    if value is None or not jnp.issubdtype(value.dtype, jnp.floating):
        raise bad_argument(name, value, "a float array")
    return jnp.asarray(value)


def _scale(scale):
    """`scale` as a float32 scalar; the finiteness check needs a concrete
    value, so a tracer (under `jax.grad`, `jax.vmap`...) is checked only for
    shape and dtype."""
    if _is_tracer(scale):
        if scale.ndim != 0 or not (
            jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)
        ):
            raise bad_argument("scale", scale, "a finite number (a scalar)")
        return scale.astype(jnp.float32)
    try:
        array = np.asarray(scale)
    except (TypeError, ValueError):
        array = None
    if (
        isinstance(scale, bool)
        or array is None
        or array.ndim != 0
        or not (np.issubdtype(array.dtype, np.integer) or jnp.issubdtype(array.dtype, jnp.floating))
        or not math.isfinite(float(array))
    ):
        raise bad_argument("scale", scale, "a finite number")
    return jnp.float32(array)


def add(name: str, vector, scale: float = 1.0) -> Hooks:
    """Add `scale * vector` to activation `name` (steering).

    `vector` broadcasts against the activation (e.g. `[D]` for a residual
    stream `[B, T, D]`). Both are compiled inputs: new vectors or scales
    reuse the compiled trace. Both may be JAX tracers, so `jax.grad`,
    `jax.jvp` and `jax.vmap` can differentiate or map a run with respect
    to them (see `phi3lab.tracing.forward_fn`).

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=add("blocks.1.hook_resid_post", v, scale=4.0))
    """
    if not isinstance(name, str):
        raise bad_argument("name", name, "a hook name or glob pattern (a str)")
    vector = _float_array("vector", vector)
    scale = _scale(scale)

    def check(model):
        from phi3lab.tracing.names import BLOCK_SITES, MODEL_SITES, all_names, select, site_shape, split_name

        for full in select(name, all_names(model), argument="name"):
            shape = site_shape(model, full, 1, 1)
            symbols = BLOCK_SITES.get(split_name(full)[1]) or MODEL_SITES[full]
            fits = vector.ndim <= len(shape) and all(
                size in (1, want) or symbol in ("B", "T")
                for size, want, symbol in zip(vector.shape[::-1], shape[::-1], symbols[::-1])
            )
            if not fits:
                sizes = ", ".join(s if s in ("B", "T") else str(n) for s, n in zip(symbols, shape))
                raise bad_argument(
                    "vector",
                    f"array of shape {vector.shape}",
                    f"an array that broadcasts against {full!r} of shape [{', '.join(symbols)}] = [{sizes}] "
                    "(B and T are the input's batch size and length)",
                )

    return Hooks({name: Hook(_add, data=(vector, scale), check=check)})


def query_heads_sharing(model, key_value_head: int) -> list[int]:
    """The query heads that read key/value head `key_value_head`.

    Example:
    >>> query_heads_sharing(model, 0)   # e.g. [0, 1] with 4 query, 2 kv heads
    """
    kv = check_index("key_value_head", key_value_head, model.num_key_value_heads, "key/value head")
    owners = key_value_heads(model.num_query_heads, model.num_key_value_heads)
    return np.flatnonzero(owners == kv).tolist()


def key_value_head_of(model, query_head: int) -> int:
    """The key/value head that query head `query_head` reads."""
    head = check_index("query_head", query_head, model.num_query_heads, "query head")
    return int(key_value_heads(model.num_query_heads, model.num_key_value_heads)[head])
