"""Filling a backbone's (stacked) variables one checkpoint tensor at a time."""

from __future__ import annotations

import numpy as np
from jax import numpy as jnp

from phi3lab.model.quantize import INPUT_AXES, SCALE_SUFFIX, set_quantized_layer
from phi3lab.model.stacked import set_layer
from phi3lab.runtime.host_memory import release_freed_memory


def model_variables(model) -> dict:
    """`{"decoder/attention/query_kernel": variable, ...}` for a backbone."""
    layers = model.weight_layers()
    return {f"{prefix}/{name}": getattr(layer, name) for prefix, layer in layers.items() for name in layer.params()}


STACKED_PREFIX = "decoder/"


class WeightFiller:
    """Writes tensors into a model's variables and checks nothing is missed.

    Stacked decoder variables are filled one layer slice at a time, updated
    in place (the old buffer is donated), so loading never holds a second
    copy of the model. With `quantize=True`, a float tensor put into an
    int8 kernel is quantized as it is written (`quantize.set_quantized_layer`,
    filling the kernel's `<name>_scale` too): an int8 model is loaded from
    float weights with one layer's float kernel in memory at a time.

    Args:
        model: the `Phi3Backbone` to fill.
        quantize: whether float tensors may fill int8 kernels (quantized);
            else such a tensor is refused, as an int8 one for a float
            variable always is.

    Example:
    >>> filler = WeightFiller(model)
    >>> filler.put("final_norm/scale", np.ones(64), source="model.norm.weight")
    >>> filler.finish("/path/to/preset")   # raises if a tensor was never put
    """

    def __init__(self, model, quantize: bool = False):
        self.model = model
        self.quantize = quantize
        self.layers = model.weight_layers()
        self.variables = model_variables(model)
        self.filled: dict[str, set] = {key: set() for key in self.variables}

    def wants(self, key: str, layer: int | None = None) -> bool:
        """Whether the model has the variable `key` and its `layer` slice
        (or, for `layer=None`, the variable) is not yet written: a scale is
        already written when its kernel was quantized while loading."""
        return key in self.variables and layer not in self.filled[key]

    def put(self, key: str, value, layer: int | None = None, source: str = "") -> None:
        variable = self.variables[key]
        expected = tuple(variable.shape[1:] if layer is not None else variable.shape)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"Tensor {source!r} has shape {tuple(value.shape)}, but "
                f"{key}{'' if layer is None else f' (layer {layer})'} needs "
                f"shape {expected}. Check that the checkpoint matches its config."
            )
        value = np.asarray(value)
        integer_tensor = np.issubdtype(value.dtype, np.integer)
        integer_variable = jnp.issubdtype(variable.dtype, jnp.integer)
        quantizing = self.quantize and integer_variable and not integer_tensor and layer is not None
        if integer_tensor != integer_variable and not quantizing:
            raise ValueError(
                f"Tensor {source!r} holds {value.dtype} values, but {key} is {variable.dtype}: an int8-quantized "
                "tensor and a float one never stand in for each other. Check that the checkpoint matches its config "
                '(from_preset(..., quantization="int8") quantizes a float checkpoint while loading it).'
            )
        if quantizing:
            prefix, name = key.rsplit("/", 1)
            float_value = jnp.asarray(value, dtype=self.layers[prefix].variable_dtype)
            set_quantized_layer(variable, self.variables[key + SCALE_SUFFIX], float_value, layer, INPUT_AXES[name])
            self.filled[key + SCALE_SUFFIX].add(layer)
        elif layer is None:
            variable.assign(jnp.asarray(value, dtype=variable.dtype))
        else:
            set_layer(variable, jnp.asarray(value, dtype=variable.dtype), layer)
        self.filled[key].add(layer)
        release_freed_memory()

    def finish(self, where: str) -> None:
        """Raise if any variable (or decoder layer slice) was not written."""
        missing = []
        for key, done in self.filled.items():
            if key.startswith(STACKED_PREFIX):
                layers = set(range(self.model.num_layers)) - done
                missing += [f"{key} (layer {i})" for i in sorted(layers)]
            elif None not in done:
                missing.append(key)
        if missing:
            raise ValueError(
                f"The preset at {where} lacks weights for {len(missing)} "
                f"variable(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
            )


def set_params(model, params: dict) -> None:
    """Assign a params pytree (as `model.params()` returns) to `model`."""
    flat = {}
    for group, values in params.items():
        for name, value in values.items():
            if isinstance(value, dict):
                for leaf, array in value.items():
                    flat[f"{group}/{name}/{leaf}"] = array
            else:
                flat[f"{group}/{name}"] = value
    variables = model_variables(model)
    if set(flat) != set(variables):
        raise ValueError(f"`params` keys {sorted(set(flat) ^ set(variables))} do not match the model's variables.")
    for key, value in flat.items():
        variables[key].assign(value)
