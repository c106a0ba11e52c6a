"""`PatchingView`: a heatmap of activation-patching results."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from phi3lab.errors import bad_argument
from phi3lab.widgets.common import Scale, View, base_layout, colorbar, escape, live, mpl_heatmap, new_figure


def _unique(labels) -> list[str]:
    """Category labels plotly will not merge: `"3 cat"` where labels repeat."""
    labels = [str(label) for label in labels]
    if len(set(labels)) == len(labels):
        return [escape(label) for label in labels]
    return [f"{i} {escape(label)}" for i, label in enumerate(labels)]


class PatchingView(View):
    """Activation-patching results as a diverging heatmap centred at 0.

    Red cells are sites whose patch raised the metric, blue ones lowered it,
    white ones did nothing; the colour range is symmetric around 0. Clicking
    a cell shows its value below the heatmap.

    Args:
        values: array `[rows, cols]` (e.g. layer x position, or layer x head).
        row_label: str. What rows are, for the axis title. Defaults to "layer".
        col_labels: labels per column (tokens, head names) or None (indices).
        title: str. The figure title.
        col_label: str. What columns are. Defaults to "position".
        row_labels: labels per row, or None (indices).
        value_label: str. What a value is, for the colour bar.

    Example:
    ```python
    result = phi3lab.analysis.activation_patching(model, clean, corrupted, metric)
    phi3lab.widgets.PatchingView.from_result(result)
    phi3lab.widgets.PatchingView(np.random.randn(4, 8), col_labels=list("abcdefgh"))
    ```
    """

    css_class = "phi3lab-patching"

    def __init__(
        self,
        values,
        row_label: str = "layer",
        col_labels=None,
        title: str = "Activation patching",
        *,
        col_label: str = "position",
        row_labels=None,
        value_label: str = "metric change",
    ):
        values = np.asarray(values)
        if values.ndim != 2 or values.size == 0 or not np.issubdtype(values.dtype, np.number):
            raise bad_argument(
                "values",
                f"array of shape {values.shape} and dtype {values.dtype}",
                "a non-empty numeric array [rows, cols]",
            )
        self.values = values
        rows, cols = values.shape
        for name, labels, size in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
            if labels is not None and len(labels) != size:
                raise bad_argument(name, f"{len(labels)} labels", f"one label per {name[:3]} ({size})")
        self.row_labels = [str(i) for i in range(rows)] if row_labels is None else [str(r) for r in row_labels]
        self.col_labels = [str(i) for i in range(cols)] if col_labels is None else [str(c) for c in col_labels]
        self.row_label, self.col_label, self.title, self.value_label = row_label, col_label, title, value_label
        self.scale = Scale.signed(values)

        self.heatmap = go.Figure(
            go.Heatmap(
                z=values,
                x=_unique(self.col_labels),
                y=_unique(self.row_labels),
                colorbar=colorbar(value_label),
                hovertemplate=f"{row_label} %{{y}}<br>{col_label} %{{x}}<br>{value_label} %{{z:.4g}}<extra></extra>",
                **self.scale.plotly(),
            )
        )
        self.heatmap.update_layout(**base_layout(escape(title), height=max(320, 24 * rows + 160)))
        self.heatmap.update_xaxes(title=col_label, type="category", tickangle=-90)
        self.heatmap.update_yaxes(title=row_label, type="category", autorange="reversed")
        self.readout = widgets.HTML("<i>Click a cell for its value.</i>")
        self.heatmap = live(self.heatmap, self._on_click)
        self.widget = widgets.VBox([self.heatmap, self.readout], layout=widgets.Layout(width="100%"))
        self.widget.add_class(self.css_class)

    @classmethod
    def from_result(cls, result, **overrides) -> "PatchingView":
        """A view of a `PatchingResult` from `phi3lab.analysis.activation_patching`.

        Reads `result.values [layers, units]` (`[layers, positions, heads]`
        is shown with a row per head of each layer), `result.axes` (e.g.
        `("layer", "position")`) for the axis titles and `result.site` for the
        title, which says whether values are normalized (clean run 1,
        corrupted 0). Keyword `overrides` (`col_labels=tokens`, ...) win.
        """
        if not hasattr(result, "values"):
            raise bad_argument("result", result, "a PatchingResult (an object with .values [rows, cols])")
        values = np.asarray(result.values)
        axes = getattr(result, "axes", ("layer", "position"))
        row_label, col_label = axes[:2]
        more = {}
        if values.ndim == 3:  # [layer, position, head]: a row per head of each layer
            layers, positions, heads = values.shape
            values = values.transpose(0, 2, 1).reshape(layers * heads, positions)
            row_label = f"{axes[0]} · {axes[2]}"
            more["row_labels"] = [f"L{layer}H{head}" for layer in range(layers) for head in range(heads)]
        raw = getattr(result, "raw", None)
        normalized = raw is not None and not np.array_equal(np.asarray(raw), values)
        title = f"Activation patching of {getattr(result, 'site', 'activations')}"
        options = dict(
            row_label=row_label,
            col_label=col_label,
            title=title + (" (1 = clean run, 0 = corrupted run)" if normalized else ""),
            value_label="normalized metric" if normalized else "patched metric",
        )
        options.update(more, **overrides)
        return cls(values, **options)

    def _on_click(self, trace, points, state):
        if points.point_inds:
            row, col = points.point_inds[0]
            self.readout.value = (
                f"<b>{escape(self.row_label)} {escape(self.row_labels[row])}, "
                f"{escape(self.col_label)} {escape(self.col_labels[col])}</b>: "
                f"{escape(self.value_label)} = {self.values[row, col]:.6g}"
            )

    def _figures(self):
        return [self.heatmap]

    def _draw_static(self):
        rows, cols = self.values.shape
        figure = new_figure(min(16, max(7, 0.35 * cols + 3)), min(12, max(4, 0.3 * rows + 2)))
        mpl_heatmap(
            figure.subplots(),
            self.values,
            self.scale,
            title=self.title,
            xlabel=self.col_label,
            ylabel=self.row_label,
            colorbar=self.value_label,
            x_labels=self.col_labels,
            y_labels=self.row_labels,
        )
        return figure

    def __repr__(self):
        rows, cols = self.values.shape
        return f"PatchingView({rows} {self.row_label} x {cols} {self.col_label}, title={self.title!r})"
