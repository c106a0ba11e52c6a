"""The compiled programs of cached generation: the prefill step and the
decode loop, one program per (batch, length, cache length) for a capture
plan and hook functions.

Both run the model's one forward (`phi3lab.tracing.forward_fn`'s `run`, i.e.
`Phi3Backbone.apply` with a `KVCache`), followed by the readout of one row
per sequence. The decode loop chooses each token on the device and feeds it
back (a `lax.while_loop`), so a chunk of new tokens costs one dispatch.
Hook data, weights, tokens and the cache are inputs, so new steering vectors
or new tokens never recompile.
"""

from __future__ import annotations

import jax
from jax import numpy as jnp

from phi3lab.generation.sampling import Sampler
from phi3lab.model.stacked import layer_views, update_slice
from phi3lab.runtime import compile_cache
from phi3lab.tracing.forward import ForwardFn

# New tokens per run of the decode loop (at most; fewer when streaming).
CHUNK = 64


def bucket(length: int, limit: int) -> int:
    """The prefill length for `length` slots: the run pipeline's length
    bucket (`compile_cache.bucket_length`: 64, 128, 256, 384, 512, then
    powers of two), at most `limit`."""
    return compile_cache.bucket_length(length, limit)


def cache_length(prompt: int, new: int, limit: int) -> int:
    """The cache slots of a generation of `new` tokens after a `prompt`-token
    prompt: the prompt's bucket plus the new tokens' bucket, at most `limit`.
    The prefill's shapes then follow the prompt's bucket alone, so for a
    given `max_new_tokens` prompts of any length compile one prefill and one
    decode loop per length bucket (a cache of the bucket of `prompt + new`
    would pair one prompt bucket with two cache lengths). The price is up to
    twice the slots the sequence needs, which each decode step reads."""
    return min(limit, compile_cache.bucket_length(prompt, limit) + compile_cache.bucket_length(new, limit))


def _step(fn: ForwardFn):
    """The forward over a few new slots: `(params, token_ids [B, n],
    slot_mask [B, S], positions [B, n], cache, cache_index, last, hook_data)`
    to `(logits [B, V] at row `last`, updated cache, captures by name)`."""
    model = fn.model

    def step(params, token_ids, slot_mask, positions, cache, cache_index, last, hook_data):
        hidden, captures, cache = fn.run(
            params, token_ids, slot_mask, hook_data, positions=positions, cache=cache, cache_index=cache_index
        )
        row = jax.lax.dynamic_index_in_dim(hidden, last, axis=1, keepdims=False)
        return model.unembed(params, row), cache, captures

    return step


def _compile(fn: ForwardFn, kind: str, program, args, *extra) -> compile_cache.Program:
    key = (kind, *fn.program_key(), *extra)
    return compile_cache.ahead_of_time(fn.model, key, program, args)


def placed(program: compile_cache.Program, args) -> tuple:
    """`args` on the devices `program` was compiled for. The cache and logits
    one program returns are laid out as XLA chose for its outputs, which on
    a sharded model differs from the layout the next program takes them in;
    arrays already in place (every one on a single device) are not copied,
    nor are inputs the program does not read (XLA drops them: no sharding)."""
    wanted = program.compiled.input_shardings[0]

    def place(arg, sharding):
        if sharding is None:
            return arg
        if isinstance(arg, jax.Array) and not arg.sharding.is_equivalent_to(sharding, arg.ndim):
            return jax.device_put(arg, sharding)
        return arg

    return jax.tree.map(place, tuple(args), tuple(wanted))


def loop_weights(params: dict) -> dict:
    """The weights the decode loop takes: `params`, with the decoder's
    layers as `stacked.layer_views` (per-layer arrays sharing the stack's
    memory) where they are float32 on one CPU device. A step then reads each
    weight once, in place; from the stack, XLA:CPU first copies a layer's
    weights out (a step of the 12-layer d=768 benchmark model wrote 340 MB
    of such copies and read them again). 16-bit and quantized weights keep
    the stack: there every step converts them to float32 before multiplying
    anyway."""
    decoder = params["decoder"]
    if any(leaf.dtype != jnp.float32 for leaf in jax.tree.leaves(decoder)):
        return params
    layers = layer_views(decoder)
    return params if layers is None else {**params, "decoder": layers}


