"""Arrays stacked over decoder layers (a leading `[num_layers]` axis): the
stacked weights, and writing one layer's slice of a stacked array in place.

XLA:CPU has no in-place dynamic-update-slice for 16-bit floats: it updates a
bfloat16 or float16 buffer by converting the whole buffer to float32 and back,
a pass over every layer's slice for each layer written (quadratic in depth).
Reading one layer's slice of a buffer that is also written likewise converts
all of it. The same bits viewed as `uint16` are read and written in place, so
buffers written one slice at a time hold 16-bit floats as `uint16` while they
are written: the decoder carries the KV cache so (`to_bits`, `from_bits`),
and single writes (generation's per-step buffers) go through `update_slice`.
Reading one layer of a stacked 16-bit array (`layer_of`, the decoder's
weights) likewise goes through the bits. The bitcasts are exact.

A layer read from the stack inside a compiled loop is still a copy: XLA:CPU
writes the slice out before each matrix product reads it. A one-token decode
step, which reads every weight once, pays that copy in full, so generation's
decode loop on CPU takes `layer_views` instead: per-layer arrays that share
the stack's memory (no copy, no extra memory).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.runtime import compile_cache

_BITS = jnp.uint16  # the carrier of 16-bit floats


def add_stacked_weights(layer, num_layers: int, shapes: dict, initializer) -> tuple[str, ...]:
    """Create one variable per `shapes` entry on `layer`, shaped
    `(num_layers, *shape)`, set as an attribute of the same name; return the names."""
    for name, shape in shapes.items():
        variable = layer.add_weight(
            name=name,
            shape=(num_layers,) + tuple(shape),
            initializer=initializer,
            dtype=layer.variable_dtype,
        )
        setattr(layer, name, variable)
    return tuple(shapes)


def _is_half(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


@jax.custom_jvp
def update_slice(buffer, update, start_indices):
    """`jax.lax.dynamic_update_slice(buffer, update, start_indices)` that
    XLA writes in place for every dtype (16-bit floats through their bits),
    with the plain update's derivative (a bitcast has none).

    Example:
    >>> cache = update_slice(cache, new_keys[None], (layer, 0, 0, slot, 0))
    """
    bits = jax.lax.dynamic_update_slice(to_bits(buffer), to_bits(update.astype(buffer.dtype)), start_indices)
    return from_bits(bits, buffer.dtype)


@update_slice.defjvp
def _update_slice_jvp(primals, tangents):
    buffer, update, start_indices = primals
    buffer_tangent, update_tangent, _ = tangents
    tangent = jax.lax.dynamic_update_slice(buffer_tangent, update_tangent.astype(buffer_tangent.dtype), start_indices)
    return update_slice(buffer, update, start_indices), tangent


def layer_of(stacked, layer):
    """Layer `layer` (an int or traced index) of a stacked `[L, ...]` array,
    read through the bits of 16-bit floats (`read_through_bits`): XLA:CPU
    has no bfloat16 dynamic-slice either, and converts the whole stack to
    float32 to slice it (hoisted out of the decoder's loop, a float32 copy of
    every layer: 13.6 GiB beside Phi-3-mini's 7.1 GiB of bfloat16 weights).

    Example:
    >>> kernel = layer_of(params["attention"]["query_kernel"], 3)   # [D, Hq, dh]
    """
    return read_through_bits(_index_layer, stacked, layer)


def _index_layer(stacked, layer):
    return jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)


def read_through_bits(read, array, index):
    """`read(array, index)`, a slice or gather of `array` at the integer
    `index`: for 16-bit floats done on their `uint16` bits (exact
    bitcasts), with `read`'s own derivative (a bitcast has none: gradients
    through the bits alone would be silently zero); other dtypes are read
    as they are.

    For the bits, a barrier ties `array` to `index`, so the bitcast of the
    whole array is not hoisted out of a loop as a copy of it; inside, XLA
    fuses it into the read, which touches only what it returns.

    Example:
    >>> read_through_bits(lambda a, i: jnp.take(a, i, axis=0), table, token_ids)   # rows [B, T, D]
    """
    if not _is_half(array.dtype):
        return read(array, index)
    return _read_bits(read, array, index)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _read_bits(read, array, index):
    array, index = jax.lax.optimization_barrier((array, index))
    return from_bits(read(to_bits(array), index), array.dtype)


@_read_bits.defjvp
def _read_bits_jvp(read, primals, tangents):
    array, index = primals
    return _read_bits(read, array, index), read(tangents[0], index)


def layer_slice(model, stacked, index):
    """Layer `index` of a stacked `[L, ...]` buffer (`layer_of`), compiled
    once per shape in `model`'s compile cache (the process-wide one for
    `model=None`); the index is an input, so one program serves every layer
    (the writers and `quantize` call it per tensor)."""
    return compile_cache.traceable(model, ("stacked.layer_slice",), layer_of)(stacked, index)


def _with_layer(stacked, value, index):
    return update_slice(stacked, value[None], (index,) + (0,) * value.ndim)


def set_layer(variable, value, layer: int) -> None:
    """Write `value` (one layer's shape and the variable's dtype) as layer
    `layer` of the stacked `variable`, in place: the old buffer is donated,
    so no second copy of the stack is made.

    Example:
    >>> set_layer(model.decoder.mlp.down_kernel, down, 3)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers")
        write = compile_cache.traceable(None, ("stacked.set_layer",), _with_layer, donate_argnums=0)
        variable.assign(write(variable.value, value, layer))


