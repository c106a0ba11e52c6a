"""`phi3lab.trace`: one compiled run that captures and changes activations."""

from __future__ import annotations

import weakref

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.errors import bad_argument
from phi3lab.model.config import check_token_ids
from phi3lab.tracing.hooks import Hook, Hooks
from phi3lab.tracing.names import Selection, all_names, block_name, select
from phi3lab.tracing.result import Trace
from phi3lab.tracing.rope import describe_rotary
from phi3lab.tracing.sites import TracePlan, TraceSites

# model -> {(plan, hook functions and statics): jitted function}
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_count(model) -> int:
    """How many distinct programs `trace` has compiled for `model` (each
    counted once per input shape). Used to check compile-once reuse."""
    return sum(fn._cache_size() for fn in _COMPILED.get(model, {}).values())


def _compiled(model, plan: TracePlan, hooks: tuple[Hook, ...]):
    key = (plan, tuple((h.fn, h.static) for h in hooks))
    cache = _COMPILED.setdefault(model, {})
    if key not in cache:
        specs = tuple(Hook(h.fn, None, h.static) for h in hooks)

        def run(params, token_ids, padding_mask, data):
            sites = TraceSites(plan, specs, data)
            hidden, segments = model.apply(params, token_ids, padding_mask, sites)
            return hidden, sites.captured, [captured for _, _, captured in segments]

        cache[key] = jax.jit(run)
    return cache[key]


def _prepare_inputs(model, inputs, padding_mask, tokenizer):
    tokens = None
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, str) for i in inputs)):
        if tokenizer is None:
            raise bad_argument("tokenizer", None, "a Phi3Tokenizer when the input is text")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        token_ids, mask = tokenizer.encode_batch(texts)
        if padding_mask is None:
            padding_mask = mask
    else:
        token_ids = np.asarray(inputs)
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
    padding_mask = np.asarray(padding_mask)
    if padding_mask.ndim == 1:
        padding_mask = padding_mask[None]
    if padding_mask.shape != token_ids.shape:
        raise bad_argument("padding_mask", f"array of shape {padding_mask.shape}", f"the shape of the ids, {token_ids.shape}")
    padding_mask = padding_mask.astype(bool)
    if tokenizer is not None:
        tokens = [tokenizer.display_tokens(row) for row in token_ids.tolist()]
    return token_ids.astype(np.int32), padding_mask, tokens


def _plan(model, names: Selection, hooks: Hooks) -> TracePlan:
    available = all_names(model.num_layers)
    keep = select(names, available)
    hooked: dict[str, list[int]] = {}
    for index, (pattern, hook) in enumerate(hooks.entries):
        if hook.check is not None:
            hook.check(model)
        for name in select(pattern, available, argument="hooks"):
            hooked.setdefault(name, []).append(index)
    return TracePlan(
        keep=frozenset(keep),
        hooked=tuple(sorted((name, tuple(indices)) for name, indices in hooked.items())),
        num_layers=model.num_layers,
    )


def trace(
    model,
    inputs,
    *,
    padding_mask=None,
    names: Selection = None,
    hooks=None,
    tokenizer=None,
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
    hooks = hooks if isinstance(hooks, Hooks) else Hooks(hooks or {})
    token_ids, mask, tokens = _prepare_inputs(model, inputs, padding_mask, tokenizer)
    plan = _plan(model, names, hooks)
    run = _compiled(model, plan, tuple(hook for _, hook in hooks.entries))
    data = tuple(hook.data for _, hook in hooks.entries)
    hidden, top, segments = run(model.params(), jnp.asarray(token_ids), jnp.asarray(mask), data)
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
    )