def prefill_program(fn: ForwardFn, args):
    """The compiled prefill for `args = (params, token_ids [B, n], slot_mask
    [B, S], positions [B, n], cache, last, hook_data)`: `_step` from slot 0
    of a new cache. Slot 0 is static, so attention over the prompt skips the
    slots after it (`Phi3Attention.apply`). Cached per model under the kind
    `"generate.prefill"` (the decode loop's is `"generate"`); compiled ahead
    of time, so its memory is known."""
    step = _step(fn)

    def prefill(params, token_ids, slot_mask, positions, cache, last, hook_data):
        return step(params, token_ids, slot_mask, positions, cache, 0, last, hook_data)

    return _compile(fn, "generate.prefill", prefill, args)


def loop_program(fn: ForwardFn, sampler: Sampler, vocabulary: int, args):
    """The compiled decode loop for `args = (params, logits [B, V], slot_mask
    [B, S], positions [B, S], cache, start, first, count, finished [B],
    stops [n], pad_id, key, hook_data)`.

    Iteration `i` (while `i < count` and some row is unfinished) chooses new
    token `first + i` of every row from `logits` (ids `>= vocabulary` never
    chosen; finished rows get `pad_id`), then runs it at cache slot
    `start + i` for the next logits. Returns `(logits, cache, tokens [B,
    CHUNK], logprobs [B, CHUNK], iterations, captures)`, the captures of each
    token run stacked along a leading `CHUNK` axis. Every chosen token is run,
    also the last one of a generation or the one before a rotary rebuild,
    whose logits, cache slot and captures the caller drops (its slot lies
    within the cache, which holds the prompt and every new token): one step
    more per generation, where skipping it behind a `lax.cond` made XLA copy
    the whole key/value cache twice in every step (75 MB of the 670 MB a
    step of the 12-layer d=768 benchmark model moved at 256 slots).

    `params["decoder"]` holds the stacked layer weights, or each layer's own
    (`stacked.layer_views`, on CPU): the loop then runs the layers unrolled
    over a `KVCache.by_layer` (the returned cache is stacked again), and no
    step copies a layer's weights or cache slots out of a stack.
    """
    step = _step(fn)

    def loop(params, logits, slot_mask, positions, cache, start, first, count, finished, stops, pad_id, key, hook_data):
        # Per-layer weights run the layers unrolled, each with its own cache
        # buffers (`KVCache.by_layer`, split once per run of the loop).
        layered = isinstance(params["decoder"], (list, tuple))
        # What one fed token captures, shapes only (traced once, when the
        # loop compiles; a cached loop never runs this).
        batch = slot_mask.shape[0]
        one, index = jax.ShapeDtypeStruct((batch, 1), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
        captured = jax.eval_shape(step, params, one, slot_mask, one, cache, index, index, hook_data)[2]

        def choose(i, logits, finished):
            masked = jnp.where(jnp.arange(logits.shape[-1]) < vocabulary, logits.astype(jnp.float32), -jnp.inf)
            token = sampler.choose(masked, jax.random.fold_in(key, first + i))
            logprob = jnp.take_along_axis(jax.nn.log_softmax(masked, axis=-1), token[:, None], axis=-1)[:, 0]
            token = jnp.where(finished, pad_id, token)
            return token, logprob, finished | jnp.isin(token, stops)

        def body(carry):
            i, logits, cache, finished, tokens, logprobs, buffers = carry
            token, logprob, finished = choose(i, logits, finished)
            tokens, logprobs = tokens.at[:, i].set(token), logprobs.at[:, i].set(logprob)

            slot = start + i
            at = jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1)
            logits, cache, step_captures = step(
                params, token[:, None], slot_mask, at, cache, slot, jnp.int32(0), hook_data
            )
            logits = logits.astype(jnp.float32)
            buffers = jax.tree.map(
                lambda buffer, value: update_slice(buffer, value[None], (i,) + (0,) * value.ndim),
                buffers,
                step_captures,
            )
            return i + 1, logits, cache, finished, tokens, logprobs, buffers

        def more(carry):
            i, _, _, finished, *_ = carry
            return (i < count) & ~jnp.all(finished)

        buffers = jax.tree.map(lambda s: jnp.zeros((CHUNK, *s.shape), s.dtype), captured)
        tokens = jnp.full((batch, CHUNK), pad_id, jnp.int32)
        logprobs = jnp.zeros((batch, CHUNK), jnp.float32)
        cache = cache.by_layer() if layered else cache
        carry = (jnp.int32(0), logits.astype(jnp.float32), cache, finished, tokens, logprobs, buffers)
        i, logits, cache, _, tokens, logprobs, buffers = jax.lax.while_loop(more, body, carry)
        return logits, cache.stacked(batch), tokens, logprobs, i, buffers

    return _compile(fn, "generate", loop, args, "loop", sampler, vocabulary)
