"""Weight-only int8 quantization of the stacked projection kernels.

A kernel `w` becomes `int8 = round(w / scale)` (clipped to [-127, 127]) and a
float32 `scale = max|w| / 127` per output channel: the maximum runs over the
kernel's input axes, separately for each layer of the stack, and `scale`
keeps those axes with size 1 so that `int8 * scale` broadcasts back to `w`.
The int8 kernel keeps the variable's name; its scale is `<name>_scale`. The
layers dequantize with `dequantize` inside their `apply`, so the compiled
program holds one layer's float kernels at a time.
"""

from __future__ import annotations

import gc
import weakref

import keras
from jax import numpy as jnp

from phi3lab.runtime import compile_cache

SCALE_SUFFIX = "_scale"
# The input axes of each projection kernel (one layer's shape): the scale is
# one number per remaining (output) entry.
INPUT_AXES = {
    "query_kernel": (0,),  # [D, Hq, dh]
    "key_kernel": (0,),  # [D, Hkv, dh]
    "value_kernel": (0,),  # [D, Hkv, dh]
    "output_kernel": (0, 1),  # [Hq, dh, D]
    "gate_kernel": (0,),  # [D, F]
    "up_kernel": (0,),  # [D, F]
    "down_kernel": (0,),  # [F, D]
}


def quantize_int8(kernel, input_axes: tuple[int, ...]):
    """`(int8 kernel, float32 scale)` of a float kernel, scales per output
    channel (reducing over `input_axes`, kept as size-1 axes).

    Example:
    >>> q, scale = quantize_int8(jnp.array([[1.0, -4.0], [0.25, 1.0]]), (0,))
    >>> q.tolist(), scale.shape
    ([[127, -127], [32, 32]], (1, 2))
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    peak = jnp.max(jnp.abs(kernel), axis=input_axes, keepdims=True)
    scale = jnp.where(peak > 0, peak / 127.0, 1.0).astype(jnp.float32)
    quantized = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
    return quantized, scale


def _quantize_jit(kernel, input_axes: tuple[int, ...]):
    """`quantize_int8`, compiled once per kernel shape and axes in the
    process-wide compile cache (traceable: `jax.eval_shape` runs it)."""
    key = ("quantize_int8", input_axes, tuple(kernel.shape), str(kernel.dtype))
    return compile_cache.traceable(None, key, lambda k: quantize_int8(k, input_axes))(kernel)


def quantize_stacked_weights(layer, input_axes: dict[str, tuple[int, ...]] = INPUT_AXES) -> None:
    """Replace each stacked float kernel of `layer` (keyed in `input_axes`,
    axes counted without the leading layer axis) by an int8 variable of the
    same name plus a float32 `<name>_scale` variable, both non-trainable.
    Updates `layer.stacked_weight_names`; kernels and scales alternate, in
    the layer's weight order, so a quantized model built from its config
    holds its variables in the same order as one quantized in place."""
    names = []
    for name in layer.stacked_weight_names:
        variable = getattr(layer, name)
        axes = tuple(axis + 1 for axis in input_axes[name])  # skip the layer axis
        quantized, scale = _quantize_jit(variable.value, axes)
        # keras' `Layer.__delattr__` runs a full `gc.collect()` per variable:
        # over a second each in a process holding many objects (TensorFlow
        # imported), most of quantizing a small model. Untrack and delete the
        # variable directly; collect only if a reference cycle still holds
        # it, so one float kernel at a time is in memory.
        freed = weakref.ref(variable)
        layer._untrack_variable(variable)
        object.__delattr__(layer, name)
        del variable
        if freed() is not None:
            gc.collect()
        for suffix, value in (("", quantized), (SCALE_SUFFIX, scale)):
            new = layer.add_weight(
                name=name + suffix, shape=value.shape, initializer="zeros", dtype=value.dtype, trainable=False
            )
            new.assign(value)
            setattr(layer, name + suffix, new)
            names.append(name + suffix)
    layer.stacked_weight_names = tuple(names)


def quantize_layer(layer) -> None:
    """Quantize `layer`'s stacked kernels to int8 (`quantize_stacked_weights`)
    and give it keras' int8 policy for its float one, so that
    `layer.quantization_mode == "int8"` and its compute dtype is unchanged.

    Example:
    >>> quantize_layer(model.decoder.mlp)
    >>> model.decoder.mlp.dtype_policy.name
    'int8_from_float32'
    """
    quantize_stacked_weights(layer)
    # keras' flag for "the weights already match the quantized policy": the
    # `dtype_policy` setter would otherwise call keras' `Layer.quantize`.
    layer._is_quantized = True
    layer.dtype_policy = keras.dtype_policies.get(f"int8_from_{layer.dtype_policy.name}")


def dequantize(params: dict, dtype) -> dict:
    """One layer's kernels in `dtype`: an int8 kernel with a `<name>_scale`
    entry becomes `kernel * scale`, a float kernel is cast."""
    return {
        name: (
            value.astype(dtype) * params[name + SCALE_SUFFIX].astype(dtype)
            if name + SCALE_SUFFIX in params
            else value.astype(dtype)
        )
        for name, value in params.items()
        if not name.endswith(SCALE_SUFFIX)
    }


def float_weight(layer, name: str, dtype=None):
    """One stacked kernel of `layer` as floats (dequantized if int8), in
    `dtype` (default: the layer's compute dtype)."""
    params = {key: getattr(layer, key).value for key in (name, name + SCALE_SUFFIX) if hasattr(layer, key)}
    return dequantize(params, dtype or layer.compute_dtype)[name]
