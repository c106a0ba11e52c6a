"""Weight-only int8 quantization of the stacked projection kernels.

A kernel `w` becomes `int8 = round(w / scale)` (clipped to [-127, 127]) and a
float32 `scale = max|w| / 127` per output channel: the maximum runs over the
kernel's input axes, separately for each layer of the stack, and `scale`
keeps those axes with size 1 so that `int8 * scale` broadcasts back to `w`.
The int8 kernel keeps the variable's name; its scale is `<name>_scale`. The
layers dequantize with `dequantize` inside their `apply`, so the compiled
program holds one layer's float kernels at a time. Quantizing (in
`quantize("int8")`, or while a preset is read) and building a quantized
model never hold a float copy of a whole stack either: kernels are declared
int8 and quantized one layer slice at a time.
"""

from __future__ import annotations

import gc
import weakref

import keras
from jax import numpy as jnp

from phi3lab.model.stacked import add_stacked_weights, layer_slice, set_layer
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


def scale_shape(shape: tuple[int, ...], input_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the scale of a kernel of `shape`: its input axes kept with size 1.

    Example:
    >>> scale_shape((3072, 32, 96), (0,))
    (1, 32, 96)
    """
    return tuple(1 if axis in input_axes else size for axis, size in enumerate(shape))


def set_quantized_layer(kernel, scale, value, layer: int, input_axes: tuple[int, ...]) -> None:
    """Quantize one layer's float kernel `value` (`quantize_int8`) and write
    it and its scale as layer `layer` of the stacked int8 `kernel` and
    float32 `scale` variables, in place. Loading and `quantize("int8")` both
    quantize through here, one layer at a time, so no float copy of a whole
    stack is made and a kernel quantized while it is read equals, bit for
    bit, the same kernel loaded as floats and quantized after.

    Args:
        kernel, scale: the stacked variables, `[L, *shape]` and `[L, *scale_shape]`.
        value: float array of one layer's kernel shape.
        layer: the layer index.
        input_axes: the kernel's input axes, counted in one layer's shape.
    """
    quantized, scales = _quantize_jit(value, input_axes)
    set_layer(kernel, quantized, layer)
    set_layer(scale, scales, layer)


def add_projection_kernels(layer, num_layers: int, shapes: dict, initializer) -> tuple[str, ...]:
    """Create `layer`'s stacked projection kernels (`shapes`: name -> one
    layer's shape); return the names of the variables made, in order.

    Float kernels (`stacked.add_stacked_weights`) unless `layer` holds
    keras' int8 policy (`Phi3Backbone(quantization="int8")`): then each
    kernel is declared int8 from the start, with its float32
    `<name>_scale` after it (the variables `quantize("int8")` leaves, in
    the same order), and no float stack is ever allocated. Inside
    `zero_initialization()` (a model about to be loaded) they hold zeros
    and unit scales (the quantization of zero kernels); otherwise each
    layer's kernel is drawn from `initializer` in the layer's variable
    dtype and quantized, one layer at a time.
    """
    if layer.quantization_mode != "int8":
        return add_stacked_weights(layer, num_layers, shapes, initializer)
    names = []
    for name, shape in shapes.items():
        axes = INPUT_AXES[name]
        kernel, scale = _add_int8_pair(layer, name, (num_layers, *shape), axes)
        if not isinstance(initializer, keras.initializers.Zeros):
            for index in range(num_layers):
                set_quantized_layer(kernel, scale, initializer(shape, dtype=layer.variable_dtype), index, axes)
        names += [name, name + SCALE_SUFFIX]
    layer._is_quantized = True  # keras' flag: the weights match the int8 policy
    return tuple(names)


def _add_int8_pair(layer, name: str, shape: tuple[int, ...], input_axes: tuple[int, ...]):
    """Declare the stacked int8 kernel `name` of `shape` (`[L, ...]`) and
    its float32 scale on `layer` (zeros and ones), set as attributes."""
    scale_axes = tuple(axis + 1 for axis in input_axes)  # skip the layer axis
    pair = []
    for suffix, dtype, variable_shape, initializer in (
        ("", "int8", shape, "zeros"),
        (SCALE_SUFFIX, "float32", scale_shape(shape, scale_axes), "ones"),
    ):
        variable = layer.add_weight(
            name=name + suffix, shape=variable_shape, initializer=initializer, dtype=dtype, trainable=False
        )
        setattr(layer, name + suffix, variable)
        pair.append(variable)
    return pair


def quantize_stacked_weights(layer, input_axes: dict[str, tuple[int, ...]] = INPUT_AXES) -> None:
    """Replace each stacked float kernel of `layer` (keyed in `input_axes`,
    axes counted without the leading layer axis) by an int8 variable of the
    same name plus a float32 `<name>_scale` variable, both non-trainable,
    quantized one layer slice at a time (`set_quantized_layer`).
    Updates `layer.stacked_weight_names`; kernels and scales alternate, in
    the layer's weight order, so a quantized model built from its config
    (`add_projection_kernels`) holds its variables in the same order."""
    names = []
    for name in layer.stacked_weight_names:
        variable = getattr(layer, name)
        # keras' `Layer.__delattr__` runs a full `gc.collect()` per variable:
        # over a second each in a process holding many objects (TensorFlow
        # imported), most of quantizing a small model. Untrack the variable
        # and detach it directly, so its int8 successor takes its place.
        layer._untrack_variable(variable)
        object.__delattr__(layer, name)
        kernel, scale = _add_int8_pair(layer, name, tuple(variable.shape), input_axes[name])
        for index in range(variable.shape[0]):
            set_quantized_layer(kernel, scale, layer_slice(None, variable.value, index), index, input_axes[name])
        # Collect only if a reference cycle still holds the float kernel, so
        # one float kernel at a time is in memory.
        freed = weakref.ref(variable)
        del variable
        if freed() is not None:
            gc.collect()
        names += [name, name + SCALE_SUFFIX]
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
    layer.dtype_policy = int8_policy(layer.dtype_policy)


def int8_policy(policy: keras.DTypePolicy) -> keras.DTypePolicy:
    """keras' int8 policy over the float `policy` (`"int8_from_<name>"`)."""
    return keras.dtype_policies.get(f"int8_from_{policy.name}")


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
