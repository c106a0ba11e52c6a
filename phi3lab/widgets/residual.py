"""`ResidualStreamView`: how large the residual stream and each block's
writes into it are, per layer and position."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from phi3lab.checks import check_choice, check_in_range, check_index
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import (
    HIGHLIGHT,
    PositionWindow,
    Scale,
    View,
    as_trace,
    axis_labels,
    base_layout,
    colorbar,
    column_highlight,
    escape,
    live,
    mpl_heatmap,
    mpl_labels,
    new_figure,
    packed,
    position_labels,
    window,
    window_slider,
)

# In the order a block computes them.
COMPONENTS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
_COLOURS = dict(resid_pre="#1f77b4", attn_out="#d62728", resid_mid="#9467bd", mlp_out="#2ca02c", resid_post="#17becf")


def residual_norms(trace, batch: int = 0, components=COMPONENTS) -> np.ndarray:
    """L2 norms of `blocks.{l}.hook_{component}` (float64) `[C, L, T]`."""
    norms = np.empty((len(components), trace.num_layers, trace.token_ids.shape[1]))
    for c, component in enumerate(components):
        for layer in range(trace.num_layers):
            vectors = trace[block_name(layer, f"hook_{component}")][batch]
            norms[c, layer] = np.linalg.norm(vectors.astype(np.float64), axis=-1)
    return norms


class ResidualStreamView(PositionWindow, View):
    """Norms of the residual stream (`resid_pre`, `resid_mid`, `resid_post`)
    and of what each block adds to it (`attn_out`, `mlp_out`).

    A heatmap of one component's L2 norm over layers (y) and positions (x);
    picking a position (slider, or click a cell) shows its norms through the
    layers as lines and as a table of numbers. Inputs longer than
    `max_tokens` positions show a window of them.

    Args:
        trace: a `phi3lab.Trace` holding `blocks.*.hook_resid_*`,
            `blocks.*.hook_attn_out` and `blocks.*.hook_mlp_out`.
        batch: int. Which row of the trace. Defaults to 0.
        component: the heatmap's initial component, one of `COMPONENTS`.
        position: int. Initially picked position (default: the last real one).
        max_tokens: int. Widest window of positions sent. Defaults to 512.
        tokens: optional display strings, one per position.

    Example:
    ```python
    view = phi3lab.widgets.ResidualStreamView(tr)
    view.norms          # tidy DataFrame: layer, position, token, one column per component
    ```
    """

    css_class = "phi3lab-residual"

    def __init__(
        self,
        trace,
        batch: int = 0,
        *,
        component: str = "resid_post",
        position: int | None = None,
        max_tokens: int = 512,
        tokens=None,
    ):
        self.trace = trace = as_trace(trace)
        self.batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        check_choice("component", component, COMPONENTS)
        self.max_tokens = check_in_range("max_tokens", max_tokens, 1, 1 << 31)
        self.length = trace.token_ids.shape[1]
        missing = [f"blocks.*.hook_{c}" for c in COMPONENTS if block_name(0, f"hook_{c}") not in trace]
        if missing:
            raise KeyError(
                f"ResidualStreamView needs {missing}, which the trace did not capture. Capture them "
                "with phi3lab.trace(model, ids, names=['blocks.*.hook_resid_*', 'blocks.*.hook_attn_out', "
                "'blocks.*.hook_mlp_out']) (or names=None)."
            )
        self.labels = position_labels(trace, self.batch, tokens)
        self.norm_array = residual_norms(trace, self.batch)
        if position is None:
            position = int(np.flatnonzero(trace.padding_mask[self.batch])[-1])
        position = check_index("position", position, self.length, "position")

        # === Controls ===
        self.component_select = widgets.Dropdown(options=COMPONENTS, value=component, description="Heatmap of")
        self.component_select.add_class("phi3lab-component")
        self.position_slider = widgets.IntSlider(
            value=position, min=0, max=self.length - 1, description="Position", continuous_update=False
        )
        self.position_slider.add_class("phi3lab-position")
        self.window_slider = window_slider("positions from", self.length, max_tokens, start=position - max_tokens // 2)

        # === Figures ===
        self.heatmap = go.Figure(go.Heatmap(colorbar=colorbar("L2 norm")))
        self.heatmap.update_layout(**base_layout("", height=360))
        self.heatmap.update_xaxes(title="position (token)", type="category", tickangle=-90)
        self.heatmap.update_yaxes(title="layer", autorange="reversed", dtick=1)
        self.lines = go.Figure(
            [
                go.Scatter(name=c, mode="lines+markers", line=dict(color=_COLOURS[c]), x=list(range(trace.num_layers)))
                for c in COMPONENTS
            ]
        )
        self.lines.update_layout(**base_layout("", height=360, width=520, plot_bgcolor="white"))
        self.lines.update_xaxes(title="layer", dtick=1)
        self.lines.update_yaxes(title="L2 norm", rangemode="tozero")
        self.table = widgets.HTML()
        self.table.add_class("phi3lab-numbers")

        self.component_select.observe(lambda _: self._refresh_heatmap(), names="value")
        self.window_slider.observe(lambda _: self._refresh_heatmap(), names="value")
        self.position_slider.observe(lambda _: self._refresh_position(), names="value")
        self._refresh_heatmap()
        self._refresh_position()
        self.heatmap, self.lines = live(self.heatmap, self._on_cell_click), live(self.lines)
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.component_select, self.position_slider, self.window_slider]),
                self.heatmap,
                widgets.HBox([self.lines, self.table], layout=widgets.Layout(align_items="flex-start")),
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.widget.add_class(self.css_class)

    @property
    def component(self) -> str:
        return self.component_select.value

    @property
    def norms(self) -> pd.DataFrame:
        """One row per (layer, position): the L2 norm of every component."""
        layers, positions = np.meshgrid(np.arange(self.trace.num_layers), np.arange(self.length), indexing="ij")
        table = pd.DataFrame(
            {
                "layer": layers.ravel(),
                "position": positions.ravel(),
                "token": np.asarray(self.labels, object)[positions.ravel()],
            }
        )
        for c, component in enumerate(COMPONENTS):
            table[component] = self.norm_array[c].ravel()
        return table

    def position_numbers(self, position: int | None = None) -> pd.DataFrame:
        """Norms of every component through the layers at one position."""
        position = self.position if position is None else check_index("position", position, self.length, "position")
        return pd.DataFrame(self.norm_array[:, :, position].T, columns=list(COMPONENTS)).rename_axis("layer")

    def title(self) -> str:
        return f"‖{self.component}‖ (L2 norm over the hidden dimension) per layer and position"

    def _component_values(self) -> np.ndarray:
        return self.norm_array[COMPONENTS.index(self.component)]

    def _on_cell_click(self, trace, points, state):
        if points.xs:
            self.position_slider.value = int(str(points.xs[0]).split(" ", 1)[0])

    def _refresh_heatmap(self) -> None:
        values = self._component_values()
        positions = self.positions
        with self.heatmap.batch_update():
            heat = self.heatmap.data[0]
            heat.z = packed(values[:, positions.start : positions.stop])
            heat.x = axis_labels(self.labels, positions)
            heat.y = list(range(self.trace.num_layers))
            heat.update(**Scale.magnitude(values).plotly())
            heat.hovertemplate = f"layer %{{y}}<br>position %{{x}}<br>‖{self.component}‖ = %{{z:.4g}}<extra></extra>"
            self.heatmap.layout.title.text = self.title()
        self._refresh_highlight()

    def _refresh_highlight(self) -> None:
        self.heatmap.layout.shapes = column_highlight(self.positions, self.position)

    def _refresh_position(self) -> None:
        p = self.position
        if p not in self.positions:
            self.window_slider.value = window(p - self.max_tokens // 2, self.max_tokens, self.length).start
        with self.lines.batch_update():
            for c, scatter in enumerate(self.lines.data):
                scatter.y = self.norm_array[c, :, p]
            self.lines.layout.title.text = f"Norms through the layers at position {p} ({escape(self.labels[p])})"
        numbers = self.position_numbers(p)
        cell = "padding:1px 5px;text-align:right;font-family:monospace"
        header = "".join(f"<th style='{cell}'>{c}</th>" for c in numbers.columns)
        rows = "".join(
            f"<tr><td style='{cell}'>{layer}</td>" + "".join(f"<td style='{cell}'>{v:.4g}</td>" for v in row) + "</tr>"
            for layer, row in zip(numbers.index, numbers.to_numpy())
        )
        self.table.value = (
            f"<b>L2 norms at position {p}: {escape(self.labels[p])}</b>"
            f"<table style='font-size:12px'><tr><th style='{cell}'>layer</th>{header}</tr>{rows}</table>"
        )
        self._refresh_highlight()

    def _figures(self):
        return [self.heatmap, self.lines]

    def _draw_static(self):
        figure = new_figure(14, 4.8)
        left, right = figure.subplots(1, 2, width_ratios=[3, 2])
        positions = self.positions
        values = self._component_values()
        mpl_heatmap(
            left,
            values[:, positions.start : positions.stop],
            Scale.magnitude(values),
            title=self.title(),
            xlabel="position (token)",
            ylabel="layer",
            colorbar="L2 norm",
            x_labels=[f"{p} {self.labels[p]}" for p in positions],
            y_labels=[str(l) for l in range(self.trace.num_layers)],
        )
        if self.position in positions:
            left.axvline(self.position - positions.start, color=HIGHLIGHT, linewidth=2)
        for c, component in enumerate(COMPONENTS):
            right.plot(self.norm_array[c, :, self.position], marker="o", label=component, color=_COLOURS[component])
        mpl_labels(
            right,
            f"Norms through the layers at position {self.position} ({self.labels[self.position]})",
            "layer",
            "L2 norm",
        )
        right.set_xticks(range(self.trace.num_layers))
        right.set_ylim(bottom=0)
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
        return figure

    def __repr__(self):
        return f"ResidualStreamView(component={self.component!r}, position={self.position}, positions={self.length})"
