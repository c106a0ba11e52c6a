"""`CircuitView`: a graph of model components (or features) and their scored edges."""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.widgets.circuit_layout import KIND_ORDER, GraphLayout, layout
from phi3lab.widgets.common import BLANK, View, base_layout, escape, live, mpl_labels, new_figure, packed

POSITIVE, NEGATIVE, UNSCORED = "#b2182b", "#2166ac", "#999999"  # the ends of DIVERGING; 0 or NaN
WIDTHS = (0.6, 1.2, 2.0, 3.0, 4.5, 6.5)  # edge widths by |score| bucket, thinnest first
KIND_COLOURS = dict(
    zip(
        KIND_ORDER,
        ("#7f7f7f", "#7f7f7f", "#9467bd", "#bcbd22", "#1f77b4", "#aec7e8", "#98df8a", "#ff9896", "#2ca02c", "#d62728"),
    )
)


class CircuitView(View):
    """A graph in the display protocol: nodes by layer (and position), edges
    by score.

    Shows any object with `nodes` and `edges` tables (`EdgeScores`,
    `Circuit`, `AttributionGraph`, or your own: `docs/design.md`,
    "Widgets"). Layers go up (embedding and tokens at the bottom, logits at
    the top); the q/k/v receivers of a head sit just below their head;
    per-position graphs spread positions along x. The top edges by |score|
    are drawn, red for positive and blue for negative scores, thicker for
    larger |score| (grey: a score of 0 or NaN, as a graph not yet scored
    has); the slider sets how many. Clicking a node shows its row
    of the node table and its strongest drawn edges; for a feature node, its
    `FeatureView` when the view has what that needs (`model`, `data` and the
    feature's dictionary).

    Args:
        obj: the graph (anything with `.nodes` and `.edges` DataFrames).
        edges: how many edges to draw at first.
        max_edges: the most the slider offers (only these travel to the browser).
        model, data, tokenizer: what a feature node's `FeatureView` reads
            (`data`: texts, token ids or an `ActivationStore`).
        dictionaries: the feature nodes' dictionaries by name (the node
            table's `dictionary` column), a preset name whose shipped
            dictionaries are loaded by that name (`features.from_preset`), or
            None: `obj.feature_dictionaries` when it is such a mapping (an
            `AttributionGraph` holds its transcoders so).
        title: the figure's title.

    Example:
    ```python
    scores = phi3lab.circuits.edge_attribution(model, clean, corrupted, answer=..., counterfactual=...)
    view = phi3lab.widgets.CircuitView(scores, edges=200)
    view.select("a1.h3")                      # what a click on that node does
    open("circuit.svg", "w").write(view.static("svg"))
    ```
    """

    css_class = "phi3lab-circuit"

    def __init__(
        self,
        obj,
        *,
        edges: int = 100,
        max_edges: int = 2000,
        model=None,
        data=None,
        tokenizer=None,
        dictionaries=None,
        title: str = "Circuit",
    ):
        self.graph: GraphLayout = layout(obj)
        self.max_edges = min(check_positive_int("max_edges", max_edges), max(len(self.graph.edges), 1))
        check_positive_int("edges", edges)
        self.title = str(title)
        self.model, self.data, self.tokenizer = model, data, tokenizer
        if dictionaries is None:
            found = getattr(obj, "feature_dictionaries", None)
            dictionaries = found if isinstance(found, Mapping) else None
        elif not isinstance(dictionaries, (Mapping, str)):
            raise bad_argument(
                "dictionaries", dictionaries, "a mapping name -> SparseDictionary, a preset name, or None"
            )
        self.dictionaries = dictionaries
        self.feature_views: dict = {}
        self.feature_view = None
        self.selected: str | None = None

        self.slider = widgets.IntSlider(
            value=min(edges, self.max_edges),
            min=1,
            max=self.max_edges,
            description="edges",
            continuous_update=False,
            style={"description_width": "initial"},
            layout=widgets.Layout(width="420px"),
        )
        self.slider.add_class("phi3lab-circuit-edges")
        self.status = widgets.HTML()
        self.status.add_class("phi3lab-circuit-status")
        self.row = widgets.HTML("<i>click a node to see its row</i>")
        self.row.add_class("phi3lab-circuit-row")
        self.details = widgets.VBox([])
        self.figure = live(self._figure())
        self.figure.data[-1].on_click(self._on_click)
        self.slider.observe(lambda _: self._redraw(), names="value")
        self._write_status()
        self.widget = widgets.VBox(
            [widgets.HBox([self.slider, self.status]), self.figure, self.row, self.details],
            layout=widgets.Layout(width="100%"),
        )
        self.widget.add_class(self.css_class)

    # === State ===
    @property
    def count(self) -> int:
        """How many edges are drawn."""
        return min(self.slider.value, len(self.graph.edges))

    def shown_edges(self) -> pd.DataFrame:
        """The drawn edges (rows of `obj.edges`), largest |score| first."""
        return self.graph.edges.iloc[self.graph.top(self.count)]

    def shown_nodes(self) -> np.ndarray:
        """Indices (into the node table) of the drawn nodes: those the drawn
        edges touch, or every node of a graph without edges."""
        if not len(self.graph.edges):
            return np.arange(len(self.graph.nodes))
        top = self.graph.top(self.count)
        return np.unique(np.concatenate([self.graph.sender[top], self.graph.receiver[top]]))

    def select(self, node: str) -> None:
        """Show `node`'s row (and its FeatureView for a feature), as a click does."""
        nodes = self.graph.nodes
        matches = np.flatnonzero(nodes["node"].to_numpy() == node)
        if not len(matches):
            raise bad_argument("node", node, "a node id of the graph (its nodes table's `node` column)")
        self.selected = node
        row = nodes.iloc[int(matches[0])]
        self.row.value = self._row_html(row)
        self.details.children = self._feature_children(row)

    # === Interaction ===
    def _on_click(self, trace, points, state) -> None:
        if points.point_inds:
            self.select(str(self.graph.nodes["node"].iloc[self.shown_nodes()[points.point_inds[0]]]))

    def _redraw(self) -> None:
        figure = self._figure()
        with self.figure.batch_update():
            for widget_trace, trace in zip(self.figure.data, figure.data):
                widget_trace.update(x=trace.x, y=trace.y)
            nodes = figure.data[-1]
            self.figure.data[-1].update(
                text=nodes.text, customdata=nodes.customdata, marker=nodes.marker.to_plotly_json()
            )
            self.figure.layout.title.text = figure.layout.title.text
        self._write_status()

    def _write_status(self) -> None:
        scores = self.shown_edges()["score"].abs()
        smallest = f" · |score| ≥ {scores.min():.3g}" if len(scores) and np.isfinite(scores.min()) else ""
        nodes = len(self.shown_nodes())
        self.status.value = (
            f"<span data-edges='{self.count}' data-nodes='{nodes}'>top {self.count} of "
            f"{len(self.graph.edges)} edges{smallest} · {nodes} of {len(self.graph.nodes)} nodes</span>"
        )

    # === Feature nodes ===
    def _feature_children(self, row) -> list:
        if row["kind"] != "feature" or "feature" not in row or "dictionary" not in row:
            return []
        dictionary = self._dictionary(str(row["dictionary"]))
        if dictionary is None or self.data is None:
            note = "give the view model=..., data=... and dictionaries=... to open this feature's FeatureView"
            return [widgets.HTML(f"<i class='phi3lab-circuit-note'>{note}</i>")]
        from phi3lab.widgets.feature_view import FeatureView

        name, feature = str(row["dictionary"]), int(row["feature"])
        if name not in self.feature_views:
            self.feature_views[name] = FeatureView(
                dictionary, self.model, self.data, tokenizer=self.tokenizer, feature=feature
            )
        self.feature_view = self.feature_views[name]
        self.feature_view.show(feature)
        return [self.feature_view.widget]

    def _dictionary(self, name: str):
        if isinstance(self.dictionaries, Mapping):
            return self.dictionaries.get(name)
        if isinstance(self.dictionaries, str):
            from phi3lab.features import from_preset

            return from_preset(self.dictionaries, name)
        return None

    # === Rendering ===
    def _row_html(self, row) -> str:
        cells = "".join(
            f"<tr><th style='text-align:left;padding-right:8px'>{escape(str(k))}</th><td>{escape(_shown(v))}</td></tr>"
            for k, v in row.items()
        )
        top = self.graph.top(self.count)
        index = int(np.flatnonzero(self.graph.nodes["node"].to_numpy() == row["node"])[0])
        edges = []
        for end, other, arrow in (
            (self.graph.receiver, self.graph.sender, "from"),
            (self.graph.sender, self.graph.receiver, "to"),
        ):
            mine = top[end[top] == index][:5]
            edges += [
                f"{arrow} {escape(str(self.graph.nodes['node'].iloc[other[e]]))}: "
                f"{self.graph.edges['score'].iloc[e]:.3g}"
                for e in mine
            ]
        listed = "<br>".join(edges) or "no drawn edges"
        return (
            f"<div class='phi3lab-circuit-node' data-node='{escape(str(row['node']))}' style='display:flex;gap:24px'>"
            f"<table style='font-size:12px'>{cells}</table>"
            f"<div style='font-size:12px'><b>strongest drawn edges</b><br>{listed}</div></div>"
        )

    def _edge_groups(self):
        """The drawn edges split into (colour, width) groups: `[(colour,
        width, edge indices)]`, one per sign and |score| bucket (empty groups
        kept, so the figure's traces stay the same as the slider moves)."""
        top = self.graph.top(self.count)
        scores = self.graph.edges["score"].to_numpy(np.float64)[top]
        size = np.abs(np.nan_to_num(scores))
        largest = size.max() if len(size) and size.max() > 0 else 1.0
        bucket = np.minimum((size / largest * len(WIDTHS)).astype(int), len(WIDTHS) - 1)
        groups = []
        for colour, sign in (
            (POSITIVE, scores > 0),
            (NEGATIVE, scores < 0),
            (UNSCORED, ~((scores > 0) | (scores < 0))),
        ):
            for level, width in enumerate(WIDTHS):
                groups.append((colour, width, top[sign & (bucket == level)]))
        return groups

    def _segments(self, edges: np.ndarray) -> tuple[dict, dict]:
        """x and y of the edges as line segments separated by NaN gaps, packed."""
        g = self.graph
        x = np.stack([g.x[g.sender[edges]], g.x[g.receiver[edges]], np.full(len(edges), np.nan)], 1).ravel()
        y = np.stack([g.y[g.sender[edges]], g.y[g.receiver[edges]], np.full(len(edges), np.nan)], 1).ravel()
        return packed(x.astype(np.float32)), packed(y.astype(np.float32))

    def _figure(self) -> go.Figure:
        g = self.graph
        figure = go.Figure()
        for colour, width, edges in self._edge_groups():
            x, y = self._segments(edges)
            figure.add_scatter(
                x=x, y=y, mode="lines", line=dict(color=colour, width=width), opacity=0.7, hoverinfo="skip"
            )
        shown = self.shown_nodes()
        nodes = g.nodes.iloc[shown]
        scores = np.abs(nodes["score"].to_numpy(np.float64))
        top = np.nanmax(scores) if np.isfinite(scores).any() and np.nanmax(scores) > 0 else 1.0
        figure.add_scatter(
            x=packed(g.x[shown].astype(np.float32)),
            y=packed(g.y[shown].astype(np.float32)),
            mode="markers",
            marker=dict(
                size=(7 + 9 * np.nan_to_num(scores / top)).round(1).tolist(),
                color=[KIND_COLOURS.get(k, BLANK) for k in nodes["kind"]],
                line=dict(color="#333333", width=0.6),
            ),
            text=[_hover(row) for row in nodes.itertuples()],
            customdata=nodes["node"].astype(str).tolist(),
            hovertemplate="%{text}<extra></extra>",
        )
        layers, names = _layer_ticks(g.nodes)
        figure.update_layout(
            **base_layout(
                f"{escape(self.title)}: top {self.count} of {len(g.edges)} edges by |score|",
                height=560,
                plot_bgcolor="white",
            ),
            showlegend=False,
            hovermode="closest",
            xaxis=dict(
                title="position" if g.per_position else "",
                showticklabels=g.per_position,
                zeroline=False,
                showgrid=False,
            ),
            yaxis=dict(title="layer", tickvals=layers, ticktext=names, zeroline=False),
        )
        return figure

    def _figures(self):
        return [self.figure]

    def _html(self):
        return [self.status.value, self.row.value]

    def _draw_static(self):
        from matplotlib.collections import LineCollection

        g = self.graph
        figure = new_figure(12, 7)
        ax = figure.subplots()
        for colour, width, edges in self._edge_groups():
            segments = np.stack(
                [
                    np.stack([g.x[g.sender[edges]], g.y[g.sender[edges]]], 1),
                    np.stack([g.x[g.receiver[edges]], g.y[g.receiver[edges]]], 1),
                ],
                1,
            )
            ax.add_collection(LineCollection(segments, colors=colour, linewidths=width * 0.6, alpha=0.7))
        shown = self.shown_nodes()
        kinds = g.nodes["kind"].iloc[shown]
        ax.scatter(
            g.x[shown],
            g.y[shown],
            s=28,
            c=[KIND_COLOURS.get(k, BLANK) for k in kinds],
            edgecolors="#333333",
            linewidths=0.5,
            zorder=3,
        )
        # Labels where they stay legible: every node of a small graph, else
        # (features crowd their position's column) tokens and logits only.
        crowded = g.per_position and len(shown) > 24
        labelled = [i for i in shown if not crowded or g.nodes["kind"].iloc[i] in ("token", "embed", "logits")]
        if len(labelled) <= 60:
            for i in labelled:
                ax.annotate(
                    str(g.nodes["label"].iloc[i])[:14],
                    (g.x[i], g.y[i]),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_yticks(*_layer_ticks(g.nodes))
        ax.autoscale()
        if not g.per_position:
            ax.set_xticks([])
        mpl_labels(
            ax,
            f"{self.title}: top {self.count} of {len(g.edges)} edges (red > 0, blue < 0, width ~ |score|)",
            "position" if g.per_position else "",
            "layer",
        )
        return figure

    def __repr__(self):
        return f"CircuitView({len(self.graph.nodes)} nodes, {len(self.graph.edges)} edges, showing {self.count})"


def _layer_ticks(nodes: pd.DataFrame) -> tuple[list[int], list[str]]:
    """The y ticks: every layer holding nodes, named "embed" below 0 and
    "logits" where it holds only the logits."""
    layers = sorted(set(nodes["layer"].astype(int)))
    logits = set(nodes["layer"][nodes["kind"] == "logits"].astype(int)) - set(
        nodes["layer"][nodes["kind"] != "logits"].astype(int)
    )
    names = ["embed" if v < 0 else "logits" if v in logits else f"layer {v}" for v in layers]
    return layers, names


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _hover(row) -> str:
    where = f" · pos {row.position}" if row.position >= 0 else ""
    kind = escape(str(row.kind))
    return f"<b>{escape(str(row.label))}</b><br>{kind} · layer {row.layer}{where}<br>score {row.score:.3g}"
