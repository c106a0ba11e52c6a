"""`AttentionExplorer`: every head of a layer at a glance, one head in detail."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from phi3lab.errors import bad_argument
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import (
    HIGHLIGHT, Scale, View, axis_labels, base_layout, blank_infinite, check_choice, check_int,
    escape, live, mpl_heatmap, new_figure, pool_max, position_labels, window, window_slider,
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

    Inputs longer than `max_tokens` show a `max_tokens`-square window, moved
    with the "queries from" / "keys from" sliders and sliced from the trace
    on demand; thumbnails are block maxima at most `thumbnail_size` square.
    No more than one window of one head is sent to the browser.

    Args:
        trace: a `phi3lab.Trace` holding `blocks.*.attn.hook_pattern` (and
            `blocks.*.attn.hook_attn_scores` for the scores view).
        batch: int. Which row of the trace. Defaults to 0.
        layer, head: int. Initially selected. Default 0.
        values: `"pattern"` (softmax probabilities) or `"scores"` (scaled
            logits before the softmax; masked entries, `-inf`, are blank).
        group_by_kv: bool. Start with query heads grouped by kv head.
        max_tokens: int. Largest window side sent to the browser. 256.
        tokens: optional display strings, one per position (else
            `trace.tokens`, else `#id`).
        thumbnail_size: int. Thumbnail resolution in cells. Defaults to 64.

    Example:
    ```python
    tr = phi3lab.trace(model, "When Mary and John went to the store", tokenizer=tok)
    phi3lab.widgets.AttentionExplorer(tr)          # displays in a notebook
    ```
    """

    css_class = "phi3lab-attention"

    def __init__(self, trace, batch: int = 0, *, layer: int = 0, head: int = 0, values: str = "pattern",
                 group_by_kv: bool = False, max_tokens: int = 256, tokens=None, thumbnail_size: int = 64):
        self.trace = trace
        self.batch = check_int("batch", batch, 0, trace.token_ids.shape[0])
        check_int("head", head, 0, trace.num_query_heads)
        check_choice("values", values, VALUES)
        self.max_tokens = check_int("max_tokens", max_tokens, 1, 1 << 31)
        self.thumbnail_size = check_int("thumbnail_size", thumbnail_size, 1, 1 << 16)
        self.length = trace.token_ids.shape[1]
        self.group_size = trace.num_query_heads // trace.num_key_value_heads
        self.labels = position_labels(trace, self.batch, tokens)
        if trace.query_window is not None or trace.attention_heads is not None:
            raise ValueError("AttentionExplorer shows whole attention maps; this trace holds a query window or "
                             "a subset of heads (`queries=`/`heads=`). Trace again without them for the layers "
                             "you want to see, e.g. names=['blocks.0.attn.hook_pattern'].")
        # Only the layers whose patterns were captured are offered (memory-aware traces).
        self.layers = [l for l in range(trace.num_layers) if block_name(l, "attn.hook_pattern") in trace]
        if not self.layers:
            raise KeyError("AttentionExplorer needs 'blocks.*.attn.hook_pattern' for at least one layer. "
                           "Capture it with phi3lab.trace(model, ids, names=['blocks.*.attn.hook_pattern', "
                           "'blocks.*.attn.hook_attn_scores']) (or names=None).")
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"a layer whose pattern the trace holds: {self.layers}")
        self.has_scores = all(block_name(l, "attn.hook_attn_scores") in trace for l in self.layers)
        if values == "scores" and not self.has_scores:
            raise bad_argument("values", values, '"pattern" (the trace holds no blocks.*.attn.hook_attn_scores)')
        self.selected: int | None = None

        # === Controls ===
        self.layer_select = widgets.Dropdown(options=[(f"layer {l}", l) for l in self.layers],
                                             value=layer, description="Layer", layout=widgets.Layout(width="180px"))
        self.head_select = widgets.Dropdown(options=self._head_options(), value=head, description="Head",
                                            layout=widgets.Layout(width="220px"))
        options = [("pattern", "pattern")] + ([("scores (pre-softmax)", "scores")] if self.has_scores else [])
        self.values_select = widgets.ToggleButtons(options=options, value=values, style={"button_width": "auto"},
                                                   tooltips=["softmax probabilities", "scaled logits before the softmax"
                                                             ][:len(options)])
        self.group_toggle = widgets.Checkbox(value=group_by_kv, description="group by kv head (GQA)", indent=False)
        self.query_slider = window_slider("queries from", self.length, max_tokens)
        self.key_slider = window_slider("keys from", self.length, max_tokens)
        for control, css in ((self.layer_select, "phi3lab-layer"), (self.head_select, "phi3lab-head"),
                             (self.values_select, "phi3lab-values"), (self.group_toggle, "phi3lab-gqa")):
            control.add_class(css)

        # === Thumbnails ===
        self.thumbnail_images, self.thumbnail_buttons, self._cells = [], [], []
        for h in range(trace.num_query_heads):
            image = widgets.Image(format="png", layout=widgets.Layout(width="72px", height="72px"))
            button = widgets.Button(description=f"head {h}", tooltip=f"query head {h}, kv head {self.kv_head(h)}",
                                    layout=widgets.Layout(width="72px", height="24px", padding="0"))
            button.add_class("phi3lab-thumbnail")
            button.on_click(lambda _, h=h: setattr(self.head_select, "value", h))
            self.thumbnail_images.append(image)
            self.thumbnail_buttons.append(button)
            self._cells.append(widgets.VBox([image, button], layout=widgets.Layout(margin="2px")))
        self.thumbnails = widgets.VBox()

        # === Heatmap ===
        self.heatmap = go.Figure(go.Heatmap(hoverongaps=False, colorbar=dict(title=dict(side="right"))))
        self.heatmap.update_layout(**base_layout("", height=600, width=760))
        self.heatmap.update_yaxes(autorange="reversed", title="query (position token)", type="category")
        self.heatmap.update_xaxes(title="key (position token)", type="category", tickangle=-90)

        # === Tokens ===
        count = min(self.length, max_tokens)
        self.token_buttons = []
        for i in range(count):
            button = widgets.Button(layout=widgets.Layout(width="auto", height="26px", padding="0 4px", margin="1px"))
            button.add_class("phi3lab-token")
            button.on_click(lambda _, i=i: self.select_token(self.query_window[i]))
            self.token_buttons.append(button)
        self.token_strips = widgets.HTML()
        self.token_strips.add_class("phi3lab-strips")
        self.status = widgets.HTML()
        self.status.add_class("phi3lab-status")

        for control in (self.layer_select, self.head_select, self.values_select, self.query_slider, self.key_slider):
            control.observe(lambda _: self._refresh(), names="value")
        self.layer_select.observe(lambda _: self._refresh_thumbnails(), names="value")
        self.values_select.observe(lambda _: self._refresh_thumbnails(), names="value")
        self.group_toggle.observe(lambda _: self._arrange_thumbnails(), names="value")

        self._arrange_thumbnails()
        self._refresh_thumbnails()
        self._refresh()
        self.heatmap = live(self.heatmap, self._on_cell_click)
        token_row = widgets.Box(self.token_buttons, layout=widgets.Layout(flex_flow="row wrap"))
        self.widget = widgets.VBox([
            widgets.HBox([self.layer_select, self.head_select, self.values_select, self.group_toggle]),
            widgets.HBox([self.query_slider, self.key_slider]),
            self.status,
            widgets.HBox([self.thumbnails, self.heatmap], layout=widgets.Layout(align_items="flex-start")),
            widgets.HTML("<b>Tokens</b> (click one to see what it attends to and what attends to it)"),
            token_row,
            self.token_strips,
        ])
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
    def query_window(self) -> range:
        return window(self.query_slider.value, self.max_tokens, self.length)

    @property
    def key_window(self) -> range:
        return window(self.key_slider.value, self.max_tokens, self.length)

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads."""
        return head // self.group_size

    def head_values(self, layer: int, head: int, values: str | None = None) -> np.ndarray:
        """The full `[T, T]` matrix of one head (scores with `-inf` as NaN)."""
        values = values or self.values
        if values == "pattern":
            return self.trace.attention(layer, head)[self.batch]
        return blank_infinite(self.trace[block_name(layer, "attn.hook_attn_scores")][self.batch, head])

    def window_values(self) -> np.ndarray:
        """What the heatmap shows: the selected head inside the windows."""
        q, k = self.query_window, self.key_window
        return self.head_values(self.layer, self.head)[q.start:q.stop, k.start:k.stop]

    def scale(self, values: np.ndarray | None = None) -> Scale:
        """Probabilities on a fixed 0..1 sequential scale; scores diverging
        around 0, symmetric over the whole head (stable while sliding)."""
        if self.values == "pattern":
            return Scale.probability()
        return Scale.signed(self.head_values(self.layer, self.head) if values is None else values)

    def title(self) -> str:
        return (f"Layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}): "
                f"{_TITLES[self.values]}")

    # === Actions ===
    def select_token(self, position: int | None) -> None:
        """Highlight what `position` attends to and what attends to it (None clears)."""
        if position is not None:
            position = check_int("position", position, 0, self.length)
        self.selected = position
        self._refresh_tokens()
        self._refresh_highlight()
        self._refresh_status()

    def _on_cell_click(self, trace, points, state):
        if points.ys:
            self.select_token(int(str(points.ys[0]).split(" ", 1)[0]))

    # === Rendering ===
    def _head_options(self):
        return [(f"{h} (kv {self.kv_head(h)})", h) for h in range(self.trace.num_query_heads)]

    def _refresh(self) -> None:
        q, k = self.query_window, self.key_window
        values = self.window_values()
        with self.heatmap.batch_update():
            heat = self.heatmap.data[0]
            heat.z = values
            heat.x = axis_labels(self.labels, k)
            heat.y = axis_labels(self.labels, q)
            heat.update(**self.scale().plotly())
            heat.colorbar.title.text = _COLORBARS[self.values]
            number = ".3f" if self.values == "pattern" else ".4g"
            heat.hovertemplate = f"query %{{y}}<br>key %{{x}}<br>{self.values} %{{z:{number}}}<extra></extra>"
            self.heatmap.layout.title.text = self.title()
        for h, button in enumerate(self.thumbnail_buttons):
            button.button_style = "primary" if h == self.head else ""
        self._refresh_tokens()
        self._refresh_highlight()
        self._refresh_status()

    def _refresh_thumbnails(self) -> None:
        for h, image in enumerate(self.thumbnail_images):
            full = self.head_values(self.layer, h)
            image.value = self.scale(full).png(pool_max(full, self.thumbnail_size), 72)

    def _arrange_thumbnails(self) -> None:
        heads = range(self.trace.num_query_heads)
        if self.group_toggle.value:
            rows = []
            for kv in range(self.trace.num_key_value_heads):
                members = [h for h in heads if self.kv_head(h) == kv]
                label = widgets.HTML(f"<b>kv {kv}</b>", layout=widgets.Layout(width="40px"))
                rows.append(widgets.HBox([label] + [self._cells[h] for h in members]))
                for h in members:
                    self.thumbnail_buttons[h].description = f"q{h}·kv{kv}"
            self.thumbnails.children = rows
        else:
            columns = min(len(heads), 4)
            for h in heads:
                self.thumbnail_buttons[h].description = f"head {h}"
            self.thumbnails.children = [widgets.HBox([self._cells[h] for h in heads[i:i + columns]])
                                        for i in range(0, len(heads), columns)]

    def _refresh_highlight(self) -> None:
        shapes = []
        q, k = self.query_window, self.key_window
        line = dict(color=HIGHLIGHT, width=2)
        if self.selected in q:
            row = self.selected - q.start
            shapes.append(dict(type="rect", xref="x", yref="y", x0=-0.5, x1=len(k) - 0.5,
                               y0=row - 0.5, y1=row + 0.5, line=line))
        if self.selected in k:
            column = self.selected - k.start
            shapes.append(dict(type="rect", xref="x", yref="y", x0=column - 0.5, x1=column + 0.5,
                               y0=-0.5, y1=len(q) - 0.5, line=line))
        self.heatmap.layout.shapes = shapes

    def _refresh_tokens(self) -> None:
        for button, p in zip(self.token_buttons, self.query_window):
            button.description = self.labels[p]
            button.tooltip = f"position {p}"
            button.button_style = "warning" if p == self.selected else ""
        if self.selected is None:
            self.token_strips.value = "<i>No token selected.</i>"
            return
        pattern = self.trace.attention(self.layer, self.head)[self.batch]
        p = self.selected
        rows = [(f"<b>{escape(self.labels[p])}</b> (position {p}) attends to →", self.key_window, pattern[p]),
                (f"← attended to by (column {p})", self.query_window, pattern[:, p])]
        self.token_strips.value = "".join(self._strip(title, positions, weights) for title, positions, weights in rows)

    def _strip(self, title: str, positions: range, weights: np.ndarray) -> str:
        shown = weights[positions.start:positions.stop]
        scale = Scale.magnitude(shown)
        spans = []
        for p, w in zip(positions, shown):
            background, text = scale.css(w)
            border = f"2px solid {HIGHLIGHT}" if p == self.selected else "1px solid #ccc"
            spans.append(f'<span class="phi3lab-weight" data-position="{p}" data-weight="{w:.6g}" '
                         f'title="position {p}: {w:.4f}" style="background:{background};color:{text};'
                         f'border:{border};padding:1px 3px;margin:1px;display:inline-block;'
                         f'font-family:monospace">{escape(self.labels[p])}</span>')
        return (f"<div style='margin:4px 0'>{title} <small>(colour: probability, 0 to {scale.vmax:.3g})</small>"
                f"<div style='line-height:1.9'>{''.join(spans)}</div></div>")

    def _refresh_status(self) -> None:
        q, k = self.query_window, self.key_window
        text = (f"layer {self.layer} · head {self.head} (kv head {self.kv_head(self.head)}) · {self.values} · "
                f"queries {q.start}–{q.stop - 1}, keys {k.start}–{k.stop - 1} of {self.length} positions")
        if self.selected is not None:
            text += f" · selected {self.selected} {escape(self.labels[self.selected])!s}"
        self.status.value = f"<span class='phi3lab-status-text'>{text}</span>"

    def _figures(self):
        return [self.heatmap]

    def _draw_static(self):
        heads = self.trace.num_query_heads
        columns = self.group_size if self.group_toggle.value else min(heads, 4)
        rows = -(-heads // columns)
        figure = new_figure(14, max(6.5, 1.2 * rows + 1))
        outer = figure.add_gridspec(1, 2, width_ratios=[3, 2])
        q, k = self.query_window, self.key_window
        ax = figure.add_subplot(outer[0])
        values = self.window_values()
        mpl_heatmap(ax, values, self.scale(), title=self.title(), xlabel="key (position token)",
                    ylabel="query (position token)", colorbar=_COLORBARS[self.values],
                    x_labels=[f"{p} {self.labels[p]}" for p in k], y_labels=[f"{p} {self.labels[p]}" for p in q])
        if self.selected is not None:
            from matplotlib.patches import Rectangle

            if self.selected in q:
                ax.add_patch(Rectangle((-0.5, self.selected - q.start - 0.5), len(k), 1, fill=False,
                                       edgecolor=HIGHLIGHT, linewidth=2))
            if self.selected in k:
                ax.add_patch(Rectangle((self.selected - k.start - 0.5, -0.5), 1, len(q), fill=False,
                                       edgecolor=HIGHLIGHT, linewidth=2))
        grid = outer[1].subgridspec(rows, columns)
        for h in range(heads):
            thumb = figure.add_subplot(grid[h // columns, h % columns])
            full = self.head_values(self.layer, h)
            thumb.imshow(np.ma.masked_invalid(pool_max(full, self.thumbnail_size)), interpolation="nearest",
                         **self.scale(full).matplotlib())
            thumb.set_xticks([])
            thumb.set_yticks([])
            thumb.set_title(f"head {h} (kv {self.kv_head(h)})", fontsize=8,
                            color=HIGHLIGHT if h == self.head else "black")
            if h == self.head:
                for spine in thumb.spines.values():
                    spine.set_edgecolor(HIGHLIGHT)
                    spine.set_linewidth(2.5)
        figure.suptitle(f"Layer {self.layer}: all {heads} query heads (block maxima), selected head on the left",
                        fontsize=11, x=0.99, ha="right")
        return figure

    def __repr__(self):
        return (f"AttentionExplorer(layer={self.layer}, head={self.head}, values={self.values!r}, "
                f"positions={self.length}, window={self.max_tokens})")
