"""What a view sends to the browser: packed heatmap values and the bytes of
its widget state."""

from __future__ import annotations

import base64
import json

import numpy as np
import plotly.graph_objects as go

from phi3lab.widgets.figure import PlotlyBundle


def packed(values) -> dict:
    """`values` as a plotly typed-array spec (base64 of the raw bytes).

    A FigureWidget sends NumPy arrays to the browser as JSON lists of
    float64 text (~20 bytes a number); packed, a float32 costs 5.3 bytes,
    keeps every bit, and NaN stays a gap. `unpacked` reads it back.
    """
    values = np.ascontiguousarray(values)
    dtype = {np.dtype(np.float32): "f4", np.dtype(np.float64): "f8"}.get(values.dtype)
    if dtype is None:
        values, dtype = values.astype(np.float64), "f8"
    spec = {"dtype": dtype, "bdata": base64.b64encode(values.tobytes()).decode("ascii")}
    if values.ndim > 1:
        spec["shape"] = ", ".join(str(n) for n in values.shape)
    return spec


def unpacked(value) -> np.ndarray:
    """The NumPy array behind a figure property (`packed` spec, list or array)."""
    if isinstance(value, dict) and "bdata" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), {"f4": np.float32, "f8": np.float64}[value["dtype"]])
        shape = [int(n) for n in value.get("shape", str(array.size)).split(",")]
        return array.reshape(shape)
    return np.asarray(value)


def payload_bytes(view, code: bool = True) -> int:
    """Bytes of widget state a view (or widget) sends to the browser when
    displayed now: the JSON of every widget model it reaches, binary buffers
    base64-encoded, as `ipywidgets.embed` saves them into a notebook.

    A plotly FigureWidget's synced state holds its data as first built and
    sends later edits as messages; it is counted with its current data and
    layout instead, which is what a browser displaying it now receives.
    With `code=True`, the JavaScript in the state is counted too: each
    anywidget model's `_esm` / `_css`, and plotly.js (~5 MB) once, in the
    page's shared `PlotlyBundle` (`phi3lab.widgets.figure`); `code=False`
    counts the data alone.
    """
    from ipywidgets import embed
    from ipywidgets.widgets.widget import _instances

    widget = getattr(view, "widget", view)
    state = embed.dependency_state([widget], drop_defaults=True)
    for model_id, entry in state.items():
        instance = _instances.get(model_id)
        if isinstance(instance, go.FigureWidget):
            entry["state"]["_widget_data"] = instance._data
            entry["state"]["_widget_layout"] = instance._layout
        for trait in ("_esm", "_css"):
            if trait in entry["state"] or (code and instance is not None and instance.has_trait(trait)):
                entry["state"][trait] = str(getattr(instance, trait)) if code else ""
        if isinstance(instance, PlotlyBundle) and not code:
            entry["state"]["code"] = ""
    return len(json.dumps(state, separators=(",", ":"), default=_json_default).encode())


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
