"""Sharding a Phi-3 backbone over a device mesh with `keras.distribution`.

Weights are split over the mesh's `"model"` axis along heads (attention) and
the intermediate width (MLP); the batch is split over `"batch"`. `trace` then
runs the same compiled program, partitioned by XLA; results come back to the
host whole.

Recipe (a TPU v3-8, several GPUs, or 8 simulated CPU devices with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`):

```python
import keras, phi3lab
from phi3lab.sharding import model_parallel

keras.distribution.set_distribution(model_parallel(model_axis=8))
model = phi3lab.Phi3Backbone.from_preset("phi3_mini_128k_instruct_en", dtype="bfloat16")
tr = phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern", queries=slice(-128, None))
```
"""

from __future__ import annotations

import keras
import numpy as np

from phi3lab.errors import bad_argument

# Variable path pattern -> which axis goes on the "model" mesh axis.
MODEL_AXIS = {
    r"^token_embedding/embeddings$": 1,  # [V, D]
    r"^token_embedding/reverse_embeddings$": 1,  # [D, V]
    r"^attention/query_kernel$": 2,  # [L, D, Hq, dh]
    r"^attention/key_kernel$": 2,  # [L, D, Hkv, dh]
    r"^attention/value_kernel$": 2,  # [L, D, Hkv, dh]
    r"^attention/output_kernel$": 1,  # [L, Hq, dh, D]
    r"^mlp/gate_kernel$": 2,  # [L, D, F]
    r"^mlp/up_kernel$": 2,  # [L, D, F]
    r"^mlp/down_kernel$": 1,  # [L, F, D]
}
RANKS = {r"^token_embedding/": 2, r"^attention/": 4, r"^mlp/": 3}


def layout_map(mesh: "keras.distribution.DeviceMesh", num_key_value_heads: int | None = None):
    """A `LayoutMap` placing Phi-3's weights on `mesh` (axes "batch", "model").

    Key/value kernels are replicated when `num_key_value_heads` does not
    divide the model axis evenly; norms are always replicated.
    """
    size = dict(zip(mesh.axis_names, mesh.shape))["model"]
    layouts = keras.distribution.LayoutMap(mesh)
    for pattern, axis in MODEL_AXIS.items():
        rank = next(r for prefix, r in RANKS.items() if pattern.startswith(prefix))
        spec = [None] * rank
        kv = "key_kernel" in pattern or "value_kernel" in pattern
        if not (kv and num_key_value_heads is not None and num_key_value_heads % size):
            spec[axis] = "model"
        layouts[pattern] = tuple(spec)
    return layouts


def model_parallel(model_axis: int | None = None, num_key_value_heads: int | None = None, devices=None):
    """A `keras.distribution.ModelParallel` for Phi-3 over all (or `devices`)
    devices: `model_axis` devices split the weights, the rest split the batch.

    Args:
        model_axis: devices along the "model" axis; default all devices.
        num_key_value_heads: the model's key/value heads, to decide whether
            key/value kernels can be split (they are replicated otherwise).
        devices: device list; default `keras.distribution.list_devices()`.
    """
    devices = devices or keras.distribution.list_devices()
    model_axis = model_axis or len(devices)
    if len(devices) % model_axis:
        raise bad_argument("model_axis", model_axis, f"a divisor of the {len(devices)} devices")
    mesh = keras.distribution.DeviceMesh(
        shape=(len(devices) // model_axis, model_axis), axis_names=("batch", "model"), devices=devices
    )
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh, num_key_value_heads), batch_dim_name="batch")


class BatchMesh:
    """Where batches run: one device, or their rows split over every device
    (data parallel), the weights replicated, or left where a
    `keras.distribution` put them (its mesh is then used, along `"batch"`).

    The one batch-placement helper of the package: corpus collection
    (`phi3lab.activations.collect`) and dictionary training
    (`phi3lab.features.train`) both place their batches with it.

    Args:
        params: None, or the weights that will run (a pytree): when they
            already lie on a mesh with a `"batch"` axis, that mesh is kept.
        devices: the devices; default `jax.devices()`.

    Attributes:
        size: devices along the batch axis (1 on one device).

    Example:
    >>> mesh = BatchMesh(model.params())
    >>> params, ids, mask = mesh.put(model.params(), ids, mask)    # rows split, weights replicated
    """

    def __init__(self, params=None, devices=None):
        import jax

        devices = list(devices or jax.devices())
        self.size = len(devices)
        self._rows = self._replicated = None
        if self.size == 1:
            return
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        placed = [leaf.sharding for leaf in jax.tree.leaves(params) if len(leaf.sharding.device_set) > 1]
        if placed and isinstance(placed[0], NamedSharding) and "batch" in placed[0].mesh.axis_names:
            mesh = placed[0].mesh  # a keras.distribution mesh: keep its weights as they are
        else:
            mesh = Mesh(np.array(devices), ("batch",))
            self._replicated = NamedSharding(mesh, PartitionSpec())
        self._rows = NamedSharding(mesh, PartitionSpec("batch"))
        self.size = dict(zip(mesh.axis_names, mesh.devices.shape))["batch"]

    def rows(self, batch):
        """`batch` (an array or pytree, rows first) on the devices, its rows split."""
        import jax

        return jax.tree.map(jax.numpy.asarray, batch) if self._rows is None else jax.device_put(batch, self._rows)

    def replicate(self, tree):
        """`tree` (weights, optimizer state) copied to every device (left as
        it is on one device or on a `keras.distribution` mesh)."""
        import jax

        return tree if self._replicated is None else jax.device_put(tree, self._replicated)

    def put(self, params, *inputs) -> tuple:
        """`(params replicated, *inputs with their rows split)`."""
        return (self.replicate(params), *(self.rows(x) for x in inputs))

    def round(self, size: int) -> int:
        """`size` rounded up to a multiple of the devices on the batch axis."""
        return -(-size // self.size) * self.size
