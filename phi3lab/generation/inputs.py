"""What `phi3lab.generate` reads from its arguments: the prompt's token id
rows and the stop token ids, with clear errors for anything else."""

from __future__ import annotations

import jax
import numpy as np

from phi3lab.checks import check_ids, check_token_ids, is_int
from phi3lab.errors import bad_argument


def prompt_rows(model, tokenizer, prompt, chat: bool) -> tuple[list[list[int]], bool]:
    """Token id rows of `prompt` and whether it was a single prompt."""
    if isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        if tokenizer is None:
            raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer when the prompt is text")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if chat:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        rows = [tokenizer.encode(t) for t in texts]
        for text, ids in zip(texts, rows):
            if not ids:
                raise bad_argument("prompt", text, "text that encodes to at least one token")
            if max(ids) >= model.vocabulary_size:
                raise bad_argument(
                    "prompt",
                    text,
                    f"text whose token ids fit the model's vocabulary_size={model.vocabulary_size} (the "
                    f"tokenizer gave id {max(ids)}: does `tokenizer` belong to `model`?)",
                )
        return rows, isinstance(prompt, str)
    if chat:
        raise bad_argument("chat", chat, "False when the prompt is token ids (chat formats text)")
    if isinstance(prompt, (str, bytes)) or not (
        isinstance(prompt, (list, tuple, np.ndarray, jax.Array)) and len(prompt)
    ):
        raise bad_argument(
            "prompt", prompt, "a string, a list of strings, or token ids ([T], [B, T] or a list of id lists)"
        )
    items = np.asarray(prompt).tolist() if isinstance(prompt, (np.ndarray, jax.Array)) else list(prompt)
    single = all(is_int(v) for v in items)
    rows = [items] if single else items
    for row in rows:
        if (
            not isinstance(row, (list, tuple, np.ndarray))
            or not len(row)
            or not all(is_int(v) for v in np.asarray(row, dtype=object).ravel().tolist())
            or np.asarray(row, dtype=object).ndim != 1
        ):
            raise bad_argument("prompt", prompt, "token ids [T], or rows of token ids with at least one token each")
        check_ids("prompt", [list(row)], model)
    return [[int(v) for v in row] for row in rows], single


def stop_ids(stop, tokenizer, vocabulary: int) -> frozenset[int]:
    if stop is None:
        return frozenset(tokenizer.stop_token_ids) if tokenizer is not None else frozenset()
    items = [stop] if isinstance(stop, str) or is_int(stop) else stop
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise bad_argument("stop", stop, "None, a token id or token string, or a list of those")
    ids = set()
    for item in items:
        if is_int(item):
            ids.add(int(check_token_ids("stop", item, vocabulary, ndim=0)))
        elif isinstance(item, str) and tokenizer is not None:
            try:
                ids.add(tokenizer.token_to_id(item))
            except (ValueError, KeyError):
                raise bad_argument(
                    "stop", item, "token strings of the tokenizer's vocabulary (e.g. '<|end|>')"
                ) from None
        else:
            raise bad_argument(
                "stop",
                item,
                "token ids or token strings of the tokenizer (a tokenizer is needed for strings)",
            )
    return frozenset(ids)
