"""Plain text generation (no KV cache), good enough to see what a model says."""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab import compile_cache
from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument

_BUCKET = 64


def _next_logits(model):
    """A jitted `(params, ids [1, L], last) -> logits [V]` for `model`."""

    def step(params, ids, last):
        hidden, _ = model.apply(params, ids)
        return model.unembed(params, jax.lax.dynamic_index_in_dim(hidden[0], last, keepdims=False))

    return compile_cache.cached(model, ("generate.step",), lambda: jax.jit(step))


def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """Continue `prompt` and return the new text.

    Each step reruns the whole sequence (no cache); sequences are padded on
    the right to a multiple of 64 tokens, so compilations are reused.

    Args:
        model: a `Phi3Backbone`.
        tokenizer: its `Phi3Tokenizer`.
        prompt: the text to continue (with `chat=True`, the user's message,
            wrapped in Phi-3's chat template).
        max_new_tokens: int. At most this many new tokens.
        temperature: float. 0 for greedy decoding, else sampling temperature.
        seed: int. Sampling seed.
        chat: bool. Format `prompt` as a user turn and answer as assistant.

    Generation stops at `<|end|>`, `<|assistant|>` or `<|endoftext|>`.

    Example:
    >>> phi3lab.generate(model, tok, "When Mary and John went to the store, John gave a drink to")
    ' Mary.'
    """
    if not isinstance(prompt, str):
        raise bad_argument("prompt", prompt, "a string")
    check_positive_int("max_new_tokens", max_new_tokens)
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise bad_argument("temperature", temperature, "a finite number >= 0")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise bad_argument("seed", seed, "a non-negative int")
    if not isinstance(chat, (bool, np.bool_)):
        raise bad_argument("chat", chat, "True or False")
    if not all(hasattr(tokenizer, a) for a in ("encode", "decode", "apply_chat_template", "stop_token_ids")):
        raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer")
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(prompt)
    if not ids:
        raise bad_argument("prompt", prompt, "text that encodes to at least one token")
    if max(ids) >= model.vocabulary_size:
        raise bad_argument(
            "prompt", prompt,
            f"text whose token ids fit the model's vocabulary_size={model.vocabulary_size} (the tokenizer "
            f"gave id {max(ids)}: does `tokenizer` belong to `model`?)",
        )
    new = []
    rng = np.random.default_rng(seed)
    step = _next_logits(model)
    params = model.params()
    for _ in range(max_new_tokens):
        sequence = ids + new
        if len(sequence) >= model.max_sequence_length:
            break
        padded = -(-len(sequence) // _BUCKET) * _BUCKET
        padded = min(padded, model.max_sequence_length)
        window = np.full((1, padded), tokenizer.pad_token_id, np.int32)
        window[0, : len(sequence)] = sequence
        logits = np.asarray(step(params, jnp.asarray(window), len(sequence) - 1), np.float64)
        logits = logits[: tokenizer.vocabulary_size]
        if temperature == 0:
            token = int(np.argmax(logits))
        else:
            probs = np.exp((logits - logits.max()) / temperature)
            token = int(rng.choice(len(probs), p=probs / probs.sum()))
        if token in tokenizer.stop_token_ids:
            break
        new.append(token)
    return tokenizer.decode(new)
