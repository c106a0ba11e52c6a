"""`RopeView`: the rotary embedding as the model applies it."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
from plotly.subplots import make_subplots

from phi3lab.checks import check_in_range
from phi3lab.errors import bad_argument
from phi3lab.generation.result import Generation
from phi3lab.model.rotary import RotarySpec
from phi3lab.tracing.rope import RotaryDescription, describe_rotary
from phi3lab.widgets.common import (
    DIVERGING,
    HIGHLIGHT,
    Scale,
    View,
    as_trace,
    base_layout,
    colorbar,
    escape,
    live,
    mpl_heatmap,
    mpl_labels,
    new_figure,
    window,
    window_slider,
)

_SHORT, _LONG, _NONE = "#1f77b4", "#d62728", "#7f7f7f"


def _source(model_or_trace, seq_len):
    """`(spec or None, description)` from a model, a Trace, a RotarySpec or a
    RotaryDescription."""
    if isinstance(model_or_trace, Generation):
        model_or_trace = as_trace(model_or_trace, "model_or_trace")
    if isinstance(model_or_trace, RotaryDescription):
        description, spec = model_or_trace, None
    elif isinstance(model_or_trace, RotarySpec):
        spec = model_or_trace
        description = None
    elif isinstance(getattr(model_or_trace, "rotary", None), RotarySpec):
        spec, description = model_or_trace.rotary, None
    elif isinstance(getattr(model_or_trace, "rope", None), RotaryDescription):
        description, spec = model_or_trace.rope, None
    else:
        raise bad_argument(
            "model_or_trace", model_or_trace, "a Phi3Backbone, a phi3lab.Trace, a RotarySpec or a RotaryDescription"
        )
    if spec is None:
        if seq_len is not None and seq_len != description.num_positions:
            raise bad_argument(
                "seq_len",
                seq_len,
                f"None or {description.num_positions} (a trace's rotary tables "
                "are fixed at its length; pass the model for other lengths)",
            )
        return None, description
    if seq_len is None:
        seq_len = spec.pretraining_sequence_length
    seq_len = check_in_range("seq_len", seq_len, 1, spec.max_sequence_length + 1)
    return spec, describe_rotary(spec, seq_len)


class RopeView(View):
    """The rotary position embedding: frequencies, "su" factors and tables.

    Shows, per dimension pair, the inverse frequency (radians per token) and
    the wavelength (tokens per full turn) against the sequence length and
    `pretraining_sequence_length`; the short and long "su" factor lists side
    by side (the set in force is solid, with the reason); the attention
    factor; and the cos/sin tables over a window of positions, exactly as the
    model multiplies them into queries and keys.

    Args:
        model_or_trace: a `Phi3Backbone` (the sequence length can then be
            changed in the view), a `phi3lab.Trace` (its `rope`), a
            `RotarySpec` or a `RotaryDescription`.
        seq_len: int. Positions in use (with a model); defaults to the
            model's `pretraining_sequence_length`.
        max_positions: int. Rows of the cos/sin window. Defaults to 256.

    Example:
    ```python
    phi3lab.widgets.RopeView(model, seq_len=6000)    # beyond 4k: long factors
    phi3lab.widgets.RopeView(tr)                      # as applied in a trace
    ```
    """

    css_class = "phi3lab-rope"

    def __init__(self, model_or_trace, seq_len: int | None = None, *, max_positions: int = 256):
        self.spec, self.rope = _source(model_or_trace, seq_len)
        self.max_positions = check_in_range("max_positions", max_positions, 1, 1 << 31)
        limit = self.spec.max_sequence_length if self.spec is not None else self.rope.num_positions
        self.length_box = widgets.BoundedIntText(
            value=self.rope.num_positions,
            min=1,
            max=limit,
            description="Sequence length",
            disabled=self.spec is None,
            style={"description_width": "initial"},
        )
        self.length_box.add_class("phi3lab-seq-len")
        self.window_slider = window_slider("positions from", self.rope.num_positions, max_positions)
        self.summary = widgets.HTML()
        self.summary.add_class("phi3lab-summary")

        # === Figures ===
        self.frequencies = make_subplots(
            rows=1,
            cols=2,
            horizontal_spacing=0.1,
            subplot_titles=("inverse frequency (radians per token)", "wavelength (tokens per full turn)"),
        )
        self.frequencies.add_scatter(
            name="inverse frequency", mode="lines+markers", row=1, col=1, line=dict(color=_NONE), showlegend=False
        )
        self.frequencies.add_scatter(
            name="wavelength", mode="lines+markers", row=1, col=2, line=dict(color=_NONE), showlegend=False
        )
        for name, _, colour in self._reference_lines():
            self.frequencies.add_scatter(meta=name, mode="lines", line=dict(color=colour, dash="dash"), row=1, col=2)
        self.frequencies.update_yaxes(type="log", title="radians per token", row=1, col=1)
        self.frequencies.update_yaxes(type="log", title="tokens", row=1, col=2)
        self.frequencies.update_xaxes(title="dimension pair i (dims i, i + rotary_dim/2)")
        self.frequencies.update_layout(
            **base_layout("", height=400, width=1000, plot_bgcolor="white", margin=dict(l=70, r=20, t=90, b=60)),
            legend=dict(x=0.56, y=0.98, bgcolor="rgba(255,255,255,0.8)"),
        )
        self.factors = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.62, 0.38],
            horizontal_spacing=0.16,
            subplot_titles=("'su' factors per pair (each divides its frequency)", "context length (positions)"),
        )
        self.factors.add_bar(name="short factor", row=1, col=1, marker_color=_SHORT)
        self.factors.add_bar(name="long factor", row=1, col=1, marker_color=_LONG)
        self.factors.add_bar(
            name="positions",
            orientation="h",
            row=1,
            col=2,
            marker_color=[_NONE, _SHORT, _LONG],
            showlegend=False,
            texttemplate="%{x}",
            textposition="auto",
        )
        self.factors.update_xaxes(title="dimension pair", row=1, col=1)
        self.factors.update_yaxes(title="factor", row=1, col=1)
        self.factors.update_xaxes(title="positions (log)", type="log", row=1, col=2)
        self.factors.update_layout(
            **base_layout(
                "", height=380, width=1000, plot_bgcolor="white", barmode="group", margin=dict(l=70, r=20, t=90, b=60)
            ),
            legend=dict(x=0.01, y=0.98, bgcolor="rgba(255,255,255,0.8)"),
        )
        self.tables = make_subplots(
            rows=1, cols=2, subplot_titles=("cos", "sin"), shared_yaxes=True, horizontal_spacing=0.06
        )
        for col, name in ((1, "cos"), (2, "sin")):
            self.tables.add_heatmap(
                name=name,
                row=1,
                col=col,
                coloraxis="coloraxis",
                hovertemplate=f"position %{{y}}<br>dim %{{x}}<br>{name} %{{z:.4f}}<extra></extra>",
            )
            self.tables.update_xaxes(title="rotary head dimension", row=1, col=col)
        self.tables.update_yaxes(title="position", autorange="reversed", row=1, col=1)
        self.tables.update_layout(**base_layout("", height=460, width=1000, margin=dict(l=70, r=20, t=90, b=60)))

        self.length_box.observe(self._on_length, names="value")
        self.window_slider.observe(lambda _: self._refresh_tables(), names="value")
        self._refresh()
        self.frequencies, self.factors, self.tables = live(self.frequencies), live(self.factors), live(self.tables)
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.length_box, self.window_slider]),
                self.summary,
                self.frequencies,
                self.factors,
                self.tables,
            ]
        )
        self.widget.add_class(self.css_class)

    @property
    def positions(self) -> range:
        return window(self.window_slider.value, self.max_positions, self.rope.num_positions)

    def set_seq_len(self, seq_len: int) -> None:
        """Describe the rotary embedding for `seq_len` positions (model only)."""
        if self.spec is None:
            raise bad_argument("seq_len", seq_len, "unchanged: this view was built from a trace's fixed tables")
        self.length_box.value = check_in_range("seq_len", seq_len, 1, self.spec.max_sequence_length + 1)

    def _on_length(self, change) -> None:
        self.rope = describe_rotary(self.spec, change["new"])
        slider = self.window_slider
        slider.max = max(self.rope.num_positions - self.max_positions, 0)
        slider.layout.display = "none" if self.rope.num_positions <= self.max_positions else None
        self._refresh()

    def _reference_lines(self):
        return [
            ("this sequence", self.rope.num_positions, HIGHLIGHT),
            ("pretraining", self.rope.pretraining_sequence_length, "#333333"),
        ]

    def _colour(self) -> str:
        return {"short": _SHORT, "long": _LONG}.get(self.rope.factor_set, _NONE)

    def _summary_rows(self) -> list[tuple[str, str]]:
        rope = self.rope
        return [
            ("positions in use", f"{rope.num_positions}"),
            ("pretraining_sequence_length", f"{rope.pretraining_sequence_length}"),
            ("max_sequence_length", f"{rope.max_sequence_length}"),
            ("factors in force", f"{rope.factor_set}: {rope.reason}"),
            ("attention factor (scales cos/sin)", f"{rope.attention_factor:.6g}"),
            (
                "dimension pairs",
                (f"{len(rope.inverse_frequencies)} (rotary dims 0–{rope.rotary_dim - 1} of head_dim {rope.head_dim})"),
            ),
            (
                "pass-through dims (not rotated)",
                f"{rope.rotary_dim}–{rope.head_dim - 1}" if len(rope.pass_through_dims) else "none (full rotary)",
            ),
        ]

    def _refresh(self) -> None:
        rope, colour = self.rope, self._colour()
        pairs = np.arange(len(rope.inverse_frequencies))
        self.summary.value = (
            "<table>"
            + "".join(
                f"<tr><td style='padding:1px 8px'><b>{k}</b></td><td>{escape(v)}</td></tr>"
                for k, v in self._summary_rows()
            )
            + "</table>"
        )
        # Plain assignments, not `batch_update`: a batch that sets different
        # properties on different traces reaches plotly.js with the missing
        # ones as undefined, which resets them (colours fall back to defaults).
        for scatter, values in zip(self.frequencies.data, (rope.inverse_frequencies, rope.wavelengths)):
            scatter.update(x=pairs, y=values, line_color=colour)
        for scatter, (_, value, _) in zip(self.frequencies.data[2:], self._reference_lines()):
            scatter.update(x=[0, pairs[-1]], y=[value, value], name=f"{scatter.meta}: {value}")
        self.frequencies.layout.title.text = (
            f"Rotary frequencies in force ({rope.factor_set} factors) for {rope.num_positions} positions"
        )
        short, long, context = self.factors.data
        none = rope.short_factor is None
        short.update(
            x=pairs,
            y=rope.factors if none else rope.short_factor,
            name="factors (no scaling: all 1)" if none else "short factor",
            opacity=1.0 if rope.factor_set in ("short", "none") else 0.35,
        )
        long.update(
            x=pairs,
            y=np.full(len(pairs), np.nan) if none else rope.long_factor,
            opacity=1.0 if rope.factor_set == "long" else 0.35,
        )
        context.update(
            y=["max", "pretraining", "this sequence"],
            x=[rope.max_sequence_length, rope.pretraining_sequence_length, rope.num_positions],
            marker_color=["#bbbbbb", "#333333", colour],
        )
        self.factors.layout.title.text = (
            f"'su' factors: {rope.factor_set} in force · attention factor {rope.attention_factor:.4f}"
        )
        self._refresh_tables()

    def _refresh_tables(self) -> None:
        rope, positions = self.rope, self.positions
        scale = Scale(DIVERGING, -rope.attention_factor, rope.attention_factor)
        with self.tables.batch_update():
            for heat, table in zip(self.tables.data, (rope.cos, rope.sin)):
                heat.z = table[positions.start : positions.stop]
                heat.y = np.arange(positions.start, positions.stop)
                heat.x = np.arange(table.shape[1])
            self.tables.layout.coloraxis = dict(
                colorscale=scale.plotly()["colorscale"], cmin=scale.vmin, cmax=scale.vmax, colorbar=colorbar("value")
            )
            self.tables.layout.title.text = (
                f"cos/sin tables (× attention factor {rope.attention_factor:.4f}), "
                f"positions {positions.start}–{positions.stop - 1} of "
                f"{rope.num_positions}"
            )

    def _figures(self):
        return [self.frequencies, self.factors, self.tables]

    def _draw_static(self):
        rope, positions = self.rope, self.positions
        figure = new_figure(15, 8.5)
        axes = figure.subplots(2, 3)
        pairs = np.arange(len(rope.inverse_frequencies))
        colour = self._colour()
        for ax, values, title, unit in (
            (axes[0, 0], rope.inverse_frequencies, "inverse frequency per pair", "radians per token (log)"),
            (axes[0, 1], rope.wavelengths, "wavelength per pair", "tokens per turn (log)"),
        ):
            ax.plot(pairs, values, marker=".", color=colour)
            ax.set_yscale("log")
            mpl_labels(ax, title, "dimension pair", unit)
            ax.grid(alpha=0.3)
        for name, value, c in self._reference_lines():
            axes[0, 1].axhline(value, color=c, linestyle="--", label=f"{name}: {value}")
        axes[0, 1].legend(fontsize=8)
        ax = axes[0, 2]
        if rope.short_factor is None:
            ax.bar(pairs, rope.factors, color=_NONE, label="no scaling: all 1")
        else:
            for side, name, factors, colour_of in (
                (-1, "short", rope.short_factor, _SHORT),
                (1, "long", rope.long_factor, _LONG),
            ):
                alpha = 1.0 if rope.factor_set == name else 0.35
                ax.bar(pairs + side * 0.2, factors, 0.4, color=colour_of, label=name, alpha=alpha)
        mpl_labels(
            ax,
            f"factors: {rope.factor_set} in force · attention factor {rope.attention_factor:.4f}",
            "dimension pair",
            "factor (divides the frequency)",
        )
        ax.legend(fontsize=8)
        ax = axes[1, 0]
        names = ["max_sequence_length", "pretraining", "this sequence"]
        values = [rope.max_sequence_length, rope.pretraining_sequence_length, rope.num_positions]
        ax.barh(names, values, color=["#bbbbbb", "#333333", colour])
        ax.set_xscale("log")
        ax.set_xlabel("positions (log)")
        ax.set_title("context: this sequence vs pretraining", fontsize=10, loc="left")
        ax.text(
            0.98,
            0.5,
            rope.reason.replace(" > ", "\n> ").replace(" <= ", "\n<= "),
            transform=ax.transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
        scale = Scale(DIVERGING, -rope.attention_factor, rope.attention_factor)
        for ax, table, name in ((axes[1, 1], rope.cos, "cos"), (axes[1, 2], rope.sin, "sin")):
            mpl_heatmap(
                ax,
                table[positions.start : positions.stop],
                scale,
                title=f"{name}, positions {positions.start}–{positions.stop - 1}",
                xlabel="rotary head dimension",
                ylabel="position",
                colorbar="value",
                y_labels=[str(p) for p in positions],
                max_ticks=16,
            )
        figure.suptitle(f"Rotary embedding for {rope.num_positions} positions", fontsize=12)
        return figure

    def __repr__(self):
        return (
            f"RopeView(positions={self.rope.num_positions}, factors={self.rope.factor_set!r}, "
            f"attention_factor={self.rope.attention_factor:.4g})"
        )
