"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Runs on the host in float64 over one row of logits, so the allowed set and
the probabilities are exact and easy to check.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from phi3lab.checks import check_positive_int, is_int
from phi3lab.errors import bad_argument


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is chosen.

    Args:
        temperature: float >= 0. 0 is greedy (argmax); otherwise tokens are
            drawn from `softmax(logits / temperature)` restricted to the
            allowed set.
        top_k: None, or keep only the `top_k` most likely tokens.
        top_p: None, or keep the smallest set of most likely tokens whose
            probability (at `temperature`) reaches `top_p`, in (0, 1].

    Example:
    >>> sampler = Sampler(temperature=0.8, top_k=40)
    >>> token = sampler.choose(logits, np.random.default_rng(0))
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise bad_argument("temperature", t, "a finite number >= 0 (0 for greedy decoding)")
        if self.top_k is not None:
            check_positive_int("top_k", self.top_k)
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1):
            raise bad_argument("top_p", p, "None or a number in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def allowed(self, logits) -> np.ndarray:
        """Boolean `[V]`: the tokens that may be drawn from `logits [V]`."""
        logits = np.asarray(logits, np.float64)
        keep = np.ones(logits.shape, bool)
        order = np.argsort(-logits, kind="stable")
        if self.top_k is not None and self.top_k < logits.size:
            keep[order[self.top_k :]] = False
        if self.top_p is not None:
            probs = _softmax(np.where(keep, logits, -np.inf) / max(self.temperature, 1e-30))
            before = np.cumsum(probs[order]) - probs[order]  # mass of more likely tokens
            keep[order[before >= self.top_p]] = False
        return keep

    def choose(self, logits, rng: np.random.Generator) -> int:
        """The next token for `logits [V]` (argmax when greedy)."""
        logits = np.asarray(logits, np.float64)
        if self.greedy:
            return int(np.argmax(logits))
        keep = self.allowed(logits)
        probs = _softmax(np.where(keep, logits, -np.inf) / self.temperature)
        return int(rng.choice(logits.size, p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def log_softmax(logits) -> np.ndarray:
    """Log-probabilities of `logits [..., V]` in float64."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise bad_argument("seed", seed, "a non-negative int")
    return int(seed)
