"""Phi-3's RMS normalization."""

from __future__ import annotations

import keras
from jax import lax
from jax import numpy as jnp


def rms_norm(x, scale, epsilon: float):
    """`x / sqrt(mean(x^2) + epsilon) * scale`, computed in float32.

    Args:
        x: array `[..., hidden_dim]`.
        scale: array `[hidden_dim]`.
        epsilon: float added to the mean square.

    Returns the normalized array in `x`'s dtype.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    x = x * lax.rsqrt(mean_square + epsilon)
    return (x * scale.astype(jnp.float32)).astype(dtype)


class Phi3RMSNorm(keras.layers.Layer):
    """RMS normalization with a learned scale (initialized to ones).

    Args:
        hidden_dim: int. Size of the normalized axis.
        epsilon: float. Added to the mean square. Defaults to `1e-6`.
        num_layers: int or None. When set, the layer holds one scale per
            decoder layer, `[num_layers, hidden_dim]`, for a scanned stack.

    Example:
    >>> norm = Phi3RMSNorm(hidden_dim=8)
    >>> norm(np.ones((1, 3, 8), "float32")).shape
    (1, 3, 8)
    """

    def __init__(self, hidden_dim, epsilon=1e-6, num_layers=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.epsilon = epsilon
        self.num_layers = num_layers
        stack = () if num_layers is None else (num_layers,)
        self.scale = self.add_weight(
            name="scale",
            shape=stack + (hidden_dim,),
            initializer="ones",
            dtype=self.variable_dtype,
        )
        self.built = True

    def params(self) -> dict:
        return {"scale": self.scale.value}

    def apply(self, params: dict, x):
        return rms_norm(x, params["scale"], self.epsilon)

    def call(self, x):
        return self.apply(self.params(), x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "epsilon": self.epsilon,
                "num_layers": self.num_layers,
            }
        )
        return config
