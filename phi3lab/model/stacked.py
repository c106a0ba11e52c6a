"""Weights stacked over decoder layers (a leading `[num_layers]` axis)."""

from __future__ import annotations


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
