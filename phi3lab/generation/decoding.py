"""`phi3lab.generate`: cached, compiled, hookable, traceable generation.

A prefill runs the prompt through the model and fills a fixed-size key/value
cache; each decode step then runs one new token against it. Both are the
model's one forward (`Phi3Backbone.apply` with a `KVCache`, through
`phi3lab.tracing.forward_fn`), so hooks and captures work as in `trace`.

Batches are left-padded: slot `s` of the cache holds column `s` of the batch,
each row's rotary positions count from its first real token (transformers'
`cumsum(attention_mask) - 1`), so each row gives what it gives alone.

Rotary scaling across the pretraining window (see `phi3lab.model.rotary`):
every step gives what the uncached forward of the sequence so far gives.
When the sequence first outgrows `pretraining_sequence_length`, the cache is
rebuilt by a prefill over the whole sequence with the long factors, as
transformers' Phi-3 `generate` does at that step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_positive_int
from phi3lab.deprecation import warn_deprecated
from phi3lab.errors import bad_argument
from phi3lab.generation.captures import StepCaptures, captured_bytes, row_trace
from phi3lab.generation.inputs import prompt_rows, stop_ids
from phi3lab.generation.programs import CHUNK, bucket, cache_length, loop_program, loop_weights, placed, prefill_program
from phi3lab.generation.result import Generation
from phi3lab.generation.sampling import Sampler, check_seed
from phi3lab.model.kv_cache import KVCache
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import as_hooks, forward_fn
from phi3lab.tracing.memory import MemoryEstimate, check_fits, tree_bytes
from phi3lab.tracing.names import Selection, all_names

GENERATION_ADVICE = "Capture less (names=...), generate fewer tokens, or run fewer prompts at once."

# Show a progress bar (with `progress=None`) from this many new tokens on.
PROGRESS_FROM = 256


class _Decoder:
    """Runs the prefill and the decode loop over one left-padded batch."""

    def __init__(self, model, fn, rows: list[list[int]], cache_length: int, pad_id: int):
        self.model, self.fn, self.pad_id = model, fn, pad_id
        self.params = model.params()
        self.loop_params = loop_weights(self.params)
        self.hook_data = jax.tree.map(jnp.asarray, fn.hook_data)
        batch, prompt = len(rows), max(len(r) for r in rows)
        self.prompt_length = prompt
        self.sequence = np.full((batch, cache_length), pad_id, np.int32)
        self.slot_mask = np.ones((batch, cache_length), bool)
        for r, ids in enumerate(rows):
            self.sequence[r, prompt - len(ids) : prompt] = ids
            self.slot_mask[r, : prompt - len(ids)] = False
        self.positions = np.maximum(np.cumsum(self.slot_mask, axis=1) - 1, 0).astype(np.int32)
        self.device_slot_mask = jnp.asarray(self.slot_mask)  # fixed for the whole generation
        self.device_positions = jnp.asarray(self.positions)
        self.captures = StepCaptures(fn.plan)
        self.cache = KVCache.empty(model, batch, cache_length)
        self.length = 0  # slots processed

    def _prefill_args(self, token_ids, positions, last: int):
        return (
            self.params,
            jnp.asarray(token_ids),
            self.device_slot_mask,
            jnp.asarray(positions),
            self.cache,
            np.int32(last),
            self.hook_data,
        )

    def _loop_args(self, logits, first: int, count: int, finished, stops, key):
        return (
            self.loop_params,
            logits,
            self.device_slot_mask,
            self.device_positions,
            self.cache,
            np.int32(self.length),
            np.int32(first),
            np.int32(count),
            np.asarray(finished, bool),
            stops,
            np.int32(self.pad_id),
            key,
            self.hook_data,
        )

    def loop_program(self, sampler: Sampler, vocabulary: int, stops):
        """The compiled decode loop of this batch (see `programs.loop_program`)."""
        batch = self.sequence.shape[0]
        logits = jax.ShapeDtypeStruct((batch, self.model.vocabulary_size), jnp.float32)
        args = self._loop_args(logits, 0, 0, np.zeros(batch, bool), stops, jax.random.PRNGKey(0))
        return loop_program(self.fn, sampler, vocabulary, args)

    def prefill_program(self, length: int):
        """The compiled prefill of slots `0 .. length - 1` (see `programs.prefill_program`)."""
        padded = bucket(length, self.sequence.shape[1])
        zeros = np.zeros((len(self.sequence), padded), np.int32)
        shapes = self._prefill_args(zeros, zeros, 0)
        return prefill_program(self.fn, shapes)

    def working_bytes(self, loop) -> int:
        """XLA's working set of the larger of the prompt's prefill and the decode loop `loop`."""
        return max(loop.temporary_bytes, self.prefill_program(self.prompt_length).temporary_bytes)

    def prefill(self, length: int, memory_budget: int | None = None):
        """Process slots `0 .. length - 1` from scratch (a new cache); return
        the logits `[B, V]` after slot `length - 1`. The program is refused
        before it runs when over `memory_budget` (the run pipeline's guard)."""
        padded = bucket(length, self.sequence.shape[1])
        token_ids = self.sequence[:, :padded]
        positions = np.where(np.arange(padded) < length, self.positions[:, :padded], 0)
        self.cache = KVCache.empty(self.model, *self.sequence.shape)
        self.captures.reset()
        self.length = length
        args = self._prefill_args(token_ids, positions, length - 1)
        program = self.prefill_program(length)
        pipeline.guard(program, self.params, memory_budget, "This generation", GENERATION_ADVICE)
        logits, self.cache, captures = program(*placed(program, args))
        self.captures.add(length, captures)
        return logits.astype(jnp.float32)

    def decode(self, program, logits, first: int, count: int, feeds: int, finished, stops, key):
        """Run the decode loop for up to `count` new tokens from slot
        `self.length` on; return `(logits, tokens [B, n], logprobs [B, n])`
        for the `n` iterations it ran. The first `feeds` tokens are kept in
        the cache (and what they captured recorded); the loop also runs the
        others, whose slots and captures are dropped."""
        args = self._loop_args(logits, first, count, finished, stops, key)
        logits, self.cache, tokens, logprobs, ran, buffers = program(*placed(program, args))
        ran = int(ran)
        tokens, logprobs = np.asarray(tokens[:, :ran]), np.asarray(logprobs[:, :ran], np.float64)
        self.sequence[:, self.length : self.length + ran] = tokens
        fed = min(ran, feeds)
        if self.fn.plan.keep and fed:
            buffers = {name: np.asarray(buffer) for name, buffer in buffers.items()}
            for k in range(fed):
                self.captures.add(1, {name: buffer[k] for name, buffer in buffers.items()})
        self.length += fed
        return logits, tokens, logprobs

    def rebuild_at(self, slot: int) -> bool:
        """Whether running `slot` needs a prefill over the whole sequence (the
        sequence outgrows the short rotary factors there)."""
        rotary = self.model.rotary
        return rotary.factor_set(slot + 1) != rotary.factor_set(slot)


def _tokenizer_second(fn: Callable) -> Callable:
    """Keep `generate(model, tokenizer, prompt, max_new_tokens, temperature,
    seed, chat)`, the form before `generate(model, prompt, tokenizer=...)`,
    working for one release, with a `DeprecationWarning`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if len(args) < 3 and not (len(args) == 2 and "prompt" in kwargs):
            return fn(*args, **kwargs)
        model, tokenizer, rest = args[0], args[1], args[2:]
        prompt = kwargs.pop("prompt") if "prompt" in kwargs else rest[0]
        rest = rest if "prompt" in kwargs else rest[1:]
        if len(rest) > 4:
            raise TypeError(f"generate() takes at most 7 positional arguments in its old form ({len(args)} given)")
        warn_deprecated(
            "phi3lab.generate(model, tokenizer, prompt, ...)", "phi3lab.generate(model, prompt, tokenizer=...)"
        )
        moved = dict(zip(("max_new_tokens", "temperature", "seed", "chat"), rest))
        return fn(model, prompt, tokenizer=tokenizer, **moved, **kwargs)

    return wrapper


@_tokenizer_second
def generate(
    model,
    prompt,
    *,
    tokenizer=None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    stop=None,
    hooks=None,
    names: Selection = None,
    stream: Callable | None = None,
    progress: bool | None = None,
    memory_budget: int | None = None,
) -> Generation | list[Generation]:
    """Continue `prompt` with a key/value cache, compiled once per shape.

    Args:
        model: a `Phi3Backbone`.
        prompt: a string, a list of strings (a batch, left-padded), token ids
            `[T]`, or a list / array of id rows.
        tokenizer: its `Phi3Tokenizer`, or None when `prompt` is token ids.
            (The old form `generate(model, tokenizer, prompt)` still works
            for one release, with a `DeprecationWarning`.)
        max_new_tokens: int >= 1. At most this many new tokens per prompt;
            prompt plus new tokens must fit `model.max_sequence_length`.
        temperature: float >= 0. 0 is greedy decoding.
        seed: int. Sampling seed (the same seed gives the same tokens).
        chat: bool. Wrap each text prompt as a user turn of the chat template.
        top_k: None or int >= 1, sample among the `top_k` likeliest tokens.
        top_p: None or float in (0, 1], nucleus sampling.
        stop: None (the tokenizer's stop tokens: `<|end|>`, `<|endoftext|>`,
            ...), or token ids / token strings ending a row (`[]` for none).
        hooks: interventions (`phi3lab.hooks`, or `{name: fn(x, ctx)}`) run
            at every step: on the prompt in the prefill and on each new
            token. Hooks see the step's positions (`[B, n, ...]`, attention
            maps `[B, H, n, S]` over the cache's `S` slots), so
            position-independent hooks act as on a trace of the final
            sequence. Their data are compiled inputs: new values reuse the
            programs.
        names: None (no trace), or what to capture, as in `phi3lab.trace`
            (`"*"` for everything): then `g.trace` holds it for the prompt
            and every new token.
        stream: None, or a callback run after each step with the new text
            (a `str`; a token id without a tokenizer), or a list of those for
            a batch (empty / None for rows already finished).
        progress: bool or None. A progress bar (tqdm); None shows it from
            256 new tokens on.
        memory_budget: bytes the run may use (default the free memory): the
            decode loop's working set (its key/value cache included), the
            per-layer weight copy, the captures, and each prefill; a request
            beyond it fails before running (`CaptureTooLarge`, with the
            estimate). The cache holds the prompt's length bucket plus the
            new tokens' (`phi3lab.generation.programs.cache_length`), the
            prefill runs at the prompt's bucket (`phi3lab.tracing.pipeline`).

    Returns:
        A `Generation` for a single prompt (string or `[T]` ids), else a list
        of them, one per row, each as if that prompt had run alone.

    Example:
    ```python
    g = phi3lab.generate(model, "When Mary and John went to the store, John gave a drink to", tokenizer=tok,
                         max_new_tokens=4, names="blocks.*.attn.hook_pattern")
    str(g), g.new_token_ids, g.logprobs, g.trace.attention(0).shape
    steered = phi3lab.generate(model, "I think", tokenizer=tok, hooks=phi3lab.hooks.add("blocks.1.hook_resid_post", v))
    ```
    """
    if tokenizer is not None and not all(hasattr(tokenizer, a) for a in ("encode", "decode", "stop_token_ids")):
        raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer, or None with token id prompts")
    if not isinstance(chat, (bool, np.bool_)):
        raise bad_argument("chat", chat, "True or False")
    check_positive_int("max_new_tokens", max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p)
    seed = check_seed(seed)
    if stream is not None and not callable(stream):
        raise bad_argument("stream", stream, "None or a callable")
    if progress is not None and not isinstance(progress, (bool, np.bool_)):
        raise bad_argument("progress", progress, "None, True or False")
    pipeline.check_budget(memory_budget)
    rows, single = prompt_rows(model, tokenizer, prompt, bool(chat))
    longest, limit = max(len(r) for r in rows), model.max_sequence_length
    if longest >= limit:
        raise bad_argument(
            "prompt", f"a prompt of {longest} tokens", f"prompts shorter than the model's max_sequence_length={limit}"
        )
    if longest + max_new_tokens > limit:
        raise bad_argument(
            "max_new_tokens",
            max_new_tokens,
            f"at most {limit - longest} for this prompt ({longest} tokens; max_sequence_length={limit})",
        )
    vocabulary = tokenizer.vocabulary_size if tokenizer is not None else model.vocabulary_size
    vocabulary = min(vocabulary, model.vocabulary_size)
    stops = stop_ids(stop, tokenizer, vocabulary)

    fn = forward_fn(model, () if names is None else names, as_hooks(hooks))
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    decoder = _Decoder(model, fn, rows, cache_length(longest, max_new_tokens, limit), pad_id)
    stop_array = np.asarray(sorted(stops), np.int32)
    program = decoder.loop_program(sampler, vocabulary, stop_array)
    captured = captured_bytes(model, fn.plan.keep, len(rows), longest + max_new_tokens) if names is not None else 0
    estimate = MemoryEstimate(tree_bytes(decoder.params), decoder.working_bytes(program), captured)
    check_fits(estimate, memory_budget, "This generation", GENERATION_ADVICE)

    batch, prompt_length = len(rows), decoder.prompt_length
    new = [[] for _ in rows]
    logprobs = [[] for _ in rows]
    finished = [None] * batch
    texts = [""] * batch
    from tqdm.auto import tqdm

    show = max_new_tokens >= PROGRESS_FROM if progress is None else bool(progress)
    bar = tqdm(total=max_new_tokens, desc="generate", unit="token", disable=not show)
    key = jax.random.PRNGKey(seed)
    logits = decoder.prefill(prompt_length, memory_budget)
    step = 0
    while step < max_new_tokens and not all(finished):
        # One run of the loop: up to CHUNK tokens (one when streaming), cut
        # where the next slot needs a rebuilding prefill (rotary switch).
        count = 1 if stream is not None else min(CHUNK, max_new_tokens - step)
        slot = prompt_length + step
        rebuild = next((i for i in range(count) if decoder.rebuild_at(slot + i)), None)
        count = count if rebuild is None else rebuild + 1
        last = step + count == max_new_tokens and names is None
        feeds = count - (1 if rebuild is not None or last else 0)
        logits, tokens, scores = decoder.decode(
            program, logits, step, count, feeds, [bool(f) for f in finished], stop_array, key
        )
        pieces = [None if tokenizer is None else ""] * batch
        for r in range(batch):
            if finished[r]:
                continue
            for k in range(tokens.shape[1]):
                token = int(tokens[r, k])
                new[r].append(token)
                logprobs[r].append(float(scores[r, k]))
                pieces[r] = token
                if token in stops:
                    finished[r] = "stop"
                    break
            if tokenizer is not None:
                text = tokenizer.decode(new[r][:-1] if finished[r] else new[r])
                pieces[r], texts[r] = text[len(texts[r]) :], text
        step += tokens.shape[1]
        bar.update(tokens.shape[1])
        if stream is not None:
            stream(pieces[0] if single else pieces)
        if rebuild is not None and tokens.shape[1] == count and step < max_new_tokens and not all(finished):
            logits = decoder.prefill(decoder.length + 1, memory_budget)
    bar.close()
    if names is not None and decoder.length < prompt_length + step:
        decoder.prefill(
            prompt_length + step, memory_budget
        )  # the last new token's own activations (at the rotary switch)

    arrays = decoder.captures.arrays(decoder.length, all_names(model, opt_in=True)) if names is not None else {}
    results = []
    for r, ids in enumerate(rows):
        start, stop_at = prompt_length - len(ids), prompt_length + len(new[r])
        token_ids = decoder.sequence[r, start:stop_at].copy()
        trace = None
        if names is not None:
            tokens = None if tokenizer is None else tokenizer.display_tokens(token_ids.tolist())
            trace = row_trace(
                arrays, r, start, stop_at, token_ids=token_ids, tokens=tokens, model=model, prompt_length=len(ids)
            )
        results.append(
            Generation(
                token_ids=token_ids,
                prompt_length=len(ids),
                finish_reason=finished[r] or "length",
                logprobs=np.asarray(logprobs[r], np.float64),
                text=texts[r] if tokenizer is not None else None,
                trace=trace,
            )
        )
    return results[0] if single else results


def estimate(model, prompt_length: int, max_new_tokens: int, batch: int = 1, names: Selection = None) -> MemoryEstimate:
    """Bytes a generation needs: weights, the working set of the prompt's
    prefill or of the decode loop, whichever is larger (the key/value cache
    included), and the captures of `names` over the whole sequence. Nothing runs.

    Example:
    >>> phi3lab.generation.estimate(model, 128, 128, names="blocks.*.attn.hook_pattern").captured
    """
    for name, value in (("prompt_length", prompt_length), ("max_new_tokens", max_new_tokens), ("batch", batch)):
        check_positive_int(name, value)
    if prompt_length + max_new_tokens > model.max_sequence_length:
        raise bad_argument(
            "max_new_tokens",
            max_new_tokens,
            f"at most max_sequence_length - prompt_length = {model.max_sequence_length - prompt_length}",
        )
    fn = forward_fn(model, () if names is None else names)
    length = cache_length(prompt_length, max_new_tokens, model.max_sequence_length)
    decoder = _Decoder(model, fn, [[0] * prompt_length] * batch, length, 0)
    program = decoder.loop_program(Sampler(), model.vocabulary_size, np.zeros(0, np.int32))
    captured = captured_bytes(model, fn.plan.keep, batch, prompt_length + max_new_tokens)
    return MemoryEstimate(tree_bytes(decoder.params), decoder.working_bytes(program), captured)
