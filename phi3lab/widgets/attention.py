"""`AttentionExplorer`: every head of a layer at a glance, one head in detail."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np

from phi3lab.checks import check_choice, check_in_range, check_index
from phi3lab.errors import bad_argument
from phi3lab.widgets.attention_held import HeldAttention
from phi3lab.widgets.attention_marks import (
    heatmap_figure,
    heatmap_shapes,
    overview_image,
    selection_strips,
    status_line,
)
from phi3lab.widgets.attention_overview import Overview
from phi3lab.widgets.attention_static import draw_explorer
from phi3lab.widgets.attention_thumbnails import HeadThumbnails
from phi3lab.widgets.attention_tokens import TokenButtons
from phi3lab.widgets.common import (
    Scale,
    View,
    axis_labels,
    live,
    packed,
    pool_max,
    window,
    window_slider,
)

VALUES = ("pattern", "scores")
_TITLES = {"pattern": "attention pattern (probability)", "scores": "attention scores (pre-softmax, scaled)"}
_COLORBARS = {"pattern": "probability", "scores": "score"}


class AttentionExplorer(HeldAttention, View):
    """Attention of one traced input: a thumbnail per head, one head in detail.

    The layer's heads appear as small thumbnails (click "head n" under one to
    select it); the selected head is a heatmap with keys on x and queries on
    y, labelled by token. Clicking a token (or a heatmap cell) selects that
    position: its row (what it attends to) and column (what attends to it)
    are outlined in the heatmap, and the two token strips below are coloured
    by those weights. With "group by kv head", query heads sharing a
    key/value head (grouped-query attention) stand in one row.

    Long inputs: the heatmap is a zoom window of `zoom` positions a side
    (chosen from a menu, at most `max_tokens`), small enough for its token
    labels to be legible. An overview of the whole head (block maxima, an
    orange box marks the window) sits above it: drag the box, or click the
    overview to centre the window there; step it with the "queries from" /
    "keys from" sliders (arrow keys step one position) or `move_window`.
    The overview is a PNG under a draggable box (`ZoomBox`), not a plot, so
    moving the window sends four numbers. Only the window, the overview
    and the thumbnails (all at most `thumbnail_size` cells a side) are sent
    to the browser, whatever the input's length.

    Windowed traces (`phi3lab.trace(..., queries=, heads=)`) show the rows
    and heads they hold; the status line says which rows and heads the
    trace does not hold. Generation traces (with `prompt_length`) mark where
    the generated tokens start: a dashed line in the heatmap and dashed
    borders on the generated tokens.

    Args:
        trace: a `phi3lab.Trace` holding `blocks.*.attn.hook_pattern` (and
            `blocks.*.attn.hook_attn_scores` for the scores view).
        batch: int. Which row of the trace. Defaults to 0.
        layer: int. Initially selected layer. Defaults to the first captured.
        head: int. Initially selected query head. Defaults to the first
            captured.
        values: `"pattern"` (softmax probabilities) or `"scores"` (scaled
            logits before the softmax; masked entries, `-inf`, are blank).
        group_by_kv: bool. Start with query heads grouped by kv head.
        max_tokens: int. Largest zoom window side sent to the browser. 256.
        zoom: int. Initial zoom window side; defaults to the whole input up
            to 64 positions.
        tokens: optional display strings, one per position (else
            `trace.tokens`, else `#id`).
        thumbnail_size: int. Thumbnail resolution in cells. Defaults to 64.
        thumbnails: bool. Show the layer's head thumbnails (a `HeadGrid`
            showing every head turns them off). Defaults to True.

    Example:
    ```python
    tr = phi3lab.trace(model, "When Mary and John went to the store", tokenizer=tok)
    phi3lab.widgets.AttentionExplorer(tr)          # displays in a notebook
    ```
    """

    css_class = "phi3lab-attention"

    def __init__(
        self,
        trace,
        batch: int = 0,
        *,
        layer: int | None = None,
        head: int | None = None,
        values: str = "pattern",
        group_by_kv: bool = False,
        max_tokens: int = 256,
        zoom: int | None = None,
        tokens=None,
        thumbnail_size: int = 64,
        thumbnails: bool = True,
    ):
        check_choice("values", values, VALUES)
        self.max_tokens = check_in_range("max_tokens", max_tokens, 1, 1 << 31)
        self.thumbnail_size = check_in_range("thumbnail_size", thumbnail_size, 1, 1 << 16)
        HeldAttention.__init__(self, trace, batch, tokens)
        head = self.check_head(self.heads[0] if head is None else head)
        layer = self.check_layer(self.layers[0] if layer is None else layer)
        if values == "scores" and not self.has_scores:
            raise bad_argument("values", values, '"pattern" (the trace holds no blocks.*.attn.hook_attn_scores)')
        largest = min(max(len(self.query_rows), self.length), self.max_tokens)
        zooms = sorted({z for z in (16, 32, 64, 128, 256, 512, 1024) if z < largest} | {largest})
        zoom = min(largest, 64) if zoom is None else zoom
        check_choice("zoom", zoom, zooms)
        self.selected: int | None = None

        # === Controls ===
        self.layer_select = widgets.Dropdown(
            options=[(f"layer {l}", l) for l in self.layers],
            value=layer,
            description="Layer",
            layout=widgets.Layout(width="180px"),
        )
        self.head_select = widgets.Dropdown(
            options=[(f"{h} (kv {self.kv_head(h)})", h) for h in self.heads],
            value=head,
            description="Head",
            layout=widgets.Layout(width="220px"),
        )
        options = [("pattern", "pattern")] + ([("scores (pre-softmax)", "scores")] if self.has_scores else [])
        self.values_select = widgets.ToggleButtons(
            options=options,
            value=values,
            style={"button_width": "auto"},
            tooltips=["softmax probabilities", "scaled logits before the softmax"][: len(options)],
        )
        self.zoom_select = widgets.Dropdown(
            options=zooms, value=zoom, description="Zoom", layout=widgets.Layout(width="150px")
        )
        self.query_slider = window_slider("queries from", self.query_rows, zoom, self.query_rows.start, "360px")
        # Keys start on the diagonal of the held rows (a query window of a long input attends near itself).
        self.key_slider = window_slider("keys from", self.length, zoom, self.query_rows.start, "360px")
        for control, css in (
            (self.layer_select, "phi3lab-layer"),
            (self.head_select, "phi3lab-head"),
            (self.values_select, "phi3lab-values"),
            (self.zoom_select, "phi3lab-zoom"),
            (self.query_slider, "phi3lab-query-slider"),
            (self.key_slider, "phi3lab-key-slider"),
        ):
            control.add_class(css)

        # === Thumbnails ===
        self.head_thumbnails = HeadThumbnails(
            self.heads if thumbnails else [], self.kv_head, lambda h: setattr(self.head_select, "value", h), group_by_kv
        )
        self.group_toggle = self.head_thumbnails.group_toggle
        self.thumbnail_images, self.thumbnail_buttons = self.head_thumbnails.images, self.head_thumbnails.buttons
        self.thumbnails = self.head_thumbnails.widget

        # === Heatmap and overview ===
        self.heatmap = heatmap_figure()
        self._overview = Overview(lambda query, key: self._on_window_dragged(query, key))
        self.overview, self._overview_box = self._overview.box, self._overview.widget

        # === Tokens ===
        self._token_buttons = TokenButtons(lambda i: self.select_token(self.query_window[i]))
        self.token_buttons, self.token_row = self._token_buttons.buttons, self._token_buttons.widget
        self.token_strips = widgets.HTML()
        self.token_strips.add_class("phi3lab-strips")
        self.status = widgets.HTML()
        self.status.add_class("phi3lab-status")

        self.zoom_select.observe(lambda _: self._resize_window(), names="value")
        for control in (self.layer_select, self.head_select, self.values_select, self.query_slider, self.key_slider):
            control.observe(lambda _: self._refresh(), names="value")
        self.layer_select.observe(lambda _: self._refresh_thumbnails(), names="value")
        self.values_select.observe(lambda _: self._refresh_thumbnails(), names="value")

        self._refresh_thumbnails()
        self._resize_window()
        self.heatmap = live(self.heatmap, self._on_cell_click)
        self._overview_box.layout.display = None if self.windowed else "none"
        heatmap_box = widgets.VBox([self.heatmap], layout=widgets.Layout(width="100%"))
        heatmap_box.add_class("phi3lab-heatmap")
        self.widget = widgets.VBox(
            [
                widgets.HBox(
                    [self.layer_select, self.head_select, self.values_select, self.group_toggle],
                    layout=widgets.Layout(flex_flow="row wrap"),
                ),
                widgets.HBox(
                    [self.zoom_select, self.query_slider, self.key_slider],
                    layout=widgets.Layout(flex_flow="row wrap", display=None if self.windowed else "none"),
                ),
                self.status,
                widgets.HBox(
                    [self.thumbnails, self._overview_box],
                    layout=widgets.Layout(align_items="flex-start", flex_flow="row wrap"),
                ),
                heatmap_box,
                widgets.HTML("<b>Tokens</b> (click one to see what it attends to and what attends to it)"),
                self.token_row,
                self.token_strips,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.widget.add_class(self.css_class)

    # === State ===
    @property
    def layer(self) -> int:
        return self.layer_select.value

    @property
    def head(self) -> int:
        return self.head_select.value

    @property
    def values(self) -> str:
        return self.values_select.value

    @property
    def zoom(self) -> int:
        return self.zoom_select.value

    @property
    def windowed(self) -> bool:
        """Whether the input is long enough for a zoom window (over 16 positions)."""
        return len(self.zoom_select.options) > 1

    @property
    def query_window(self) -> range:
        """Query positions in the heatmap (inside the rows the trace holds)."""
        return window(self.query_slider.value, self.zoom, self.query_rows)

    @property
    def key_window(self) -> range:
        return window(self.key_slider.value, self.zoom, self.length)

    def head_values(self, layer: int, head: int, values: str | None = None) -> np.ndarray:
        """The held `[rows, T]` matrix of one head, rows being `query_rows`
        (scores with `-inf` as NaN); `values` defaults to the shown ones."""
        return self.held_values(layer, head, values or self.values)

    def window_values(self) -> np.ndarray:
        """What the heatmap shows: the selected head inside the windows."""
        q, k = self.query_window, self.key_window
        offset = self.query_rows.start
        return self.head_values(self.layer, self.head)[q.start - offset : q.stop - offset, k.start : k.stop]

    def scale(self, values: np.ndarray | None = None) -> Scale:
        """Probabilities on a fixed 0..1 sequential scale; scores diverging
        around 0, symmetric over the whole head (stable while sliding)."""
        if self.values == "pattern":
            return Scale.probability()
        return Scale.signed(self.head_values(self.layer, self.head) if values is None else values)

    def title(self) -> str:
        return f"Layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}): {_TITLES[self.values]}"

    def colorbar_title(self) -> str:
        return _COLORBARS[self.values]

    # === Actions ===
    def select_token(self, position: int | None) -> None:
        """Highlight what `position` attends to and what attends to it (None clears)."""
        if position is not None:
            position = check_index("position", position, self.length, "position")
        self.selected = position
        self._refresh_tokens()
        self._refresh_highlight()
        self._refresh_status()

    def show(self, layer: int, head: int) -> None:
        """Select `layer` and `head` together (one heatmap update)."""
        self.check_layer(layer)
        self.check_head(head)
        self._holding = True  # one refresh below, not one per control
        try:
            self.layer_select.value = layer
            self.head_select.value = head
        finally:
            self._holding = False
        self._refresh_thumbnails()
        self._refresh()

    def move_window(self, query: int, key: int) -> None:
        """Centre the zoom window on (`query`, `key`)."""
        self.query_slider.value = window(query - self.zoom // 2, self.zoom, self.query_rows).start
        self.key_slider.value = window(key - self.zoom // 2, self.zoom, self.length).start

    def _on_window_dragged(self, query: int, key: int) -> None:
        if (query, key) != (self.query_window.start, self.key_window.start):
            self.move_window(query + self.zoom // 2, key + self.zoom // 2)

    def _on_cell_click(self, trace, points, state):
        if points.ys:
            self.select_token(int(str(points.ys[0]).split(" ", 1)[0]))

    # === Rendering ===
    _holding = False

    def _resize_window(self) -> None:
        zoom = self.zoom
        for slider, rows in ((self.query_slider, self.query_rows), (self.key_slider, range(self.length))):
            slider.max = max(rows.stop - zoom, rows.start)
            slider.disabled = len(rows) <= zoom  # shown disabled (`window_slider` hides it): the zoom may shrink
            slider.layout.display = None
        self._token_buttons.resize(len(self.query_window))
        # 16 pixels a row keep every token label (11 px font) legible up to 64 rows.
        self.heatmap.layout.height = int(np.clip(16 * len(self.query_window) + 170, 450, 1200))
        self._refresh()

    def _refresh(self) -> None:
        if self._holding:
            return
        q, k = self.query_window, self.key_window
        values = self.window_values()
        with self.heatmap.batch_update():
            heat = self.heatmap.data[0]
            heat.z = packed(values)
            heat.x = axis_labels(self.labels, k)
            heat.y = axis_labels(self.labels, q)
            heat.update(**self.scale().plotly())
            heat.colorbar.title.text = self.colorbar_title()
            number = ".3f" if self.values == "pattern" else ".4g"
            heat.hovertemplate = f"query %{{y}}<br>key %{{x}}<br>{self.values} %{{z:{number}}}<extra></extra>"
            self.heatmap.layout.title.text = self.title()
        self._refresh_overview()
        self.head_thumbnails.mark(self.head)
        self._refresh_tokens()
        self._refresh_highlight()
        self._refresh_status()

    def overview_image(self, boxed: bool = True) -> np.ndarray:
        """The overview as uint8 RGB: block maxima of the held rows (at most
        96 cells a side), the zoom window boxed unless `boxed` is False."""
        held = self.head_values(self.layer, self.head)
        return overview_image(held, self.scale(held), self.query_rows.start, self.query_window, self.key_window, boxed)

    def _refresh_overview(self) -> None:
        held = self.head_values(self.layer, self.head)
        q, k = self.query_window, self.key_window
        self._overview.draw(held, self.scale(held), self.query_rows.start, q, k, self.head)

    def _refresh_thumbnails(self) -> None:
        if not self._holding:
            self.head_thumbnails.draw(self._thumbnail_png)

    def _thumbnail_png(self, head: int) -> bytes:
        full = self.head_values(self.layer, head)
        return self.scale(full).png(pool_max(full, self.thumbnail_size), 72)

    def _refresh_highlight(self) -> None:
        self.heatmap.layout.shapes = heatmap_shapes(
            self.query_window, self.key_window, self.selected, self.prompt_length
        )

    def _refresh_tokens(self) -> None:
        self._token_buttons.label(self.labels, self.query_window, self.selected, self.prompt_length)
        if self.selected is None:
            self.token_strips.value = "<i>No token selected.</i>"
            return
        self.token_strips.value = selection_strips(
            self.labels,
            self.head_values(self.layer, self.head, "pattern"),
            self.selected,
            self.query_rows,
            self.query_window,
            self.key_window,
            self.prompt_length,
            self.missing(),
        )

    def _refresh_status(self) -> None:
        q, k = self.query_window, self.key_window
        text = (
            f"layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}) · {self.values} · "
            f"queries {q.start}–{q.stop - 1}, keys {k.start}–{k.stop - 1} of {self.length} positions"
        )
        self.status.value = status_line(text, self.labels, self.selected, self.prompt_length, self.missing())

    def _figures(self):
        return [self.heatmap]

    def _draw_static(self):
        return draw_explorer(self)

    def __repr__(self):
        return (
            f"AttentionExplorer(layer={self.layer}, head={self.head}, values={self.values!r}, "
            f"positions={self.length}, zoom={self.zoom})"
        )
