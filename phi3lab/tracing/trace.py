"""`phi3lab.trace`: one compiled run that captures and changes activations."""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.errors import bad_argument
from phi3lab.model.config import check_token_ids
from phi3lab.tracing.hooks import Hook, Hooks
from phi3lab.tracing.memory import MemoryEstimate, check_fits, measure
from phi3lab.tracing.names import Selection, all_names, block_name, select
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary
from phi3lab.tracing.sites import TracePlan, TraceSites

# model -> {(plan, hook functions and statics, input shapes): compiled program}
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_count(model) -> int:
    """How many distinct programs `trace` has compiled for `model` (one per
    plan, hook functions and input shapes). Used to check compile-once reuse."""
    return len(_COMPILED.get(model, {}))


def _compiled(model, plan: TracePlan, hooks: tuple[Hook, ...], args):
    """The compiled trace program for `plan`, `hooks` and the shapes of
    `args` (compiled ahead of time, so its memory is known before it runs)."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
    key = (plan, tuple((h.fn, h.static) for h in hooks), shapes)
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        specs = tuple(Hook(h.fn, None, h.static) for h in hooks)

        def run(params, token_ids, padding_mask, data):
            sites = TraceSites(plan, specs, data)
            hidden, segments = model.apply(params, token_ids, padding_mask, sites)
            return hidden, sites.captured, [captured for _, _, captured in segments]

        cache[key] = jax.jit(run).lower(*args).compile()
    return cache[key]


def _prepare_inputs(model, inputs, padding_mask, tokenizer):
    tokens = None
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, str) for i in inputs)):
        if not hasattr(tokenizer, "encode_batch"):
            raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer when the input is text")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        token_ids, mask = tokenizer.encode_batch(texts)
        if padding_mask is None:
            padding_mask = mask
    else:
        try:
            token_ids = np.asarray(inputs)
        except (TypeError, ValueError):
            raise bad_argument("ids", inputs, "token ids of shape [T] or [B, T] (a rectangular array)") from None
    if token_ids.ndim == 1:
        token_ids = token_ids[None]
    if token_ids.ndim != 2 or token_ids.shape[1] == 0:
        raise bad_argument("ids", f"array of shape {token_ids.shape}", "token ids of shape [T] or [B, T] with T >= 1")
    check_token_ids(token_ids, model.vocabulary_size, "ids")
    length = token_ids.shape[1]
    if length > model.max_sequence_length:
        raise bad_argument("ids", f"{length} positions", f"at most max_sequence_length={model.max_sequence_length} positions")
    if padding_mask is None:
        padding_mask = np.ones(token_ids.shape, bool)
    try:
        padding_mask = np.asarray(padding_mask)
    except (TypeError, ValueError):
        raise bad_argument("padding_mask", padding_mask, f"None or an array of the shape of the ids, {token_ids.shape}") from None
    if padding_mask.ndim == 1:
        padding_mask = padding_mask[None]
    if padding_mask.shape != token_ids.shape:
        raise bad_argument("padding_mask", f"array of shape {padding_mask.shape}", f"the shape of the ids, {token_ids.shape}")
    if not (padding_mask.dtype == bool or np.issubdtype(padding_mask.dtype, np.number)) or not np.isin(padding_mask, (0, 1)).all():
        raise bad_argument("padding_mask", padding_mask, "True/1 for real tokens and False/0 for padding")
    padding_mask = padding_mask.astype(bool)
    if tokenizer is not None:
        tokens = [tokenizer.display_tokens(row) for row in token_ids.tolist()]
    return token_ids.astype(np.int32), padding_mask, tokens


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _window(queries, length: int):
    if queries is None:
        return None
    if isinstance(queries, slice):
        if queries.step not in (None, 1) or not all(v is None or _is_int(v) for v in (queries.start, queries.stop)):
            raise bad_argument("queries", queries, "a slice of int positions with step 1")
        start, stop, _ = queries.indices(length)
    elif isinstance(queries, (tuple, list)) and len(queries) == 2 and all(_is_int(v) for v in queries):
        start, stop = (int(v) for v in queries)
    else:
        raise bad_argument("queries", queries, "None, a slice of query positions, or (start, stop)")
    if not 0 <= start < stop <= length:
        raise bad_argument("queries", queries, f"a non-empty range of query positions within [0, {length})")
    return (start, stop)


def _heads(model, heads):
    if heads is None:
        return None
    if isinstance(heads, (str, bytes)) or not isinstance(heads, (int, np.integer, Iterable)):
        raise bad_argument("heads", heads, f"None, or query-head indices in [0, {model.num_query_heads})")
    chosen = (heads,) if isinstance(heads, (int, np.integer)) else tuple(heads)
    if not chosen or any(
        isinstance(h, bool) or not isinstance(h, (int, np.integer)) or not 0 <= h < model.num_query_heads
        for h in chosen
    ):
        raise bad_argument("heads", heads, f"query-head indices in [0, {model.num_query_heads})")
    return tuple(int(h) for h in chosen)


def _plan(model, names: Selection, hooks: Hooks, window=None, heads=None) -> TracePlan:
    available = all_names(model.num_layers)
    keep = select(names, available)
    hooked: dict[str, list[int]] = {}
    for index, (pattern, hook) in enumerate(hooks.entries):
        if hook.check is not None:
            hook.check(model)
        for name in select(pattern, available, argument="hooks"):
            hooked.setdefault(name, []).append(index)
    if window is not None:
        clash = [n for n in hooked if n.endswith(("hook_attn_scores", "hook_pattern"))]
        if clash:
            raise ValueError(
                f"`hooks` on {clash[:3]} cannot run with a query window (`queries`): the "
                "window reports only some rows of the attention maps. Drop `queries` to hook them."
            )
    return TracePlan(
        keep=frozenset(keep),
        hooked=tuple(sorted((name, tuple(indices)) for name, indices in hooked.items())),
        num_layers=model.num_layers,
        query_window=window,
        attention_heads=heads,
    )


def trace(
    model,
    inputs,
    *,
    padding_mask=None,
    names: Selection = None,
    hooks=None,
    tokenizer=None,
    queries=None,
    heads=None,
    memory_budget: int | None = None,
) -> Trace:
    """Run `model` once, compiled, and return the activations asked for.

    Args:
        model: a `Phi3Backbone`.
        inputs: token ids `[T]` or `[B, T]` (NumPy, JAX or lists), or a
            string / list of strings together with `tokenizer`.
        padding_mask: `[T]` or `[B, T]`, True/1 for real tokens; defaults to
            all real (or the tokenizer's padding for text).
        names: what to keep: None (everything), a name, a glob pattern
            (`"blocks.*.attn.hook_pattern"`), a list of those, or a predicate.
            Only what is selected is returned, so memory follows the request.
        hooks: `{name_or_pattern: fn(x, ctx) -> x | None}` or a `Hooks`
            (from `phi3lab.hooks`); they run inside the compiled program.
        tokenizer: a `Phi3Tokenizer`, for text inputs and token strings.
        queries: None, or a slice / `(start, stop)` of query positions: the
            attention scores and patterns then hold only those rows
            (`[B, H, stop - start, T]`), and long inputs are attended a chunk
            of queries at a time, never materializing every head's `T x T`.
        heads: None, or query heads whose scores/patterns are kept (others
            are dropped from the result).
        memory_budget: bytes the run may use; default the device's free
            memory. The request is refused before running if it needs more
            (`phi3lab.tracing.memory.CaptureTooLarge`, a `ValueError`).

    Returns:
        A `Trace`. The same model, names, hook functions and input shapes
        reuse one compiled program; hook data (patch sources, steering
        vectors) are inputs, so new values do not recompile.

    Example:
    ```python
    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    tr = phi3lab.trace(model, "When Mary and John went to the store", tokenizer=tok)
    tr.attention(0, head=1)          # [1, T, T]
    tr.resid(1, "post"), tr.logits, tr.rope.to_pandas()
    ```
    """
    if memory_budget is not None and (not _is_int(memory_budget) or memory_budget <= 0):
        raise bad_argument("memory_budget", memory_budget, "None or a positive int (bytes)")
    hooks = hooks if isinstance(hooks, Hooks) else Hooks(hooks if hooks is not None else {})
    token_ids, mask, tokens = _prepare_inputs(model, inputs, padding_mask, tokenizer)
    plan = _plan(model, names, hooks, _window(queries, token_ids.shape[1]), _heads(model, heads))
    params = model.params()
    args = (params, jnp.asarray(token_ids), jnp.asarray(mask), tuple(hook.data for _, hook in hooks.entries))
    run = _compiled(model, plan, tuple(hook for _, hook in hooks.entries), args)
    check_fits(measure(run, params), memory_budget)
    hidden, top, segments = run(*args)
    arrays = {name: np.asarray(value) for name, value in top.items()}
    for (start, _), captured in zip(plan.segments(), segments):
        for site, stacked in captured.items():
            stacked = np.asarray(stacked)
            for offset in range(stacked.shape[0]):
                arrays[block_name(start + offset, site)] = stacked[offset]
    ordered = {name: arrays[name] for name in all_names(model.num_layers) if name in arrays}
    return Trace(
        ordered,
        token_ids=token_ids,
        padding_mask=mask,
        tokens=tokens,
        output=np.asarray(hidden),
        rope=describe_rotary(model.rotary, token_ids.shape[1]),
        model=model,
        query_window=plan.query_window,
        attention_heads=plan.attention_heads,
    )


def estimate(model, seq_len: int, batch: int = 1, names: Selection = None, queries=None, heads=None) -> MemoryEstimate:
    """Bytes of weights, working set and captured activations of a trace,
    from XLA's analysis of the compiled program (nothing is allocated).

    Example:
    >>> est = phi3lab.estimate(model, seq_len=4096, names="blocks.0.attn.hook_pattern")
    >>> est.weights, est.working, est.captured
    """
    from phi3lab.errors import check_positive_int

    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    if seq_len > model.max_sequence_length:
        raise bad_argument("seq_len", seq_len, f"at most max_sequence_length={model.max_sequence_length}")
    plan = _plan(model, names, Hooks(), _window(queries, seq_len), _heads(model, heads))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params())
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    return measure(_compiled(model, plan, (), (params, ids, mask, ())), params)
