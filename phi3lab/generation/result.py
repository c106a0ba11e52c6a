"""`Generation`: what `phi3lab.generate` returns for one prompt."""

from __future__ import annotations

import dataclasses

import numpy as np

from phi3lab.tracing.result import Trace


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
    """One prompt's continuation.

    Attributes:
        token_ids: int `[T]`, the prompt's tokens then the new ones (a stop
            token that ended the generation included).
        prompt_length: how many of `token_ids` are the prompt.
        finish_reason: `"stop"` (a stop token was generated) or `"length"`
            (`max_new_tokens` reached).
        logprobs: float64 `[T - prompt_length]`, the model's log-probability
            of each new token (from the logits, before temperature, top-k
            or top-p).
        text: the new text, stop token left out (None without a tokenizer).
        trace: a `Trace` over `token_ids` when `names=` was given, else None.

    Example:
    >>> g = phi3lab.generate(model, "The capital of France is", tokenizer=tok, max_new_tokens=8)
    >>> str(g), g.new_token_ids, g.finish_reason, g.logprobs.sum()
    """

    token_ids: np.ndarray
    prompt_length: int
    finish_reason: str
    logprobs: np.ndarray
    text: str | None = None
    trace: Trace | None = None

    @property
    def new_token_ids(self) -> np.ndarray:
        """The generated tokens, int `[T - prompt_length]`."""
        return self.token_ids[self.prompt_length :]

    def __str__(self) -> str:
        return self.text if self.text is not None else " ".join(map(str, self.new_token_ids.tolist()))

    def __repr__(self) -> str:
        return f"Generation({self.text!r}, new_tokens={len(self.new_token_ids)}, finish_reason={self.finish_reason!r})"
