"""The receivers' rows of an attribution graph: direct effects on the logit
and on each active feature, a batch of receivers per compiled backward pass
(`replacement.effects_fn`, compiled and guarded through the run pipeline),
features visited by influence on the logit."""

from __future__ import annotations

import numpy as np
from jax import numpy as jnp

from phi3lab.circuits import influence as graph_influence
from phi3lab.circuits.replacement import effects_fn
from phi3lab.tracing import pipeline


class DirectEffects:
    """The rows of direct effects of an attribution graph's receivers, a
    batch at a time, from `effects_fn` compiled ahead of time through the
    run pipeline (`phi3lab.tracing.pipeline`: its memory estimate is checked
    against `memory_budget` before the first batch runs). The prompt is not
    padded to a length bucket: the program's shapes also hold the most
    features active at one position, which differs from prompt to prompt.

    Args:
        model: the `Phi3Backbone`.
        token_ids: int `[T]`, the prompt.
        position: the target logit's position.
        direction: float `[V]`, the target's logit direction.
        parts: the `ReplacementParts` of the clean run.
        embed: float `[T, D]`, the clean run's `hook_embed`.
        batch_size: receivers per compiled backward pass (every call runs
            a whole batch, so one program serves them all).
        memory_budget: None or bytes the program may use.
    """

    def __init__(
        self, model, token_ids, position, direction, parts, embed, batch_size: int, memory_budget: int | None = None
    ):
        self.batch_size, self.memory_budget, self.model = batch_size, memory_budget, model
        self.key, self.run = effects_fn(model)
        self.program = None
        self.params = model.params()
        self.ids = jnp.asarray(token_ids[None])
        self.position = jnp.int32(position)
        self.direction = jnp.asarray(direction)
        self.sources = tuple(jnp.asarray(a) for a in (embed, parts.errors, parts.feature_vectors, parts.decoder_bias))
        self.parts = parts
        self.length = len(token_ids)

    def batch(self, receivers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows `[R, N + L*T + T]` (features, errors, tokens) and decoder-bias
        terms `[R]` of `receivers` (feature indices; -1 is the logit)."""
        parts, count = self.parts, len(receivers)
        padded = np.full(-(-count // self.batch_size) * self.batch_size, -1)
        padded[:count] = receivers
        feature = np.maximum(padded, 0)
        logit = (padded < 0).astype(np.float32)
        # with no active feature at all, the logit's receiver reads a zero row
        features, encoder = (
            a if len(a) else np.zeros((1, *a.shape[1:]), a.dtype) for a in (parts.features, parts.encoder)
        )
        slot = features[feature, 0] * self.length + features[feature, 1]
        args = (
            self.params,
            self.ids,
            self.position,
            self.direction,
            self.sources,
            (jnp.asarray(slot), jnp.asarray(encoder[feature]), jnp.asarray(logit)),
        )
        if self.program is None:  # every batch has the same shapes
            advice = "Use a smaller batch_size (receivers per backward pass) or a shorter prompt."
            self.program = pipeline.compiled(
                self.model, self.key, self.run, args, self.memory_budget, "This attribution graph", advice
            )
        out = self.program(*args)
        tokens, errors, features, bias = (np.asarray(a, np.float32)[:count] for a in out)
        by_feature = features[:, parts.features[:, 0], parts.features[:, 1], parts.slot]
        return np.concatenate([by_feature, errors.reshape(count, -1), tokens], axis=1), bias

    def rows(self, limit: int | None):
        """`(chosen features, adjacency [n, n], bias [n])` over the nodes
        features (chosen, in order), errors, tokens, logit. Features are
        visited by influence on the logit, `batch_size` at a time, until
        `limit` (or all) have their rows."""
        batch_size, total = self.batch_size, len(self.parts.features)
        limit = total if limit is None else min(limit, total)
        logit_row, logit_bias = self.batch(np.array([-1]))
        rows, biases, chosen = [logit_row[0]], [logit_bias[0]], []
        while len(chosen) < limit:
            if limit == total:  # every feature gets its row: no need to rank them
                picked = np.arange(len(chosen), min(len(chosen) + batch_size, total))
            else:
                scores = self._feature_influence(rows, chosen, total)
                scores[chosen] = -1.0
                picked = np.argsort(-scores, kind="stable")[: min(batch_size, limit - len(chosen))]
            new_rows, new_bias = self.batch(picked)
            rows += list(new_rows)
            biases += list(new_bias + self.parts.encoder_bias[picked])
            chosen += picked.tolist()
        return np.asarray(chosen, np.int64), *self._square(rows, biases, chosen, total)

    @staticmethod
    def _feature_influence(rows, chosen, total) -> np.ndarray:
        """Each feature's influence on the logit through the rows so far
        (the logit's, then the chosen features'): the logit's normalised row
        pushed back through the chosen features' rows until nothing is left
        (the graph has no cycles), never a square matrix over every feature."""
        matrix = graph_influence.normalized(np.asarray(rows))
        step = matrix[0]
        influence = step.copy()
        for _ in range(len(chosen) + 1):
            step = step[chosen] @ matrix[1:]
            if not step.any():
                break
            influence += step
        return influence[:total]

    def _square(self, rows, biases, chosen, total):
        """The `[n, n]` adjacency over chosen features, errors, tokens, logit,
        and the biases, which also take the effects of the features left out."""
        chosen = np.asarray(chosen, np.int64)
        columns = np.concatenate([chosen, np.arange(total, len(rows[0]))])
        left_out = np.setdiff1d(np.arange(total), chosen)
        full = np.asarray(rows, np.float32).reshape(len(rows), len(rows[0]))
        count = len(columns) + 1
        adjacency = np.zeros((count, count), np.float32)
        adjacency[np.r_[count - 1, : len(chosen)], :-1] = full[:, columns]
        bias = np.zeros(count, np.float32)
        bias[np.r_[count - 1, : len(chosen)]] = np.asarray(biases) + full[:, left_out].sum(axis=1)
        return adjacency, bias
