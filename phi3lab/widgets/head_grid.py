"""`HeadGrid`: every attention head of a trace at a glance, linked to an
`AttentionExplorer`."""

from __future__ import annotations

import base64
import io

import ipywidgets as widgets
import matplotlib
import numpy as np
import plotly.graph_objects as go

from phi3lab.checks import check_in_range, check_index
from phi3lab.errors import bad_argument
from phi3lab.model.attention import key_value_heads
from phi3lab.tracing.names import block_name
from phi3lab.widgets.attention import AttentionExplorer
from phi3lab.widgets.common import (
    BLANK,
    HIGHLIGHT,
    Scale,
    View,
    as_trace,
    base_layout,
    escape,
    live,
    new_figure,
    pool_max,
)
from phi3lab.widgets.score_table import score_table

_GAP = 2  # pixels between thumbnails
_GROUP_GAP = 6  # extra pixels between key/value groups
_BAR = 4  # height of the score bar under a thumbnail


class HeadGrid(View):
    """Every attention head of a trace as one thumbnail mosaic.

    Rows are layers, columns query heads, grouped by the key/value head they
    read (grouped-query attention). Each thumbnail is the head's pattern as
    block maxima (sparse peaks stay visible), all drawn server-side into one
    PNG, so a 32 x 32-head model at thousands of positions costs one image.
    With `scores`, a coloured bar under each thumbnail shows the chosen
    score, hovering a head lists all its scores, and "sort" orders the heads
    of each layer (within their kv group) by the score. Clicking a head
    opens it in the linked `AttentionExplorer` below (`.explorer`), whose
    own layer/head choice moves the grid's outline.

    Args:
        trace: a `phi3lab.Trace` holding `blocks.*.attn.hook_pattern` (any
            layers; `queries=`/`heads=` traces show what they hold, other
            heads blank).
        scores: optional per-head scores: `analysis.head_scores(...)`, a
            `PatchingResult` over heads, `direct_logit_attribution(...)`, a
            `{name: [layers, heads]}` mapping or one `[layers, heads]` array.
        batch: int. Which row of the trace. Defaults to 0.
        score: the score column shown first (default: the first).
        sort: bool. Start with the heads of each layer sorted by the score.
        cell: int. Thumbnail side in pixels (default: fits ~640 pixels).
        explorer: bool. Show a linked `AttentionExplorer`. Defaults to True.
        tokens: optional display strings, one per position.

    Example:
    ```python
    tr = phi3lab.trace(model, ids, names=["blocks.*.attn.hook_pattern"])
    grid = phi3lab.widgets.HeadGrid(tr, scores=phi3lab.analysis.head_scores(model))
    grid.select(2, 1)            # what a click on layer 2, head 1 does
    ```
    """

    css_class = "phi3lab-head-grid"

    def __init__(
        self,
        trace,
        scores=None,
        *,
        batch: int = 0,
        score: str | None = None,
        sort: bool = False,
        cell: int | None = None,
        explorer: bool = True,
        tokens=None,
    ):
        self.trace = trace = as_trace(trace)
        self.batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        self.num_heads = trace.num_query_heads
        self.group_size = trace.num_query_heads // trace.num_key_value_heads
        self.layers = [layer for layer in range(trace.num_layers) if block_name(layer, "attn.hook_pattern") in trace]
        if not self.layers:
            raise KeyError(
                "HeadGrid needs 'blocks.*.attn.hook_pattern' for at least one layer. Capture it with "
                "phi3lab.trace(model, ids, names=['blocks.*.attn.hook_pattern'])."
            )
        self.heads = list(trace.attention_heads) if trace.attention_heads is not None else list(range(self.num_heads))
        side = max(len(self.layers), self.num_heads)
        self.cell = (
            check_in_range("cell", cell, 4, 257) if cell is not None else int(np.clip(640 // side - _GAP, 8, 64))
        )
        self.scores = None if scores is None else score_table(scores, trace.num_layers, self.num_heads, self.group_size)
        columns = [] if self.scores is None else list(self.scores.columns)
        if score is not None and score not in columns:
            raise bad_argument("score", score, f"one of the score columns {columns}")
        if self.scores is not None and not columns:
            raise bad_argument("scores", "a table without numeric columns", "at least one numeric score column")
        self.thumbnails = self._thumbnails()  # [layers, heads, cell, cell], NaN = not captured
        self.selected = (self.layers[0], self.heads[0])

        # === Controls ===
        self.score_select = widgets.Dropdown(
            options=columns or ["(none)"],
            value=score or (columns or ["(none)"])[0],
            description="Score",
            disabled=not columns,
        )
        self.sort_toggle = widgets.Checkbox(
            value=sort and bool(columns), description="sort heads by score", indent=False, disabled=not columns
        )
        self.score_select.add_class("phi3lab-score")
        self.sort_toggle.add_class("phi3lab-sort")
        self.readout = widgets.HTML()
        self.readout.add_class("phi3lab-grid-readout")

        # === The mosaic: one layout image, a transparent heatmap over it for hover and clicks ===
        self.figure = go.Figure(go.Heatmap(opacity=0, showscale=False, hoverongaps=False))
        width, height = self._pixels()
        shown = int(np.clip(height, 420, 800))  # small grids drawn larger, large ones at most 800 px
        self.figure.update_layout(
            **base_layout("", height=shown + 100, margin=dict(l=60, r=20, t=70, b=30), plot_bgcolor="white")
        )
        self.figure.update_xaxes(
            showgrid=False, zeroline=False, side="top", tickangle=0, range=[-0.5, width - 0.5], constrain="domain"
        )
        self.figure.update_yaxes(
            showgrid=False,
            zeroline=False,
            autorange="reversed",
            scaleanchor="x",
            range=[height - 0.5, -0.5],
            constrain="domain",
        )
        self.score_select.observe(lambda _: self._refresh(), names="value")
        self.sort_toggle.observe(lambda _: self._refresh(), names="value")
        self._refresh()
        self.figure = live(self.figure)
        self.figure.data[0].on_click(self._on_click)

        self.explorer = None
        children = [widgets.HBox([self.score_select, self.sort_toggle]), self.readout, self.figure]
        if explorer:
            self.explorer = AttentionExplorer(
                trace, self.batch, layer=self.layers[0], head=self.heads[0], tokens=tokens, thumbnails=False
            )  # the grid shows every head
            for control in (self.explorer.layer_select, self.explorer.head_select):
                control.observe(lambda _: self._follow_explorer(), names="value")
            children.append(self.explorer.widget)
        self.widget = widgets.VBox(children, layout=widgets.Layout(width="100%"))
        self.widget.add_class(self.css_class)

    # === State ===
    @property
    def score(self) -> str | None:
        return None if self.scores is None else self.score_select.value

    @property
    def sorted(self) -> bool:
        return self.sort_toggle.value

    def head_score(self, layer: int, head: int) -> float:
        return float(self._score_array()[layer, head]) if self.scores is not None else np.nan

    def _score_array(self) -> np.ndarray:
        """The chosen score as `[num_layers, num_heads]`."""
        return self.scores[self.score].to_numpy().reshape(self.trace.num_layers, self.num_heads)

    def order(self) -> np.ndarray:
        """`[layers, heads]`: the query head shown in each column of each row
        (kv groups stay together; sorted by score, descending, within them)."""
        order = np.tile(np.arange(self.num_heads), (len(self.layers), 1))
        if self.sorted and self.score is not None:
            scores = np.nan_to_num(self._score_array()[self.layers], nan=-np.inf)
            groups = scores.reshape(len(self.layers), -1, self.group_size)  # [layers, kv, group]
            ranked = (
                np.argsort(-groups, axis=-1, kind="stable") + np.arange(0, self.num_heads, self.group_size)[:, None]
            )
            order = ranked.reshape(len(self.layers), self.num_heads)
        return order

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of the thumbnail at grid `row`, `column`."""
        x = _GAP + column * (self.cell + _GAP) + (column // self.group_size) * _GROUP_GAP
        y = _GAP + row * (self.cell + _BAR + _GAP)
        return x, y

    def select(self, layer: int, head: int) -> None:
        """Outline head (`layer`, `head`) and open it in the explorer."""
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"a layer whose pattern the trace holds: {self.layers}")
        if head not in self.heads:
            raise bad_argument("head", head, f"one of the captured query heads {self.heads}")
        self.selected = (int(layer), int(head))
        if self.explorer is not None and (self.explorer.layer, self.explorer.head) != self.selected:
            self.explorer.show(*self.selected)
        self._refresh_selection()

    def _follow_explorer(self) -> None:
        if self.explorer._holding:
            return
        self.selected = (self.explorer.layer, self.explorer.head)
        self._refresh_selection()

    def _on_click(self, trace, points, state):
        if points.point_inds:
            row, column = points.point_inds[0]
            head = int(self.order()[row, column])
            if head in self.heads:
                self.select(self.layers[row], head)

    # === Rendering ===
    def _thumbnails(self) -> np.ndarray:
        thumbs = np.full((len(self.layers), self.num_heads, self.cell, self.cell), np.nan, np.float32)
        for r, layer in enumerate(self.layers):
            pooled = pool_max(self.trace.attention(layer)[self.batch], self.cell)  # [held heads, <=cell, <=cell]
            rows = np.minimum(np.arange(self.cell) * pooled.shape[1] // self.cell, pooled.shape[1] - 1)
            cols = np.minimum(np.arange(self.cell) * pooled.shape[2] // self.cell, pooled.shape[2] - 1)
            thumbs[r, self.heads] = pooled[:, rows][:, :, cols]
        return thumbs

    def _pixels(self) -> tuple[int, int]:
        x, _ = self.cell_origin(0, self.num_heads - 1)
        _, y = self.cell_origin(len(self.layers) - 1, 0)
        return x + self.cell + _GAP, y + self.cell + _BAR + _GAP

    def mosaic(self) -> np.ndarray:
        """The grid as uint8 RGB `[height, width, 3]` (what the browser shows)."""
        width, height = self._pixels()
        image = np.full((height, width, 3), 255, np.uint8)
        order = self.order()
        rgb = Scale.probability().rgb(self.thumbnails)  # [layers, heads, cell, cell, 3]
        scale = self._score_scale()
        bars = None if scale is None else scale.rgb(self._score_array()[self.layers])  # [layers, heads, 3]
        for r in range(len(self.layers)):
            for c in range(self.num_heads):
                head = order[r, c]
                x, y = self.cell_origin(r, c)
                image[y : y + self.cell, x : x + self.cell] = rgb[r, head]
                if bars is not None:
                    image[y + self.cell + 1 : y + self.cell + _BAR, x : x + self.cell] = bars[r, head]
        return image

    def _score_scale(self) -> Scale | None:
        if self.score is None:
            return None
        values = self.scores[self.score].to_numpy()
        return Scale.signed(values) if np.nanmin(values) < 0 else Scale.magnitude(values)

    def _refresh(self) -> None:
        from PIL import Image

        order = self.order()
        width, height = self._pixels()
        buffer = io.BytesIO()
        Image.fromarray(self.mosaic()).save(buffer, format="PNG", optimize=True)
        source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        centres_x = [self.cell_origin(0, c)[0] + (self.cell - 1) / 2 for c in range(self.num_heads)]
        centres_y = [self.cell_origin(r, 0)[1] + (self.cell + _BAR - 1) / 2 for r in range(len(self.layers))]
        table = (
            None if self.scores is None else self.scores.to_numpy().reshape(self.trace.num_layers, self.num_heads, -1)
        )
        hover = [[self._hover(layer, int(head), table) for head in order[r]] for r, layer in enumerate(self.layers)]
        with self.figure.batch_update():
            self.figure.layout.images = [
                dict(
                    source=source,
                    xref="x",
                    yref="y",
                    x=-0.5,
                    y=-0.5,
                    sizex=width,
                    sizey=height,
                    xanchor="left",
                    yanchor="top",
                    sizing="stretch",
                    layer="below",
                )
            ]
            heat = self.figure.data[0]
            heat.z = np.zeros((len(self.layers), self.num_heads), np.float32).tolist()
            heat.x, heat.y = centres_x, centres_y
            heat.text = hover
            heat.hovertemplate = "%{text}<extra></extra>"
            self.figure.layout.xaxis.update(tickvals=centres_x, ticktext=self._column_labels())
            self.figure.layout.yaxis.update(
                tickvals=centres_y, ticktext=[f"L{layer}" for layer in self.layers], title="layer"
            )
            self.figure.layout.title.text = self.title()
        self._refresh_selection()

    def _column_labels(self) -> list[str]:
        if self.sorted:
            return [f"#{c % self.group_size + 1}" for c in range(self.num_heads)]
        return [f"h{h}" for h in range(self.num_heads)]

    def _hover(self, layer: int, head: int, table: np.ndarray | None) -> str:
        kv = key_value_heads(self.trace.num_query_heads, self.trace.num_key_value_heads)[head]
        text = f"layer {layer} · head {head} (kv {kv})"
        if head not in self.heads:
            return text + "<br>not captured"
        if table is not None:
            for name, value in zip(self.scores.columns, table[layer, head]):
                text += f"<br>{escape(str(name))}: {value:.4g}"
        return text

    def title(self) -> str:
        rows = self.trace.query_window
        held = f"queries {rows[0]}–{rows[1] - 1}" if rows is not None else f"{self.trace.token_ids.shape[1]} positions"
        text = f"{len(self.layers)} layers × {self.num_heads} query heads ({held}, block maxima 0–1)"
        if self.group_size > 1:
            text += f"<br>columns: {self.trace.num_key_value_heads} kv groups of {self.group_size}"
            text += ", ranked by score within each" if self.sorted else ""
        if self.score is not None:
            text += f" · bar: {escape(self.score)}"
        return text

    def _refresh_selection(self) -> None:
        layer, head = self.selected
        row = self.layers.index(layer)
        column = int(np.flatnonzero(self.order()[row] == head)[0])
        x, y = self.cell_origin(row, column)
        self.figure.layout.shapes = [
            dict(
                type="rect",
                x0=x - 1.5,
                x1=x + self.cell + 0.5,
                y0=y - 1.5,
                y1=y + self.cell + _BAR + 0.5,
                line=dict(color=HIGHLIGHT, width=2),
            )
        ]
        score = "" if self.score is None else f" · {escape(self.score)} = {self.head_score(layer, head):.4g}"
        self.readout.value = (
            f"<span class='phi3lab-grid-selected'>selected: layer {layer} · head {head} "
            f"(kv {head // self.group_size}){score}</span> — click a thumbnail to open it below"
        )

    def _figures(self):
        figures = [self.figure]
        return figures + (self.explorer._figures() if self.explorer is not None else [])

    def _draw_static(self):
        image = self.mosaic()
        height, width = image.shape[:2]
        figure = new_figure(min(9, max(6, width / 90 + 2)), min(9, max(4, height / 90 + 1.5)))
        ax = figure.subplots()
        ax.imshow(image, interpolation="nearest")
        order = self.order()
        ax.set_xticks(
            [self.cell_origin(0, c)[0] + (self.cell - 1) / 2 for c in range(self.num_heads)],
            self._column_labels(),
            fontsize=7,
        )
        ax.set_yticks(
            [self.cell_origin(r, 0)[1] + self.cell / 2 for r in range(len(self.layers))],
            [f"L{layer}" for layer in self.layers],
            fontsize=7,
        )
        ax.xaxis.tick_top()
        ax.set_ylabel("layer")
        layer, head = self.selected
        row = self.layers.index(layer)
        x, y = self.cell_origin(row, int(np.flatnonzero(order[row] == head)[0]))
        from matplotlib.patches import Rectangle

        ax.add_patch(
            Rectangle(
                (x - 1.5, y - 1.5), self.cell + 2, self.cell + _BAR + 2, fill=False, edgecolor=HIGHLIGHT, linewidth=2
            )
        )
        ax.set_title(self.title().replace("<br>", "\n").replace("&amp;", "&"), fontsize=10, loc="left")
        if self.score is not None:
            scale = self._score_scale()
            mappable = matplotlib.cm.ScalarMappable(
                norm=matplotlib.colors.Normalize(scale.vmin, scale.vmax), cmap=scale.cmap
            )
            figure.colorbar(mappable, ax=ax, label=f"bar: {self.score}", fraction=0.04, pad=0.02)
        ax.set_facecolor(BLANK)
        return figure

    def __repr__(self):
        return (
            f"HeadGrid({len(self.layers)} layers x {self.num_heads} heads, score={self.score!r}, "
            f"selected={self.selected})"
        )
