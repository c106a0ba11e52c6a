"""Checks a preset passes before its model is allocated.

A `config.json` that disagrees with its tensors (a `hidden_size` edited to
10,000,000) would otherwise build a model of the config's size and fail
inside the allocator (`RESOURCE_EXHAUSTED`) before a single tensor is read.
Here the config's size arguments are compared with the tensors' shapes,
read from the files' headers (safetensors JSON headers, HDF5 metadata; no
data), and the model's weight bytes, counted from a model built without
allocating its variables, are compared with the memory available.

Each format describes where its files show each size argument: `Probe`s,
one tensor each, whose axes name the config arguments that set them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from phi3lab.model.config import BackboneConfig
from phi3lab.tracing.memory import check_weights_fit


@dataclasses.dataclass(frozen=True)
class Axis:
    """One axis of a tensor: the config arguments that set its size, and how.

    Attributes:
        keys: `BackboneConfig` field names the size depends on.
        size: the size, from a validated `BackboneConfig`.
    """

    keys: tuple[str, ...]
    size: Callable[[BackboneConfig], int]


@dataclasses.dataclass(frozen=True)
class PresetLayout:
    """Where a preset format's tensors show the config's size arguments.

    Attributes:
        probes: tensor name -> its axes; a tensor the files lack is skipped
            (the weight loader names missing tensors).
        layer_pattern: matches a tensor name of a decoder layer; its first
            group is the layer index (no group or an empty one: layer 0).
        file_keys: `BackboneConfig` field -> the name the format's config
            file gives it (fields not listed keep their name).
    """

    probes: dict[str, tuple[Axis, ...]]
    layer_pattern: re.Pattern
    file_keys: dict[str, str] = dataclasses.field(default_factory=dict)


def axis(*keys: str) -> Axis:
    """An axis whose size is the product of the named config fields
    (`"head_dim"` included: hidden_dim // num_query_heads)."""
    needs = tuple(
        dict.fromkeys(k for key in keys for k in (("hidden_dim", "num_query_heads") if key == "head_dim" else (key,)))
    )
    return Axis(needs, lambda config: math.prod(getattr(config, key) for key in keys))


def check_preset_fits(
    build: Callable[[], keras.Model],
    config: dict,
    shapes: dict[str, tuple[int, ...]],
    layout: PresetLayout,
    where: Path,
    overrides: dict,
) -> None:
    """Refuse a preset whose config disagrees with its tensors, or whose
    weights would not fit in the memory available; allocate nothing.

    Args:
        build: makes the model; called inside a `keras.StatelessScope` that
            leaves its variables unallocated.
        config: the constructor arguments the model is built with.
        shapes: every tensor of the preset's weight files -> its shape.
        layout: where the format's tensors show the config's sizes.
        where: the config file, named in messages with its own keys.
        overrides: from_preset's arguments, named as such where they set a size.

    Raises:
        ValueError: a size argument disagrees with a tensor's shape; names the
            config key, the tensor and both shapes.
        phi3lab.tracing.WeightsTooLarge: the weights exceed the memory available.
    """
    model = declared_model(build)
    architecture = BackboneConfig(**{name: config[name] for name in BackboneConfig.names() if name in config})

    def said(keys) -> str:
        values = [
            f"{key}={getattr(architecture, key)} (a from_preset argument)"
            if key in overrides
            else f"{layout.file_keys.get(key, key)}={getattr(architecture, key)}"
            for key in keys
        ]
        return f"{where}: {', '.join(values)} {'disagrees' if len(values) == 1 else 'disagree'} with the weights"

    _check_layer_count(architecture, shapes, layout, said)
    for name, axes in layout.probes.items():
        if name not in shapes:
            continue
        found, implied = tuple(shapes[name]), tuple(a.size(architecture) for a in axes)
        if found != implied:
            wrong = [a for a, f, i in zip(axes, found, implied) if f != i] or list(axes)
            raise ValueError(
                f"{said(dict.fromkeys(k for a in wrong for k in a.keys))}: tensor {name!r} has shape {found}, "
                f"but the config implies shape {implied}. The config.json does not belong to these weights "
                "(or was edited): fix the value to match the tensors."
            )
    # An int8 model is declared with its int8 kernels (never float ones), so
    # these are the bytes loading allocates, quantizing as it reads.
    weights = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)
    kernels = ", the projection kernels in int8" if model.quantization == "int8" else ""
    check_weights_fit(weights, f"{model.count_params():,} parameters in {model.dtype_policy.variable_dtype}{kernels}")


def declared_model(build: Callable[[], keras.Model]) -> keras.Model:
    """`build()` inside a `keras.StatelessScope` that leaves its variables
    unallocated (this validates every argument and gives every variable's
    shape and dtype). Keras lists such variables in its global state and
    allocates them all at the next scope that initializes variables (any
    symbolic call, e.g. building a functional model), so the list is put
    back as it was: the declared model is never allocated, and an edited
    config (a hidden size of 10,000,000) cannot make a later, unrelated
    keras call run out of memory."""
    from keras.src.backend.common import global_state

    pending = list(global_state.get_global_attribute("uninitialized_variables", []) or [])
    try:
        with keras.StatelessScope(initialize_variables=False):
            return build()
    finally:
        global_state.set_global_attribute("uninitialized_variables", pending)


def _check_layer_count(architecture, shapes, layout, said):
    layers = set()
    for name in shapes:
        match = layout.layer_pattern.match(name)
        if match:
            layers.add(int(match.group(1) or 0))
    if layers and layers != set(range(architecture.num_layers)):
        last = max(layers)
        example = next(n for n in shapes if (m := layout.layer_pattern.match(n)) and int(m.group(1) or 0) == last)
        raise ValueError(
            f"{said(['num_layers'])}: they hold "
            f"{len(layers)} decoder layers (indices {min(layers)} to {last}, e.g. tensor {example!r}). "
            "The config.json does not belong to these weights (or was edited): fix the value to match the tensors."
        )
