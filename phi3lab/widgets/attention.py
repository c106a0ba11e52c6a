"""`AttentionExplorer`: every head of a layer at a glance, one head in detail."""

from __future__ import annotations

import io

import ipywidgets as widgets
import matplotlib
import numpy as np
import plotly.graph_objects as go

from phi3lab.checks import check_choice, check_in_range, check_index
from phi3lab.errors import bad_argument
from phi3lab.model.attention import key_value_heads
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import (
    GENERATED,
    HIGHLIGHT,
    Scale,
    View,
    axis_labels,
    base_layout,
    blank_infinite,
    colorbar,
    escape,
    live,
    mpl_heatmap,
    new_figure,
    packed,
    pool_factor,
    pool_max,
    position_labels,
    prompt_length,
    window,
)

VALUES = ("pattern", "scores")
_TITLES = {"pattern": "attention pattern (probability)", "scores": "attention scores (pre-softmax, scaled)"}
_COLORBARS = {"pattern": "probability", "scores": "score"}


class AttentionExplorer(View):
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
    orange box marks the window) sits above it; step the window with the
    "queries from" / "keys from" sliders (arrow keys step one position) or
    `move_window`. The overview is a PNG, not a plot: every plotly
    FigureWidget ships plotly.js (~5 MB) with its state. Only the window, the overview
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
        self.trace = trace
        self.batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        check_choice("values", values, VALUES)
        self.max_tokens = check_in_range("max_tokens", max_tokens, 1, 1 << 31)
        self.thumbnail_size = check_in_range("thumbnail_size", thumbnail_size, 1, 1 << 16)
        self.length = trace.token_ids.shape[1]
        self.group_size = trace.num_query_heads // trace.num_key_value_heads
        self.labels = position_labels(trace, self.batch, tokens)
        self.prompt_length = prompt_length(trace)
        # What a windowed trace holds: query rows and query heads.
        self.query_rows = range(*trace.query_window) if trace.query_window is not None else range(self.length)
        self.heads = (
            list(trace.attention_heads) if trace.attention_heads is not None else list(range(trace.num_query_heads))
        )
        head = self.heads[0] if head is None else head
        if head not in self.heads or isinstance(head, bool):
            raise bad_argument("head", head, f"one of the captured query heads {self.heads}")
        # Only the layers whose patterns were captured are offered (memory-aware traces).
        self.layers = [l for l in range(trace.num_layers) if block_name(l, "attn.hook_pattern") in trace]
        if not self.layers:
            raise KeyError(
                "AttentionExplorer needs 'blocks.*.attn.hook_pattern' for at least one layer. "
                "Capture it with phi3lab.trace(model, ids, names=['blocks.*.attn.hook_pattern', "
                "'blocks.*.attn.hook_attn_scores']) (or names=None)."
            )
        layer = self.layers[0] if layer is None else layer
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"a layer whose pattern the trace holds: {self.layers}")
        self.has_scores = all(block_name(l, "attn.hook_attn_scores") in trace for l in self.layers)
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
            options=self._head_options(), value=head, description="Head", layout=widgets.Layout(width="220px")
        )
        options = [("pattern", "pattern")] + ([("scores (pre-softmax)", "scores")] if self.has_scores else [])
        self.values_select = widgets.ToggleButtons(
            options=options,
            value=values,
            style={"button_width": "auto"},
            tooltips=["softmax probabilities", "scaled logits before the softmax"][: len(options)],
        )
        self.group_toggle = widgets.Checkbox(
            value=group_by_kv,
            description="group by kv head (GQA)",
            indent=False,
            layout=widgets.Layout(display=None if thumbnails else "none"),
        )
        self.zoom_select = widgets.Dropdown(
            options=zooms, value=zoom, description="Zoom", layout=widgets.Layout(width="150px")
        )
        self.query_slider = _window_slider("queries from", self.query_rows, zoom)
        self.key_slider = _window_slider("keys from", range(self.length), zoom)
        # Keys start on the diagonal of the held rows (a query window of a long input attends near itself).
        self.key_slider.value = _window(self.query_rows.start, zoom, range(self.length)).start
        for control, css in (
            (self.layer_select, "phi3lab-layer"),
            (self.head_select, "phi3lab-head"),
            (self.values_select, "phi3lab-values"),
            (self.group_toggle, "phi3lab-gqa"),
            (self.zoom_select, "phi3lab-zoom"),
            (self.query_slider, "phi3lab-query-slider"),
            (self.key_slider, "phi3lab-key-slider"),
        ):
            control.add_class(css)

        # === Thumbnails ===
        self.thumbnail_images, self.thumbnail_buttons, self._cells = [], [], []
        for h in self.heads if thumbnails else []:
            image = widgets.Image(format="png", layout=widgets.Layout(width="72px", height="72px"))
            button = widgets.Button(
                description=f"head {h}",
                tooltip=f"query head {h}, kv head {self.kv_head(h)}",
                layout=widgets.Layout(width="72px", height="24px", padding="0"),
            )
            button.add_class("phi3lab-thumbnail")
            button.on_click(lambda _, h=h: setattr(self.head_select, "value", h))
            self.thumbnail_images.append(image)
            self.thumbnail_buttons.append(button)
            self._cells.append(widgets.VBox([image, button], layout=widgets.Layout(margin="2px")))
        self.thumbnails = widgets.VBox()

        # === Heatmap and overview ===
        self.heatmap = go.Figure(go.Heatmap(hoverongaps=False, colorbar=colorbar("")))
        self.heatmap.update_layout(**base_layout("", height=600, margin=dict(l=110, r=30, t=50, b=110)))
        self.heatmap.update_yaxes(
            autorange="reversed", title="query (position token)", type="category", tickfont=dict(size=11)
        )
        self.heatmap.update_xaxes(title="key (position token)", type="category", tickangle=-90, tickfont=dict(size=11))
        self.overview = widgets.Image(format="png", layout=widgets.Layout(width="auto", height="auto"))
        self.overview_title = widgets.HTML()

        # === Tokens ===
        self.token_buttons = []  # one per query row of the window, made as the zoom needs
        self.token_row = widgets.Box(layout=widgets.Layout(flex_flow="row wrap"))
        self.token_strips = widgets.HTML()
        self.token_strips.add_class("phi3lab-strips")
        self.status = widgets.HTML()
        self.status.add_class("phi3lab-status")

        self.zoom_select.observe(lambda _: self._resize_window(), names="value")
        for control in (self.layer_select, self.head_select, self.values_select, self.query_slider, self.key_slider):
            control.observe(lambda _: self._refresh(), names="value")
        self.layer_select.observe(lambda _: self._refresh_thumbnails(), names="value")
        self.values_select.observe(lambda _: self._refresh_thumbnails(), names="value")
        self.group_toggle.observe(lambda _: self._arrange_thumbnails(), names="value")

        self._arrange_thumbnails()
        self._refresh_thumbnails()
        self._resize_window()
        self.heatmap = live(self.heatmap, self._on_cell_click)
        self._overview_box = widgets.VBox([self.overview_title, self.overview])
        self._overview_box.add_class("phi3lab-overview")
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
        return _window(self.query_slider.value, self.zoom, self.query_rows)

    @property
    def key_window(self) -> range:
        return _window(self.key_slider.value, self.zoom, range(self.length))

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads."""
        return int(key_value_heads(self.trace.num_query_heads, self.trace.num_key_value_heads)[head])

    def head_values(self, layer: int, head: int, values: str | None = None) -> np.ndarray:
        """The held `[rows, T]` matrix of one head, rows being `query_rows`
        (scores with `-inf` as NaN)."""
        values = values or self.values
        if values == "pattern":
            return self.trace.attention(layer, head)[self.batch]
        scores = self.trace[block_name(layer, "attn.hook_attn_scores")][self.batch, self.heads.index(head)]
        return blank_infinite(scores)

    def window_values(self) -> np.ndarray:
        """What the heatmap shows: the selected head inside the windows."""
        q, k = self.query_window, self.key_window
        offset = self.query_rows.start
        return self.head_values(self.layer, self.head)[q.start - offset : q.stop - offset, k.start : k.stop]

    def overview_values(self) -> np.ndarray:
        """The overview: block maxima of the selected head's held rows."""
        return pool_max(self.head_values(self.layer, self.head), 96)

    def scale(self, values: np.ndarray | None = None) -> Scale:
        """Probabilities on a fixed 0..1 sequential scale; scores diverging
        around 0, symmetric over the whole head (stable while sliding)."""
        if self.values == "pattern":
            return Scale.probability()
        return Scale.signed(self.head_values(self.layer, self.head) if values is None else values)

    def title(self) -> str:
        return f"Layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}): {_TITLES[self.values]}"

    def missing(self) -> str:
        """What a windowed trace does not hold ('' when it holds everything)."""
        parts = []
        if len(self.query_rows) < self.length:
            parts.append(
                f"only queries {self.query_rows.start}–{self.query_rows.stop - 1} were captured (trace(queries=...))"
            )
        if len(self.heads) < self.trace.num_query_heads:
            parts.append(f"only heads {self.heads} of {self.trace.num_query_heads} were captured (trace(heads=...))")
        return "; ".join(parts)

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
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"a layer whose pattern the trace holds: {self.layers}")
        if head not in self.heads:
            raise bad_argument("head", head, f"one of the captured query heads {self.heads}")
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
        self.query_slider.value = _window(query - self.zoom // 2, self.zoom, self.query_rows).start
        self.key_slider.value = _window(key - self.zoom // 2, self.zoom, range(self.length)).start

    def _on_cell_click(self, trace, points, state):
        if points.ys:
            self.select_token(int(str(points.ys[0]).split(" ", 1)[0]))

    # === Rendering ===
    _holding = False

    def _head_options(self):
        return [(f"{h} (kv {self.kv_head(h)})", h) for h in self.heads]

    def _resize_window(self) -> None:
        zoom = self.zoom
        for slider, rows in ((self.query_slider, self.query_rows), (self.key_slider, range(self.length))):
            slider.max = max(rows.stop - zoom, rows.start)
            slider.disabled = len(rows) <= zoom
        rows = len(self.query_window)
        for i in range(len(self.token_buttons), rows):
            button = widgets.Button(layout=widgets.Layout(width="auto", height="26px", padding="0 4px", margin="1px"))
            button.add_class("phi3lab-token")
            button.on_click(lambda _, i=i: self.select_token(self.query_window[i]))
            self.token_buttons.append(button)
        self.token_row.children = self.token_buttons
        for i, button in enumerate(self.token_buttons):
            button.layout.display = None if i < rows else "none"
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
            heat.colorbar.title.text = _COLORBARS[self.values]
            number = ".3f" if self.values == "pattern" else ".4g"
            heat.hovertemplate = f"query %{{y}}<br>key %{{x}}<br>{self.values} %{{z:{number}}}<extra></extra>"
            self.heatmap.layout.title.text = self.title()
        self._refresh_overview()
        for h, button in zip(self.heads, self.thumbnail_buttons):
            button.button_style = "primary" if h == self.head else ""
        self._refresh_tokens()
        self._refresh_highlight()
        self._refresh_status()

    def overview_image(self) -> np.ndarray:
        """The overview as uint8 RGB: block maxima of the held rows (at most
        96 cells a side, each drawn `pixels` wide), the zoom window boxed."""
        full = self.head_values(self.layer, self.head)
        pooled = pool_max(full, 96)
        fr, fc = pool_factor(full.shape[0], 96), pool_factor(full.shape[1], 96)
        pixels = max(1, 288 // max(pooled.shape))
        image = np.repeat(np.repeat(self.scale(full).rgb(pooled), pixels, 0), pixels, 1)
        q, k = self.query_window, self.key_window
        top = (q.start - self.query_rows.start) // fr * pixels
        bottom = min(image.shape[0], -(-(q.stop - self.query_rows.start) // fr) * pixels) - 1
        left, right = k.start // fc * pixels, min(image.shape[1], -(-k.stop // fc) * pixels) - 1
        box = np.round(np.array(matplotlib.colors.to_rgb(HIGHLIGHT)) * 255).astype(np.uint8)
        image[top : bottom + 1, [left, right]] = box
        image[[top, bottom], left : right + 1] = box
        return image

    def _refresh_overview(self) -> None:
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.overview_image()).save(buffer, format="PNG")
        self.overview.value = buffer.getvalue()
        held = self.head_values(self.layer, self.head).shape
        self.overview_title.value = (
            f"<b>Overview</b> of head {self.head}: {held[0]} × {held[1]} (block maxima; the box is the zoom window)"
        )

    def _refresh_thumbnails(self) -> None:
        if self._holding:
            return
        for h, image in zip(self.heads, self.thumbnail_images):
            full = self.head_values(self.layer, h)
            image.value = self.scale(full).png(pool_max(full, self.thumbnail_size), 72)

    def _arrange_thumbnails(self) -> None:
        if not self._cells:
            return
        cells = dict(zip(self.heads, self._cells))
        buttons = dict(zip(self.heads, self.thumbnail_buttons))
        if self.group_toggle.value:
            rows = []
            for kv in sorted({self.kv_head(h) for h in self.heads}):
                members = [h for h in self.heads if self.kv_head(h) == kv]
                label = widgets.HTML(f"<b>kv {kv}</b>", layout=widgets.Layout(width="40px"))
                rows.append(widgets.HBox([label] + [cells[h] for h in members]))
                for h in members:
                    buttons[h].description = f"q{h}·kv{kv}"
            self.thumbnails.children = rows
        else:
            columns = min(len(self.heads), 4)
            for h in self.heads:
                buttons[h].description = f"head {h}"
            self.thumbnails.children = [
                widgets.HBox(self._cells[i : i + columns]) for i in range(0, len(self.heads), columns)
            ]

    def _refresh_highlight(self) -> None:
        shapes = []
        q, k = self.query_window, self.key_window
        line = dict(color=HIGHLIGHT, width=2)
        if self.selected in q:
            row = self.selected - q.start
            shapes.append(
                dict(type="rect", xref="x", yref="y", x0=-0.5, x1=len(k) - 0.5, y0=row - 0.5, y1=row + 0.5, line=line)
            )
        if self.selected in k:
            column = self.selected - k.start
            shapes.append(
                dict(
                    type="rect",
                    xref="x",
                    yref="y",
                    x0=column - 0.5,
                    x1=column + 0.5,
                    y0=-0.5,
                    y1=len(q) - 0.5,
                    line=line,
                )
            )
        boundary = self.prompt_length
        if boundary is not None:  # where generation starts
            dashed = dict(color=GENERATED, width=2, dash="dash")
            if boundary in k and boundary > k.start:
                shapes.append(
                    dict(
                        type="line",
                        xref="x",
                        yref="paper",
                        x0=boundary - k.start - 0.5,
                        x1=boundary - k.start - 0.5,
                        y0=0,
                        y1=1,
                        line=dashed,
                    )
                )
            if boundary in q and boundary > q.start:
                shapes.append(
                    dict(
                        type="line",
                        xref="paper",
                        yref="y",
                        y0=boundary - q.start - 0.5,
                        y1=boundary - q.start - 0.5,
                        x0=0,
                        x1=1,
                        line=dashed,
                    )
                )
        self.heatmap.layout.shapes = shapes

    def _generated(self, position: int) -> bool:
        return self.prompt_length is not None and position >= self.prompt_length

    def _refresh_tokens(self) -> None:
        for button, p in zip(self.token_buttons, self.query_window):
            button.description = self.labels[p]
            button.tooltip = f"position {p}" + (" (generated)" if self._generated(p) else "")
            button.button_style = "warning" if p == self.selected else ""
            if self._generated(p):
                button.add_class("phi3lab-generated")
            else:
                button.remove_class("phi3lab-generated")
        if self.selected is None:
            self.token_strips.value = "<i>No token selected.</i>"
            return
        held = self.head_values(self.layer, self.head, "pattern")
        p, offset = self.selected, self.query_rows.start
        q = range(self.query_window.start, self.query_window.stop)
        rows = []
        if p in self.query_rows:
            rows.append(
                (f"<b>{escape(self.labels[p])}</b> (position {p}) attends to →", self.key_window, held[p - offset])
            )
        else:
            rows.append(
                (
                    f"<b>{escape(self.labels[p])}</b> (position {p}): its row was not captured ({self.missing()})",
                    range(0),
                    np.zeros(0),
                )
            )
        rows.append((f"← attended to by (column {p})", q, np.pad(held[:, p], (offset, 0))))
        self.token_strips.value = "".join(self._strip(title, positions, weights) for title, positions, weights in rows)

    def _strip(self, title: str, positions: range, weights: np.ndarray) -> str:
        shown = weights[positions.start : positions.stop]
        scale = Scale.magnitude(shown)
        spans = []
        for p, w in zip(positions, shown):
            background, text = scale.css(w)
            border = (
                f"2px solid {HIGHLIGHT}"
                if p == self.selected
                else (f"1px dashed {GENERATED}" if self._generated(p) else "1px solid #ccc")
            )
            spans.append(
                f'<span class="phi3lab-weight" data-position="{p}" data-weight="{w:.6g}" '
                f'title="position {p}: {w:.4f}" style="background:{background};color:{text};'
                f"border:{border};padding:1px 3px;margin:1px;display:inline-block;"
                f'font-family:monospace">{escape(self.labels[p])}</span>'
            )
        return (
            f"<div style='margin:4px 0'>{title} <small>(colour: probability, 0 to {scale.vmax:.3g})</small>"
            f"<div style='line-height:1.9'>{''.join(spans)}</div></div>"
        )

    def _refresh_status(self) -> None:
        q, k = self.query_window, self.key_window
        text = (
            f"layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}) · {self.values} · "
            f"queries {q.start}–{q.stop - 1}, keys {k.start}–{k.stop - 1} of {self.length} positions"
        )
        if self.prompt_length is not None:
            text += f" · prompt 0–{self.prompt_length - 1}, generated from {self.prompt_length}"
        if self.selected is not None:
            text += f" · selected {self.selected} {escape(self.labels[self.selected])!s}"
        missing = self.missing()
        if missing:
            text += f"<br><span class='phi3lab-missing'>Windowed trace: {escape(missing)}.</span>"
        self.status.value = f"<span class='phi3lab-status-text'>{text}</span>"

    def _figures(self):
        return [self.heatmap]

    def _draw_static(self):
        heads = len(self.heads)
        columns = self.group_size if self.group_toggle.value else min(heads, 4)
        rows = -(-heads // columns)
        figure = new_figure(14, max(6.5, 1.2 * rows + 1))
        outer = figure.add_gridspec(1, 2, width_ratios=[3, 2])
        q, k = self.query_window, self.key_window
        ax = figure.add_subplot(outer[0])
        values = self.window_values()
        mpl_heatmap(
            ax,
            values,
            self.scale(),
            title=self.title(),
            xlabel="key (position token)",
            ylabel="query (position token)",
            colorbar=_COLORBARS[self.values],
            x_labels=[f"{p} {self.labels[p]}" for p in k],
            y_labels=[f"{p} {self.labels[p]}" for p in q],
        )
        if self.selected is not None:
            from matplotlib.patches import Rectangle

            if self.selected in q:
                ax.add_patch(
                    Rectangle(
                        (-0.5, self.selected - q.start - 0.5), len(k), 1, fill=False, edgecolor=HIGHLIGHT, linewidth=2
                    )
                )
            if self.selected in k:
                ax.add_patch(
                    Rectangle(
                        (self.selected - k.start - 0.5, -0.5), 1, len(q), fill=False, edgecolor=HIGHLIGHT, linewidth=2
                    )
                )
        if self.prompt_length is not None and self.prompt_length in k:
            ax.axvline(self.prompt_length - k.start - 0.5, color=GENERATED, linestyle="--", linewidth=1.5)
        grid = outer[1].subgridspec(rows, columns)
        for index, h in enumerate(self.heads):
            thumb = figure.add_subplot(grid[index // columns, index % columns])
            full = self.head_values(self.layer, h)
            thumb.imshow(
                np.ma.masked_invalid(pool_max(full, self.thumbnail_size)),
                interpolation="nearest",
                aspect="auto",
                **self.scale(full).matplotlib(),
            )
            thumb.set_xticks([])
            thumb.set_yticks([])
            thumb.set_title(
                f"head {h} (kv {self.kv_head(h)})", fontsize=8, color=HIGHLIGHT if h == self.head else "black"
            )
            if h == self.head:
                for spine in thumb.spines.values():
                    spine.set_edgecolor(HIGHLIGHT)
                    spine.set_linewidth(2.5)
        missing = self.missing()
        figure.suptitle(
            f"Layer {self.layer}: {heads} query heads (block maxima), selected head on the left"
            + (f"\n{missing}" if missing else ""),
            fontsize=11,
            x=0.99,
            ha="right",
        )
        return figure

    def __repr__(self):
        return (
            f"AttentionExplorer(layer={self.layer}, head={self.head}, values={self.values!r}, "
            f"positions={self.length}, zoom={self.zoom})"
        )


def _window(start: int, size: int, rows: range) -> range:
    """A `size`-long window starting near `start`, inside `rows`."""
    inner = window(start - rows.start, size, len(rows))
    return range(inner.start + rows.start, inner.stop + rows.start)


def _window_slider(description: str, rows: range, size: int) -> widgets.IntSlider:
    """A slider choosing where a `size`-long window starts inside `rows`."""
    return widgets.IntSlider(
        value=rows.start,
        min=rows.start,
        max=max(rows.stop - size, rows.start),
        step=1,
        description=description,
        continuous_update=False,
        style={"description_width": "initial"},
        layout=widgets.Layout(width="360px"),
    )
