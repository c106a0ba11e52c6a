"""Filling a backbone's (stacked) variables one checkpoint tensor at a time."""

from __future__ import annotations

import warnings

import numpy as np
from jax import numpy as jnp

from phi3lab.model.stacked import layer_of, update_slice
from phi3lab.runtime import compile_cache
from phi3lab.runtime.host_memory import release_freed_memory


def _write_layer(stacked, value, index):
    return update_slice(stacked, value[None], (index,) + (0,) * value.ndim)


def _set_layer(model, stacked, value, index):
    """`stacked` `[L, ...]` with layer `index` set to `value`, written in
    place (`stacked` is donated) by one program per shape in `model`'s
    compile cache; the index is an input, so every layer shares it."""
    return compile_cache.traceable(model, ("presets.set_layer",), _write_layer, donate_argnums=0)(stacked, value, index)


def layer_slice(model, stacked, index):
    """Layer `index` of a stacked `[L, ...]` buffer of `model` (`layer_of`),
    by one program per shape in `model`'s compile cache; the index is an
    input, so every layer shares it (the writers call it per tensor)."""
    return compile_cache.traceable(model, ("presets.layer_slice",), layer_of)(stacked, index)


def model_variables(model) -> dict:
    """`{"decoder/attention/query_kernel": variable, ...}` for a backbone."""
    layers = model.weight_layers()
    return {f"{prefix}/{name}": getattr(layer, name) for prefix, layer in layers.items() for name in layer.params()}


STACKED_PREFIX = "decoder/"


class WeightFiller:
    """Writes tensors into a model's variables and checks nothing is missed.

    Stacked decoder variables are filled one layer slice at a time, updated
    in place (the old buffer is donated), so loading never holds a second
    copy of the model.

    Example:
    >>> filler = WeightFiller(model)
    >>> filler.put("final_norm/scale", np.ones(64), source="model.norm.weight")
    >>> filler.finish("/path/to/preset")   # raises if a tensor was never put
    """

    def __init__(self, model):
        self.model = model
        self.variables = model_variables(model)
        self.filled: dict[str, set] = {key: set() for key in self.variables}

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
        if np.issubdtype(value.dtype, np.integer) != jnp.issubdtype(variable.dtype, jnp.integer):
            raise ValueError(
                f"Tensor {source!r} holds {value.dtype} values, but {key} is {variable.dtype}: an int8-quantized "
                "tensor and a float one never stand in for each other. Check that the checkpoint matches its config."
            )
        value = jnp.asarray(value, dtype=variable.dtype)
        if layer is None:
            variable.assign(value)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers")
                variable.assign(_set_layer(self.model, variable.value, value, layer))
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
