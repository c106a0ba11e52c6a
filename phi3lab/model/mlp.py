"""Phi-3's gated SiLU feed-forward network, with its hook points."""

from __future__ import annotations

import jax
import keras
from jax import numpy as jnp

from phi3lab.model.hook_points import NO_HOOKS
from phi3lab.model.initializers import default_initializer
from phi3lab.model.quantize import add_projection_kernels, dequantize


class Phi3MLP(keras.layers.Layer):
    """`down(silu(gate(x)) * up(x))`, kernels stacked over decoder layers.

    Args:
        num_layers: int. Number of decoder layers whose kernels are stacked.
        hidden_dim: int. Model width `D`.
        intermediate_dim: int. Width `F` of the gated hidden layer.
        kernel_initializer: initializer for the kernels.

    Weights: `gate_kernel [L, D, F]`, `up_kernel [L, D, F]`,
    `down_kernel [L, F, D]`. The activation runs in float32. After
    int8 quantization (`phi3lab.model.quantize`) each kernel is int8 with a
    `<name>_scale` weight beside it.
    """

    def __init__(self, num_layers, hidden_dim, intermediate_dim, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        initializer = kernel_initializer or default_initializer(stddev=0.02)
        shapes = {
            "gate_kernel": (hidden_dim, intermediate_dim),
            "up_kernel": (hidden_dim, intermediate_dim),
            "down_kernel": (intermediate_dim, hidden_dim),
        }
        self.stacked_weight_names = add_projection_kernels(self, num_layers, shapes, initializer)
        self.built = True

    def params(self) -> dict:
        return {name: getattr(self, name).value for name in self.stacked_weight_names}

    def apply(self, params, x, sites=NO_HOOKS):
        """One layer's MLP on `x` `[B, T, D]`; returns `[B, T, D]`."""
        dtype = self.compute_dtype
        w = dequantize(params, dtype)
        gate = sites("mlp.hook_pre", x @ w["gate_kernel"])
        up = sites("mlp.hook_pre_linear", x @ w["up_kernel"])
        activated = jax.nn.silu(gate.astype(jnp.float32)).astype(dtype)
        hidden = sites("mlp.hook_post", activated * up)
        return hidden @ w["down_kernel"]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
            }
        )
        return config
