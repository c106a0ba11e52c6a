"""`phi3lab.trace`: one compiled run that captures and changes activations."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_choice, check_indices, check_positive_int, is_int
from phi3lab.errors import bad_argument
from phi3lab.runtime import compile_cache
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import ForwardFn, as_hooks, forward_fn
from phi3lab.tracing.memory import MemoryEstimate, measure
from phi3lab.tracing.names import Selection, all_names
from phi3lab.tracing.pipeline import padded_length, prepare_inputs
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary


def compiled_count(model) -> int:
    """How many distinct programs `trace` has compiled for `model` (one per
    plan, hook functions and input shapes) and still holds in the compile
    cache. Used to check compile-once reuse."""
    return compile_cache.size(model, "trace")


def compiled_program(
    fn: ForwardFn, args, num_positions: int | None = None, length: int | None = None
) -> compile_cache.Program:
    """The compiled program of `fn.run` for the shapes of `args` (compiled
    ahead of time, so its memory is known before it runs; cached per model,
    plan, hook functions and statics, `num_positions`, for hooked runs of
    padded inputs the real `length` the hooks see, and shapes)."""
    key = ("trace", *fn.program_key(), num_positions, length)
    run = functools.partial(fn.run, num_positions=num_positions, length=length)
    return compile_cache.ahead_of_time(fn.model, key, run, args)


def is_traced(*trees) -> bool:
    """Whether any leaf of `trees` is a JAX tracer (`trace` called inside
    `jax.grad`, `jax.jit`, `jax.vmap`...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def _untransformable(what: str) -> ValueError:
    return ValueError(
        f"phi3lab.trace was called inside a JAX transformation (jax.grad, jax.jit, jax.vmap...) with {what}, "
        "which needs concrete values. Inside transformations use the pure forward, "
        "phi3lab.tracing.forward_fn, or for gradients at hook points phi3lab.gradients:\n"
        "    fn = phi3lab.tracing.forward_fn(model, names='hook_logits', hooks=hooks)\n"
        "    jax.grad(lambda data: fn(model.params(), ids, None, data).logits[0, -1, answer])(fn.hook_data)"
    )


def _traced_inputs(model, inputs, padding_mask, tokenizer):
    """Ids `[B, T]` and a bool mask when the ids or the mask are tracers:
    only their shapes and dtypes can be checked."""
    if tokenizer is not None:
        raise _untransformable("`tokenizer` (display tokens need concrete token ids)")
    ids = jnp.asarray(inputs)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise bad_argument("inputs", ids, "integer token ids of shape [T] or [B, T] with T >= 1")
    if ids.shape[1] > model.max_sequence_length:
        raise bad_argument("inputs", ids, f"at most max_sequence_length={model.max_sequence_length} positions")
    mask = jnp.ones(ids.shape, bool) if padding_mask is None else jnp.asarray(padding_mask)
    mask = mask[None] if mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise bad_argument("padding_mask", mask, f"None or an array of the shape of the ids, {ids.shape}")
    return ids.astype(jnp.int32), mask.astype(bool)


def _traced_run(model, fn: ForwardFn, token_ids, mask, memory_budget) -> Trace:
    """`trace` inside a JAX transformation: the pure forward, unpadded and
    uncompiled (the enclosing transformation compiles it), as a `Trace` of
    tracers."""
    if memory_budget is not None:
        raise _untransformable("`memory_budget` (the guard measures a program compiled outside it)")
    hidden, captures = fn.run(model.params(), token_ids, mask, fn.hook_data)
    with jax.ensure_compile_time_eval():  # the rotary tables depend on the length alone: concrete
        rope = describe_rotary(model.rotary, token_ids.shape[1])
    return _result(fn, captures, hidden, token_ids, mask, None, rope)


def _result(fn: ForwardFn, captures: dict, output, token_ids, mask, tokens, rope) -> Trace:
    """The `Trace` of one run of `fn`: its captures in catalogue order."""
    plan = fn.plan
    return Trace(
        {name: captures[name] for name in all_names(fn.model, opt_in=True) if name in captures},
        token_ids=token_ids,
        padding_mask=mask,
        tokens=tokens,
        output=output,
        rope=rope,
        model=fn.model,
        query_window=plan.query_window,
        attention_heads=plan.attention_heads,
    )


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
    capture_dtype: str | None = None,
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
        capture_dtype: None (float32 attention maps) or `"bfloat16"`: the
            captured `hook_attn_scores` and `hook_pattern` are returned in
            bfloat16, halving their memory (8 bits of mantissa: a relative
            error up to 2**-9 per entry; rows of a pattern sum to 1 within
            about 1e-2). The computation itself is unchanged.

    Returns:
        A `Trace`. The same model, names, hook functions and input shapes
        reuse one compiled program; hook data (patch sources, steering
        vectors) are inputs, so new values do not recompile. Inputs run
        padded on the right (masked) to a length bucket
        (`phi3lab.runtime.compile_cache.bucket_length`: 64, 128, 256, 384, 512, then
        powers of two) and the results are cut back, so prompts of 33, 40
        and 57 tokens share one program; the rotary factors stay those of
        the real length. Hook functions see only the real positions (a
        hooked run compiles per length).

        Inside `jax.grad`, `jax.jit` or `jax.vmap` (tracers among the
        inputs, the mask or the hook data), `trace` runs the pure forward
        (`phi3lab.tracing.forward_fn`) unpadded and uncompiled and returns a
        `Trace` whose arrays are tracers; `tokenizer=` and `memory_budget=`
        need concrete values there and are refused.

    Example:
    ```python
    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    tr = phi3lab.trace(model, "When Mary and John went to the store", tokenizer=tok)
    tr.attention(0, head=1)          # [1, T, T]
    tr.resid(1, "post"), tr.logits, tr.rope.to_pandas()
    steer = lambda s: phi3lab.trace(model, ids, hooks=phi3lab.hooks.add("blocks.1.hook_resid_post", v, scale=s))
    jax.grad(lambda s: steer(s).logits[0, -1, 7])(1.0)   # d logit / d scale
    ```
    """
    pipeline.check_budget(memory_budget)
    if capture_dtype is not None:
        check_choice("capture_dtype", capture_dtype, (None, "bfloat16"))
    hooks = as_hooks(hooks)
    traced = is_traced(inputs, padding_mask, [hook.data for _, hook in hooks.entries])
    if traced:
        token_ids, mask = _traced_inputs(model, inputs, padding_mask, tokenizer)
    else:
        token_ids, mask = prepare_inputs(model, inputs, padding_mask, tokenizer)
        tokens = pipeline.display_tokens(tokenizer, token_ids)
    length = token_ids.shape[1]
    fn = forward_fn(
        model, names, hooks, window=_window(queries, length), heads=_heads(model, heads), capture_dtype=capture_dtype
    )
    if traced:
        return _traced_run(model, fn, token_ids, mask, memory_budget)
    bucket = pipeline.bucket(model, length)
    params = model.params()
    args = (params, jnp.asarray(bucket.pad(token_ids)), jnp.asarray(bucket.pad(mask)), fn.hook_data)
    # Hooks see (and hook data hold) the real positions only.
    run = compiled_program(fn, args, bucket.num_positions, pipeline.hook_length(fn.hooks, bucket))
    pipeline.guard(run, params, memory_budget)
    hidden, captures = run(*args)
    arrays = {name: bucket.unpad(name, np.asarray(value)) for name, value in captures.items()}
    output = np.asarray(hidden)[:, :length]
    return _result(fn, arrays, output, token_ids, mask, tokens, describe_rotary(model.rotary, length))


def estimate(
    model,
    seq_len: int,
    batch: int = 1,
    names: Selection = None,
    queries=None,
    heads=None,
    capture_dtype: str | None = None,
) -> MemoryEstimate:
    """Bytes of weights, working set and captured activations of a trace,
    from XLA's analysis of the compiled program that `trace` runs (at the
    length bucket of `seq_len`, with `capture_dtype`; nothing is allocated).

    Example:
    >>> est = phi3lab.estimate(model, seq_len=4096, names="blocks.0.attn.hook_pattern")
    >>> est.weights, est.working, est.captured
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch", batch)
    if capture_dtype is not None:
        check_choice("capture_dtype", capture_dtype, (None, "bfloat16"))
    if seq_len > model.max_sequence_length:
        raise bad_argument("seq_len", seq_len, f"at most max_sequence_length={model.max_sequence_length}")
    fn = forward_fn(
        model, names, window=_window(queries, seq_len), heads=_heads(model, heads), capture_dtype=capture_dtype
    )
    padded, num_positions = padded_length(model, seq_len)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params())
    ids = jax.ShapeDtypeStruct((batch, padded), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, padded), jnp.bool_)
    return measure(compiled_program(fn, (params, ids, mask, ()), num_positions), params)