def slices_recomputed(body):
    """`body` (of a `lax.scan` over layers) that, when differentiated, keeps
    only its matrix products' results for the backward pass and recomputes
    the rest there, each layer's weight slice (`layer_of`) included: JAX
    stacks what a scan keeps over its iterations, which for the slices (or
    any value made from them) is a copy of the weights, on XLA:CPU widened to
    float32 too (Phi-3-mini in bfloat16: 13.7 GiB for a 16-token gradient
    beside 7.1 GiB of weights). Without differentiation `body` runs as it is.

    Example:
    >>> x = jax.lax.scan(slices_recomputed(step), x, jnp.arange(num_layers))[0]
    """
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint(body, policy=policy, prevent_cse=False)


def to_bits(array):
    """`array` as its `uint16` bits when it holds 16-bit floats, else itself."""
    return jax.lax.bitcast_convert_type(array, _BITS) if _is_half(array.dtype) else array


def from_bits(array, dtype):
    """Undo `to_bits`: `array` viewed as `dtype` (itself when it is one)."""
    return array if array.dtype == dtype else jax.lax.bitcast_convert_type(array, dtype)


def layer_views(stacked) -> list | None:
    """The layers of `stacked` (a pytree of `[L, ...]` arrays) as a list of
    per-layer pytrees of arrays that share the stacked arrays' memory, or
    None where that is not possible: arrays not on one CPU device, or a
    layer that JAX would copy rather than alias (it aliases host memory that
    is suitably aligned; a layer it copied is dropped at once).

    A compiled program reads each view in place, where reading a layer of
    the stack (`layer_of`) writes it out first on XLA:CPU. The views keep
    the stacked arrays alive.

    Example:
    >>> layers = layer_views(params["decoder"])   # or None
    >>> layers[3]["attention"]["query_kernel"].shape   # [D, Hq, dh]
    """
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves or not all(_on_one_cpu(leaf) for leaf in leaves):
        return None
    # `np.asarray` of a CPU array is a view of its buffer; `device_put` of a
    # view of one layer aliases it when the layer's start is aligned.
    host = [np.asarray(leaf) for leaf in leaves]
    layers = []
    for layer in range(leaves[0].shape[0]):
        views = [jax.device_put(array[layer], leaf.sharding) for array, leaf in zip(host, leaves)]
        if not all(_aliases(view, leaf, layer) for view, leaf in zip(views, leaves)):
            return None
        layers.append(jax.tree.unflatten(treedef, views))
    return layers


def _on_one_cpu(array) -> bool:
    devices = getattr(array, "sharding", None) and array.sharding.device_set
    return bool(devices) and len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _aliases(view, stacked, layer: int) -> bool:
    """Whether `view` is layer `layer` of `stacked` in place (not a copy)."""
    offset = layer * view.size * view.dtype.itemsize
    return view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + offset
