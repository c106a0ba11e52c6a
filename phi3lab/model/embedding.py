"""Token embedding and the LM head, separate or tied."""

from __future__ import annotations

import jax
import keras
from jax import numpy as jnp

from phi3lab.model.initializers import default_initializer
from phi3lab.model.stacked import read_through_bits


class Phi3TokenEmbedding(keras.layers.Layer):
    """Looks up token vectors; `reverse=True` projects hidden states to logits.

    Phi-3 and Phi-4 do not tie their input and output embeddings:
    `embeddings [V, D]` maps ids to vectors and `reverse_embeddings [D, V]`
    (the LM head) maps hidden states to logits. Phi-4-mini ties them
    (`tie_weights=True`): there is no `reverse_embeddings` weight and the LM
    head is `embeddings.T`.

    Args:
        vocabulary_size: int. `V`.
        hidden_dim: int. `D`.
        tie_weights: bool. Use the transposed token embedding as the LM head.
        embeddings_initializer: initializer for both matrices.

    Example:
    >>> embedding = Phi3TokenEmbedding(vocabulary_size=10, hidden_dim=4)
    >>> embedding(np.array([[1, 2]])).shape, embedding(np.ones((1, 2, 4)), reverse=True).shape
    ((1, 2, 4), (1, 2, 10))
    """

    def __init__(self, vocabulary_size, hidden_dim, tie_weights=False, embeddings_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.tie_weights = tie_weights
        initializer = embeddings_initializer or default_initializer(stddev=0.01)
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(vocabulary_size, hidden_dim),
            initializer=initializer,
            dtype=self.variable_dtype,
        )
        if not tie_weights:
            self.reverse_embeddings = self.add_weight(
                name="reverse_embeddings",
                shape=(hidden_dim, vocabulary_size),
                initializer=initializer,
                dtype=self.variable_dtype,
            )
        self.built = True

    def params(self) -> dict:
        params = {"embeddings": self.embeddings.value}
        if not self.tie_weights:
            params["reverse_embeddings"] = self.reverse_embeddings.value
        return params

    def lm_head(self, params) -> jax.Array:
        """The LM head `[D, V]`: `reverse_embeddings` when `params` hold one
        (an untied model, or columns passed explicitly), else `embeddings.T`."""
        if "reverse_embeddings" in params:
            return params["reverse_embeddings"]
        return params["embeddings"].T

    def apply(self, params, x, reverse: bool = False):
        """Ids `[B, T]` to vectors `[B, T, D]`, or with `reverse=True` hidden
        states `[B, T, D]` to logits `[B, T, V]`."""
        dtype = self.compute_dtype
        if reverse:
            return x.astype(dtype) @ self.lm_head(params).astype(dtype)
        return rows(params["embeddings"], x).astype(dtype)

    def call(self, x, reverse=False):
        return self.apply(self.params(), jnp.asarray(x), reverse=reverse)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"vocabulary_size": self.vocabulary_size, "hidden_dim": self.hidden_dim, "tie_weights": self.tie_weights}
        )
        return config


def rows(table, ids):
    """`table[ids]`: the rows of `table [V, D]` at `ids [...]`, `[..., D]`.

    On CPU a 16-bit float table is read through its bits
    (`stacked.read_through_bits`, as `stacked.layer_of` reads a layer):
    XLA:CPU gathers 16-bit floats from a float32 copy of the whole table,
    which a decode loop keeps for its whole run (at Phi-3-mini's 32,064 x
    3,072, 394 MB beside the 197 MB bfloat16 table). Accelerators gather
    16-bit floats as they are.

    Example:
    >>> rows(jnp.eye(4, dtype=jnp.bfloat16), jnp.array([[2, 0]])).shape
    (1, 2, 4)
    """
    if jax.default_backend() == "cpu":
        return read_through_bits(_take_rows, table, ids)
    return _take_rows(table, ids)


def _take_rows(table, ids):
    return jnp.take(table, ids, axis=0)
