"""Token embedding with a separate (untied) output projection."""

from __future__ import annotations

import keras
from jax import numpy as jnp

from phi3lab.model.initializers import default_initializer


class Phi3TokenEmbedding(keras.layers.Layer):
    """Looks up token vectors; `reverse=True` projects hidden states to logits.

    Phi-3 does not tie its input and output embeddings: `embeddings
    [V, D]` maps ids to vectors and `reverse_embeddings [D, V]` (the LM head)
    maps hidden states to logits.

    Args:
        vocabulary_size: int. `V`.
        hidden_dim: int. `D`.
        embeddings_initializer: initializer for both matrices.

    Example:
    >>> embedding = Phi3TokenEmbedding(vocabulary_size=10, hidden_dim=4)
    >>> embedding(np.array([[1, 2]])).shape, embedding(np.ones((1, 2, 4)), reverse=True).shape
    ((1, 2, 4), (1, 2, 10))
    """

    def __init__(
        self, vocabulary_size, hidden_dim, embeddings_initializer=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        initializer = embeddings_initializer or default_initializer(stddev=0.01)
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(vocabulary_size, hidden_dim),
            initializer=initializer,
            dtype=self.variable_dtype,
        )
        self.reverse_embeddings = self.add_weight(
            name="reverse_embeddings",
            shape=(hidden_dim, vocabulary_size),
            initializer=initializer,
            dtype=self.variable_dtype,
        )
        self.built = True

    def params(self) -> dict:
        return {
            "embeddings": self.embeddings.value,
            "reverse_embeddings": self.reverse_embeddings.value,
        }

    def apply(self, params, x, reverse: bool = False):
        """Ids `[B, T]` to vectors `[B, T, D]`, or with `reverse=True` hidden
        states `[B, T, D]` to logits `[B, T, V]`."""
        dtype = self.compute_dtype
        if reverse:
            return x.astype(dtype) @ params["reverse_embeddings"].astype(dtype)
        return jnp.take(params["embeddings"], x, axis=0).astype(dtype)

    def call(self, x, reverse=False):
        return self.apply(self.params(), jnp.asarray(x), reverse=reverse)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"vocabulary_size": self.vocabulary_size, "hidden_dim": self.hidden_dim}
        )
        return config
