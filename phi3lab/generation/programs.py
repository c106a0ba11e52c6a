"""The compiled steps of cached generation: prefill and decode, one program
per (batch, step length, cache length) for a capture plan and hook functions.

Both steps are the model's one forward (`phi3lab.tracing.forward_fn`'s
`run`, i.e. `Phi3Backbone.apply` with a `KVCache`), followed by the readout
of one row per sequence. Hook data, weights, tokens and the cache are
inputs, so new steering vectors or new tokens never recompile.
"""

from __future__ import annotations

import jax

from phi3lab import compile_cache
from phi3lab.tracing.forward import ForwardFn

# Cache lengths and prefill lengths are rounded up to a multiple of this.
BUCKET = 64


def bucket(length: int, limit: int) -> int:
    """`length` rounded up to a multiple of `BUCKET`, at most `limit`."""
    return min(-(-length // BUCKET) * BUCKET, limit)


def step_program(fn: ForwardFn, args):
    """The compiled step for `args = (params, token_ids [B, n], slot_mask
    [B, S], positions [B, n], cache, cache_index, last, hook_data)`.

    The program returns `(logits [B, V] at row `last` of the step, updated
    cache, model-level captures, per-range block captures)`. Compiled ahead
    of time (so its memory is known) and cached per model under the kind
    `"generate"`.
    """
    model = fn.model

    def step(params, token_ids, slot_mask, positions, cache, cache_index, last, hook_data):
        hidden, top, segments, cache = fn.run(
            params, token_ids, slot_mask, hook_data, positions=positions, cache=cache, cache_index=cache_index
        )
        row = jax.lax.dynamic_index_in_dim(hidden, last, axis=1, keepdims=False)
        return model.unembed(params, row), cache, top, segments

    leaves, treedef = jax.tree.flatten(args)
    shapes = (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))
    key = ("generate", fn.plan, tuple((h.fn, h.static) for h in fn.hooks), shapes)
    return compile_cache.cached(model, key, lambda: jax.jit(step).lower(*args).compile())
