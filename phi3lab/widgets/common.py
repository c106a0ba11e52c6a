"""What every view shares: colour scales, token labels, windows, the static
fallback and the `View` base class.

Colour scales are defined once, from matplotlib colormaps, so the live plotly
figures, the static PNGs and the coloured token strips agree:

- `SEQUENTIAL` ("Blues", white = 0) for probabilities and norms;
- `DIVERGING` ("RdBu_r", blue < 0 < red, white = 0) for signed values;
- `BLANK` (light grey) for cells that have no value (masked, `-inf`).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from typing import Callable, Sequence

import ipywidgets as widgets
import matplotlib
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phi3lab.errors import bad_argument

SEQUENTIAL = "Blues"
DIVERGING = "RdBu_r"
BLANK = "#d9d9d9"
HIGHLIGHT = "#ff7f0e"
GENERATED = "#2ca02c"  # marks generated tokens (after a trace's prompt_length)
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)


# === Colour scales ===
@dataclasses.dataclass(frozen=True)
class Scale:
    """A colormap and its value range, usable by plotly, matplotlib and CSS."""

    cmap: str
    vmin: float
    vmax: float

    @classmethod
    def probability(cls) -> "Scale":
        return cls(SEQUENTIAL, 0.0, 1.0)

    @classmethod
    def magnitude(cls, values) -> "Scale":
        """Sequential from 0 to the largest finite value."""
        top = _finite_max(np.abs(values))
        return cls(SEQUENTIAL, 0.0, top)

    @classmethod
    def signed(cls, values) -> "Scale":
        """Diverging, symmetric around 0 (0 is white)."""
        top = _finite_max(np.abs(values))
        return cls(DIVERGING, -top, top)

    def plotly(self, steps: int = 11) -> dict:
        """`colorscale`, `zmin`, `zmax` for a plotly heatmap."""
        cmap = matplotlib.colormaps[self.cmap]
        scale = [[i / (steps - 1), matplotlib.colors.to_hex(cmap(i / (steps - 1)))] for i in range(steps)]
        return dict(colorscale=scale, zmin=self.vmin, zmax=self.vmax)

    def matplotlib(self) -> dict:
        """`cmap`, `vmin`, `vmax` for `imshow` (NaN drawn in `BLANK`)."""
        cmap = matplotlib.colormaps[self.cmap].with_extremes(bad=BLANK)
        return dict(cmap=cmap, vmin=self.vmin, vmax=self.vmax)

    def rgb(self, values) -> np.ndarray:
        """uint8 RGB `[..., 3]` for `values`; NaN becomes `BLANK`."""
        values = np.asarray(values, np.float64)
        span = (self.vmax - self.vmin) or 1.0
        unit = np.clip((values - self.vmin) / span, 0.0, 1.0)
        colours = np.asarray(matplotlib.colormaps[self.cmap](np.nan_to_num(unit).ravel()))[:, :3]
        colours = colours.reshape(values.shape + (3,))
        colours[np.isnan(values)] = matplotlib.colors.to_rgb(BLANK)
        return np.round(colours * 255).astype(np.uint8)

    def css(self, value: float) -> tuple[str, str]:
        """Background and readable text colour for one value, as CSS hex."""
        r, g, b = (int(c) for c in self.rgb(value))
        text = "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"
        return f"#{r:02x}{g:02x}{b:02x}", text

    def png(self, values, pixels: int) -> bytes:
        """`values [rows, cols]` as a `pixels`-wide PNG (nearest neighbour)."""
        from PIL import Image

        image = Image.fromarray(self.rgb(values))
        height = max(1, round(pixels * values.shape[0] / max(values.shape[1], 1)))
        buffer = io.BytesIO()
        image.resize((pixels, height), Image.NEAREST).save(buffer, format="PNG")
        return buffer.getvalue()


def _finite_max(values) -> float:
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def blank_infinite(values) -> np.ndarray:
    """A copy with `-inf`/`inf` replaced by NaN, which every view draws blank."""
    values = np.array(values, copy=True)
    values[np.isinf(values)] = np.nan
    return values


def pool_max(values, size: int) -> np.ndarray:
    """Downsample `[..., rows, cols]` to at most `size x size` by block maxima
    (NaN-aware), so a thumbnail keeps the sharp, sparse attention peaks.
    Blocks are `ceil(n / size)` long from the start; the last may be shorter."""
    values = np.asarray(values, np.float32)
    for axis in (-2, -1):  # rows first: whole contiguous rows at a time
        factor = pool_factor(values.shape[axis], size)
        if factor > 1:
            values = np.fmax.reduceat(values, np.arange(0, values.shape[axis], factor), axis=axis)
    return values


def pool_factor(length: int, size: int) -> int:
    """How many positions one cell of `pool_max(..., size)` covers."""
    return -(-length // size)


# === Token labels ===
def position_labels(trace, batch: int, tokens: Sequence[str] | None = None) -> list[str]:
    """Display strings per position of row `batch`: `tokens` when given,
    else `trace.tokens`, else the token ids as `#17`. Padding is `[pad]`."""
    length = trace.token_ids.shape[1]
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if len(tokens) != length:
            raise bad_argument("tokens", f"{len(tokens)} strings", f"one display string per position ({length})")
    elif trace.tokens is not None:
        tokens = [str(t) for t in trace.tokens[batch]]
    else:
        tokens = [f"#{int(i)}" for i in trace.token_ids[batch]]
    valid = np.asarray(trace.padding_mask[batch], bool)
    return [visible(t) if ok else "[pad]" for t, ok in zip(tokens, valid)]


def prompt_length(trace) -> int | None:
    """The prompt's length when `trace` comes from generation (it sets
    `prompt_length`; positions from there on were generated), else None."""
    length = getattr(trace, "prompt_length", None)
    if length is None:
        return None
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise bad_argument("trace.prompt_length", length, "None or an int >= 0")
    return int(length)


def visible(token: str) -> str:
    """Make whitespace visible in a token string."""
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def axis_labels(labels: Sequence[str], positions: Sequence[int]) -> list[str]:
    """Unique category labels `"3 cat"` for plotly axes (plotly merges equal
    categories), with `<`, `>` and `&` escaped (plotly text is HTML)."""
    return [f"{p} {escape(labels[p])}" for p in positions]


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def vocabulary_labeler(tokenizer) -> Callable[[int], str]:
    """Token id -> display string for a `Phi3Tokenizer`, any object with
    `display_tokens`, `id_to_token` or `decode`, a list of strings (a toy
    vocabulary), or None (ids as `#17`)."""
    if tokenizer is None:
        return lambda i: f"#{int(i)}"
    if isinstance(tokenizer, (list, tuple)):
        return lambda i: visible(str(tokenizer[int(i)])) if int(i) < len(tokenizer) else f"#{int(i)}"
    if hasattr(tokenizer, "vocabulary_size") and hasattr(tokenizer, "display_tokens"):
        # Model rows past the tokenizer's ids (Phi-3: 32064 vs 32011) are unused.
        return lambda i: visible(tokenizer.display_tokens([int(i)], beyond_vocabulary="<unused {}>")[0])
    for method in ("display_tokens", "id_to_token", "decode"):
        if hasattr(tokenizer, method):
            fn = getattr(tokenizer, method)
            if method == "id_to_token":
                return lambda i: visible(str(fn(int(i))))
            return lambda i: visible(str(_first(fn([int(i)]))))
    raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer, a list of token strings, or None")


def _first(result):
    return result[0] if isinstance(result, (list, tuple)) else result


# === Windows over long inputs ===
def window(start: int, size: int, total: int) -> range:
    """Positions `[start, start + size)` clamped inside `[0, total)`."""
    size = min(size, total)
    start = min(max(int(start), 0), total - size)
    return range(start, start + size)


def column_highlight(positions: range, position: int) -> list[dict]:
    """Plotly shapes outlining the heatmap column of `position` when it lies
    in the displayed `positions` window (none otherwise)."""
    if position not in positions:
        return []
    column = position - positions.start
    return [
        dict(
            type="rect",
            xref="x",
            yref="paper",
            x0=column - 0.5,
            x1=column + 0.5,
            y0=0,
            y1=1,
            line=dict(color=HIGHLIGHT, width=2),
        )
    ]


def window_slider(description: str, total: int, size: int, start: int = 0) -> widgets.IntSlider:
    """A slider choosing where a `size`-long window starts; hidden when the
    whole input fits."""
    slider = widgets.IntSlider(
        value=window(start, size, total).start,
        min=0,
        max=max(total - size, 0),
        step=1,
        description=description,
        continuous_update=False,
        style={"description_width": "initial"},
        layout=widgets.Layout(width="420px"),
    )
    if total <= size:
        slider.layout.display = "none"
    return slider


# === Figures ===
def base_layout(title: str, height: int = 420, width: int | None = None, **extra) -> dict:
    """The layout every live figure starts from.

    Without `width` the figure fills its container's width (plotly's
    autosize). The paper stays white, so figures read the same in light and
    dark notebook themes; margins leave room for colour-bar titles.
    """
    layout = dict(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=14)),
        template="plotly_white",
        font=FONT,
        height=height,
        autosize=width is None,
        margin=dict(l=70, r=30, t=50, b=60),
        plot_bgcolor=BLANK,
        paper_bgcolor="white",
    )
    if width is not None:
        layout["width"] = width
    layout.update(extra)
    return layout


def colorbar(title: str) -> dict:
    """A colour bar whose title sits above it (never clipped at the right edge)."""
    return dict(title=dict(text=title, side="top"), thickness=14, len=0.9)


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
    With `code=True`, the JavaScript each anywidget-based model carries in
    its state (`_esm`, `_css`: plotly.js, ~5 MB per FigureWidget) is
    counted too; `code=False` counts the data alone.
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
    return len(json.dumps(state, separators=(",", ":"), default=_json_default).encode())


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def live(figure: go.Figure, on_click=None) -> go.FigureWidget:
    """The live widget of a figure that is already fully built.

    Build first, wrap last: a FigureWidget's later edits travel as events,
    which its browser-side model misses while plotly.js is still loading
    (the figure then renders blank); its initial data and layout are state
    and always arrive. `on_click(trace, points, state)` handles clicks on
    the first trace.
    """
    widget = go.FigureWidget(figure)
    if on_click is not None:
        widget.data[0].on_click(on_click)
    return widget


def mpl_heatmap(
    ax,
    values,
    scale: Scale,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    x_labels=None,
    y_labels=None,
    max_ticks: int = 40,
):
    """Draw `values [rows, cols]` on `ax` with labels, ticks and a colour bar."""
    values = np.asarray(values, np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", **scale.matplotlib())
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for labels, set_ticks, set_labels, count, rotation in (
        (x_labels, ax.set_xticks, ax.set_xticklabels, values.shape[1], 90),
        (y_labels, ax.set_yticks, ax.set_yticklabels, values.shape[0], 0),
    ):
        if labels is not None:
            step = max(1, -(-count // max_ticks))
            ticks = list(range(0, count, step))
            set_ticks(ticks)
            set_labels([labels[i] for i in ticks], fontsize=7, rotation=rotation)
    ax.figure.colorbar(image, ax=ax, label=colorbar, fraction=0.046, pad=0.02)
    return image


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure outside pyplot (no global state, no GUI)."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="white")
    return buffer.getvalue()


# === The view base class ===
class View:
    """Base of every view: a live `.widget`, a `.static()` picture, and a
    notebook representation holding both.

    In JupyterLab the widget renders and stays live; where no widget
    frontend runs (nbconvert, nbmake, GitHub) the `image/png` in the same
    output is shown instead. The picture shows the view as it was displayed.
    """

    widget: widgets.Box
    css_class = "phi3lab-view"

    def static(self, format: str = "png"):
        """A self-contained rendering of the current state.

        Args:
            format: `"png"` (bytes, drawn with matplotlib) or `"html"` (str:
                the live figures with plotly.js inlined, no CDN).
        """
        if format == "png":
            return png_bytes(self._draw_static())
        if format == "html":
            parts = [f"<h3>{escape(repr(self))}</h3>"]
            for index, figure in enumerate(self._figures()):
                parts.append(pio.to_html(go.Figure(figure), include_plotlyjs=index == 0, full_html=False))
            return (
                "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>"
            )
        raise bad_argument("format", format, '"png" or "html"')

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["image/png"] = base64.b64encode(self.static("png")).decode("ascii")
        bundle["text/plain"] = repr(self)
        return bundle

    def _draw_static(self) -> Figure:
        raise NotImplementedError

    def _figures(self) -> list:
        raise NotImplementedError
