"""`phi3lab.trace`: one compiled run that captures and changes activations."""

from __future__ import annotations

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab import compile_cache
from phi3lab.checks import check_ids, check_indices, check_mask, check_positive_int, is_int
from phi3lab.errors import bad_argument
from phi3lab.tracing.forward import ForwardFn, as_hooks, forward_fn
from phi3lab.tracing.memory import MemoryEstimate, check_fits, measure
from phi3lab.tracing.names import Selection, all_names, block_name
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary


def compiled_count(model) -> int:
    """How many distinct programs `trace` has compiled for `model` (one per
    plan, hook functions and input shapes) and still holds in the compile
    cache. Used to check compile-once reuse."""
    return compile_cache.size(model, "trace")


def compiled_program(fn: ForwardFn, args):
    """The compiled program of `fn.run` for the shapes of `args` (compiled
    ahead of time, so its memory is known before it runs; cached per model,
    plan, hook functions and statics, and shapes)."""
    leaves, treedef = jax.tree.flatten(args)
    shapes = (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
    key = ("trace", fn.plan, tuple((h.fn, h.static) for h in fn.hooks), shapes)
    return compile_cache.cached(fn.model, key, lambda: jax.jit(fn.run).lower(*args).compile())


def _prepare_inputs(model, inputs, padding_mask, tokenizer):
    """Ids `[B, T]` int32, a bool mask and display tokens (with a tokenizer)."""
    texts = None
    if isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, str) for i in inputs):
        texts = list(inputs)
    if texts is not None:
        if not hasattr(tokenizer, "encode_batch"):
            raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer when the input is text")
        inputs, mask = tokenizer.encode_batch(texts)
        padding_mask = mask if padding_mask is None else padding_mask
    token_ids = check_ids("ids", inputs, model)
    mask = check_mask(padding_mask, token_ids.shape)
    tokens = None if tokenizer is None else [tokenizer.display_tokens(row) for row in token_ids.tolist()]
    return token_ids, mask, tokens


def _window(queries, length: int):
    if queries is None:
        return None
    if isinstance(queries, slice):
        if queries.step not in (None, 1) or not all(v is None or is_int(v) for v in (queries.start, queries.stop)):
            raise bad_argument("queries", queries, "a slice of int positions with step 1")
        start, stop, _ = queries.indices(length)
    elif isinstance(queries, (tuple, list)) and len(queries) == 2 and all(is_int(v) for v in queries):
        start, stop = (int(v) for v in queries)
    else:
        raise bad_argument("queries", queries, "None, a slice of query positions, or (start, stop)")
    if not 0 <= start < stop <= length:
        raise bad_argument("queries", queries, f"a non-empty range of query positions within [0, {length})")
    return (start, stop)


def _heads(model, heads):
    return None if heads is None else check_indices("heads", heads, model.num_query_heads, "query head")


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
    if memory_budget is not None and (not is_int(memory_budget) or memory_budget <= 0):
        raise bad_argument("memory_budget", memory_budget, "None or a positive int (bytes)")
    token_ids, mask, tokens = _prepare_inputs(model, inputs, padding_mask, tokenizer)
    fn = forward_fn(model, names, as_hooks(hooks), window=_window(queries, token_ids.shape[1]), heads=_heads(model, heads))
    params = model.params()
    args = (params, jnp.asarray(token_ids), jnp.asarray(mask), fn.hook_data)
    run = compiled_program(fn, args)
    check_fits(measure(run, params), memory_budget)
    hidden, top, segments = run(*args)
    plan = fn.plan
    arrays = {name: np.asarray(value) for name, value in top.items()}
    for (start, _), captured in zip(plan.segments(), segments):
        for site, stacked in captured.items():
            stacked = np.asarray(stacked)
            for offset in range(stacked.shape[0]):
                arrays[block_name(start + offset, site)] = stacked[offset]
    ordered = {name: arrays[name] for name in all_names(model) if name in arrays}
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
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    if seq_len > model.max_sequence_length:
        raise bad_argument("seq_len", seq_len, f"at most max_sequence_length={model.max_sequence_length}")
    fn = forward_fn(model, names, window=_window(queries, seq_len), heads=_heads(model, heads))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params())
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_)
    return measure(compiled_program(fn, (params, ids, mask, ())), params)
