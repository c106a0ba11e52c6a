"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Runs on the device, inside the compiled decode loop, so a generation never
waits on the host between tokens. The random key of new token `n` is
`fold_in(PRNGKey(seed), n)`: the tokens depend on the seed only, not on how
the loop was cut into compiled chunks (streaming or not).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
from jax import numpy as jnp

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
    >>> tokens = sampler.choose(logits, jax.random.PRNGKey(0))  # logits [B, V] -> [B]
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

    def allowed(self, logits) -> jax.Array:
        """Boolean `[..., V]`: the tokens that may be drawn from `logits [..., V]`.

        Ties are broken by token id (the lower id counts as more likely), as
        a stable sort does."""
        logits = jnp.asarray(logits, jnp.float32)
        order = jnp.argsort(-logits, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1)  # rank[v]: how many tokens are more likely than v
        keep = jnp.ones(logits.shape, bool)
        if self.top_k is not None:
            keep = rank < self.top_k
        if self.top_p is not None:
            scaled = jnp.where(keep, logits / max(self.temperature, 1e-30), -jnp.inf)
            probs = jnp.take_along_axis(jax.nn.softmax(scaled, axis=-1), order, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            keep = keep & jnp.take_along_axis(before < self.top_p, rank, axis=-1)
        return keep

    def choose(self, logits, key) -> jax.Array:
        """The next token `[...]` for `logits [..., V]` (argmax when greedy)."""
        logits = jnp.asarray(logits, jnp.float32)
        if self.greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = jnp.where(self.allowed(logits), logits / self.temperature, -jnp.inf)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def check_seed(seed) -> int:
    if not is_int(seed) or seed < 0:
        raise bad_argument("seed", seed, "a non-negative int")
    return int(seed)
