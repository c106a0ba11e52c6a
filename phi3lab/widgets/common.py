"""What every view shares: token labels, windows, figures, the static
fallback and the `View` base class.

Colour scales (`phi3lab.widgets.colours`) and what reaches the browser
(`phi3lab.widgets.payload`) have their own modules; their names are
importable from here too.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Callable, Sequence

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from phi3lab.errors import bad_argument
from phi3lab.widgets.colours import (
    BLANK,
    DIVERGING,
    GENERATED,
    HIGHLIGHT,
    SEQUENTIAL,
    Scale,
    blank_infinite,
    png,
    pool_factor,
    pool_max,
)
from phi3lab.widgets.figure import FigureWidget
from phi3lab.widgets.payload import packed, payload_bytes, unpacked

__all__ = [
    "BLANK",
    "DIVERGING",
    "FONT",
    "GENERATED",
    "HIGHLIGHT",
    "SEQUENTIAL",
    "PositionWindow",
    "Scale",
    "View",
    "as_trace",
    "axis_labels",
    "base_layout",
    "blank_infinite",
    "colorbar",
    "column_highlight",
    "escape",
    "highlight_box",
    "live",
    "mpl_heatmap",
    "mpl_labels",
    "new_figure",
    "packed",
    "payload_bytes",
    "png",
    "png_bytes",
    "pool_factor",
    "pool_max",
    "position_labels",
    "prompt_length",
    "unpacked",
    "visible",
    "vocabulary_labeler",
    "window",
    "window_slider",
]

FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)


# === What a view shows ===
def as_trace(value, argument: str = "trace"):
    """The `Trace` a view shows: a `Trace` as is, or what `phi3lab.generate`
    returns for one prompt (a `Generation`: its `.trace`).

    Example:
    >>> g = phi3lab.generate(model, ids, max_new_tokens=4, names="*")
    >>> as_trace(g) is g.trace
    True
    """
    from phi3lab.generation.result import Generation
    from phi3lab.tracing.result import Trace

    if isinstance(value, Trace):
        return value
    if isinstance(value, Generation):
        if value.trace is None:
            raise bad_argument(
                argument,
                value,
                "a Trace, or a Generation that holds one: generate with names=... "
                '(e.g. phi3lab.generate(model, prompt, names="*"))',
            )
        return value.trace
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Generation) for v in value):
        raise bad_argument(argument, f"a list of {len(value)} Generations", "a Trace or one Generation (e.g. g[0])")
    raise bad_argument(argument, value, "a phi3lab.Trace or a phi3lab.Generation (from phi3lab.generate)")


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
def window(start: int, size: int, total: int | range) -> range:
    """Positions `[start, start + size)` clamped inside `[0, total)` (or
    inside `total` when it is a range)."""
    rows = total if isinstance(total, range) else range(total)
    size = min(size, len(rows))
    start = min(max(int(start), rows.start), rows.stop - size)
    return range(start, start + size)


def highlight_box(columns: range, rows: range | None = None) -> dict:
    """A plotly shape outlining heatmap cells `columns` x `rows` (category
    indices; `rows=None`: the whole height)."""
    return dict(
        type="rect",
        xref="x",
        yref="paper" if rows is None else "y",
        x0=columns.start - 0.5,
        x1=columns.stop - 0.5,
        y0=0 if rows is None else rows.start - 0.5,
        y1=1 if rows is None else rows.stop - 0.5,
        line=dict(color=HIGHLIGHT, width=2),
    )


def column_highlight(positions: range, position: int) -> list[dict]:
    """Plotly shapes outlining the heatmap column of `position` when it lies
    in the displayed `positions` window (none otherwise)."""
    if position not in positions:
        return []
    column = position - positions.start
    return [highlight_box(range(column, column + 1))]


def window_slider(
    description: str, total: int | range, size: int, start: int = 0, width: str = "420px"
) -> widgets.IntSlider:
    """A slider choosing where a `size`-long window starts inside `[0,
    total)` (or inside `total` when it is a range); hidden when the whole
    input fits."""
    rows = total if isinstance(total, range) else range(total)
    slider = widgets.IntSlider(
        value=window(start, size, rows).start,
        min=rows.start,
        max=max(rows.stop - size, rows.start),
        step=1,
        description=description,
        continuous_update=False,
        style={"description_width": "initial"},
        layout=widgets.Layout(width=width),
    )
    if len(rows) <= size:
        slider.layout.display = "none"
    return slider


class PositionWindow:
    """The selected position and the displayed window of views with a
    `position_slider` and a `window_slider` over `length` positions,
    `max_tokens` at a time."""

    length: int
    max_tokens: int

    @property
    def position(self) -> int:
        return self.position_slider.value

    @property
    def positions(self) -> range:
        return window(self.window_slider.value, self.max_tokens, self.length)


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


def live(figure: go.Figure, on_click=None) -> FigureWidget:
    """The live widget of a figure that is already fully built.

    Build first, wrap last: a FigureWidget's later edits travel as events,
    which its browser-side model misses while plotly.js is still loading
    (the figure then renders blank); its initial data and layout are state
    and always arrive. `on_click(trace, points, state)` handles clicks on
    the first trace.
    """
    widget = FigureWidget(figure)
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
    mpl_labels(ax, title, xlabel, ylabel)
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


def mpl_labels(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Title (small, on the left) and axis labels of a static panel."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


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
            format: `"png"` (bytes, drawn with matplotlib), `"svg"` (str,
                the same drawing as vector graphics, for a README) or
                `"html"` (str: the view's HTML parts and live figures,
                plotly.js inlined, no CDN).
        """
        if format == "png":
            return png_bytes(self._draw_static())
        if format == "svg":
            buffer = io.StringIO()
            self._draw_static().savefig(buffer, format="svg", facecolor="white")
            return buffer.getvalue()
        if format == "html":
            parts = [f"<h3>{escape(repr(self))}</h3>", *self._html()]
            for index, figure in enumerate(self._figures()):
                parts.append(pio.to_html(go.Figure(figure), include_plotlyjs=index == 0, full_html=False))
            return (
                "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "\n".join(parts) + "</body></html>"
            )
        raise bad_argument("format", format, '"png", "svg" or "html"')

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(self.widget._repr_mimebundle_())
        bundle["image/png"] = base64.b64encode(self.static("png")).decode("ascii")
        bundle["text/plain"] = repr(self)
        return bundle

    def _draw_static(self) -> Figure:
        raise NotImplementedError

    def _figures(self) -> list:
        raise NotImplementedError

    def _html(self) -> list[str]:
        """HTML parts of the view that are not plotly figures (its static
        HTML shows them before the figures)."""
        return []
