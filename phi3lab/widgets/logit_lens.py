"""`LogitLensView`: what each layer would predict if it were the last."""

from __future__ import annotations

import re

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from phi3lab.analysis.lens import WHERE, answer_curve, logit_lens
from phi3lab.checks import check_in_range, check_index
from phi3lab.deprecation import warn_deprecated
from phi3lab.errors import bad_argument
from phi3lab.generation.result import Generation
from phi3lab.tracing.names import block_name
from phi3lab.tracing.result import Trace
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
    new_figure,
    position_labels,
    vocabulary_labeler,
    window,
    window_slider,
)


def _rank_ticks(vocabulary_size: int) -> list[int]:
    """1, 2, 5, 10, ... up to the vocabulary size (powers of 10 for large ones)."""
    ticks = [m * 10**e for e in range(len(str(vocabulary_size))) for m in (1, 2, 5)]
    ticks = [t for t in ticks if t <= vocabulary_size]
    return ticks if len(ticks) <= 10 else [t for t in ticks if str(t).startswith("1")]


def _from_frame(frame, rows, length: int, k: int):
    """The same arrays from a `phi3lab.analysis.logit_lens` DataFrame."""
    ids = np.zeros((len(rows), length, k), np.int64)
    probs = np.full((len(rows), length, k), np.nan, np.float32)
    index = {row: r for r, row in enumerate(rows)}
    for layer, where, position, top_ids, top_probs in frame[
        ["layer", "where", "position", "top_tokens", "top_probs"]
    ].itertuples(index=False):
        r = index.get((int(layer), where))
        if r is not None:
            ids[r, position], probs[r, position] = top_ids[:k], top_probs[:k]
    return ids, probs


class LogitLensView(PositionWindow, View):
    """The logit lens: every residual stream decoded as the final one.

    A grid of layers (y) by positions (x): each cell names the most likely
    next token read from that residual stream through the model's own final
    norm and LM head, coloured by its probability; hover a cell for the
    top-`k`. Pick a position (slider or click) and an answer token to follow
    its probability and rank through the layers.

    Args:
        model: the `Phi3Backbone` that produced `trace`.
        trace: a `phi3lab.Trace` holding `blocks.*.hook_resid_{where}` (or
            what `phi3lab.generate` returns for one prompt). The old order
            `LogitLensView(trace, model)` still works for one release, with
            a `DeprecationWarning`.
        tokenizer: a `Phi3Tokenizer`, a list of token strings, or None (ids).
        k: int. Tokens listed per cell. Defaults to 5.
        batch: int. Which row of the trace. Defaults to 0.
        where: which streams per layer, any of "pre", "mid", "post". "post".
        position: int. Initially picked position (default: the last real one).
        answer: token id or string to follow (default: the final prediction).
        max_tokens: int. Widest window of positions sent. Defaults to 48.
        lens: optional DataFrame from `phi3lab.analysis.logit_lens` (same
            `k`, `where`, `batch`) to reuse; by default the view calls it.
            The view computes no logits of its own: the grid comes from
            `analysis.logit_lens`, the answer curve from `analysis.answer_curve`.
        tokens: optional display strings of the input, one per position.

    Example:
    ```python
    view = phi3lab.widgets.LogitLensView(model, tr, tok, answer=" Paris")
    view.answer_curve()      # probabilities and ranks through the layers
    ```
    """

    css_class = "phi3lab-logit-lens"

    def __init__(
        self,
        model,
        trace,
        tokenizer=None,
        *,
        k: int = 5,
        batch: int = 0,
        where="post",
        position: int | None = None,
        answer=None,
        max_tokens: int = 48,
        lens=None,
        tokens=None,
    ):
        if isinstance(model, (Trace, Generation)):
            warn_deprecated("LogitLensView(trace, model, ...)", "LogitLensView(model, trace, ...)")
            model, trace = trace, model
        self.trace, self.model = trace, model = as_trace(trace), model
        self.batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        self.k = check_in_range("k", k, 1, model.vocabulary_size + 1)
        self.where = (where,) if isinstance(where, str) else tuple(where)
        if not self.where or any(w not in WHERE for w in self.where):
            raise bad_argument("where", where, 'any of "pre", "mid", "post"')
        self.max_tokens = check_in_range("max_tokens", max_tokens, 1, 1 << 31)
        self.length = trace.token_ids.shape[1]
        self.rows = [(layer, w) for layer in range(trace.num_layers) for w in self.where]
        self.row_labels = [f"{layer} {w}" for layer, w in self.rows]
        missing = [
            block_name(l, f"hook_resid_{w}") for l, w in self.rows if block_name(l, f"hook_resid_{w}") not in trace
        ]
        if missing:
            raise KeyError(
                f"LogitLensView needs {missing[0]!r}, which the trace did not capture. Capture it with "
                "phi3lab.trace(model, ids, names=['blocks.*.hook_resid_*']) (or names=None)."
            )
        self.labels = position_labels(trace, self.batch, tokens)
        self.vocab = vocabulary_labeler(tokenizer)
        self.tokenizer = tokenizer
        if lens is None:
            lens = logit_lens(model, trace, k=self.k, where=list(self.where), batch=self.batch)
        self.top_ids, self.top_probs = _from_frame(lens, self.rows, self.length, self.k)
        if position is None:
            position = int(np.flatnonzero(trace.padding_mask[self.batch])[-1])
        position = check_index("position", position, self.length, "position")

        # === Controls ===
        self.position_slider = widgets.IntSlider(
            value=position, min=0, max=self.length - 1, description="Position", continuous_update=False
        )
        self.window_slider = window_slider("positions from", self.length, max_tokens, start=position - max_tokens + 1)
        self.answer_box = widgets.Combobox(
            description="Answer token",
            placeholder="token, or #id",
            ensure_option=False,
            style={"description_width": "initial"},
        )
        self.answer_box.add_class("phi3lab-answer")
        self.message = widgets.HTML()

        # === Figures ===
        self.grid = go.Figure(
            go.Heatmap(texttemplate="%{text}", textfont=dict(size=10), colorbar=colorbar("top-1 probability"))
        )
        self.grid.update_layout(**base_layout("", height=max(320, 28 * len(self.rows) + 140)))
        self.grid.update_xaxes(title="position (input token)", type="category", tickangle=-90)
        self.grid.update_yaxes(title="layer, residual stream", type="category", autorange="reversed")
        self.curve = make_subplots(specs=[[{"secondary_y": True}]])
        self.curve.add_scatter(name="probability", mode="lines+markers", x=self.row_labels, secondary_y=False)
        self.curve.add_scatter(
            name="rank (1 = top)", mode="lines+markers", x=self.row_labels, secondary_y=True, line=dict(dash="dot")
        )
        self.curve.update_layout(**base_layout("", height=340, plot_bgcolor="white"))
        self.curve.update_xaxes(title="layer, residual stream", type="category")
        self.curve.update_yaxes(title="probability", range=[0, 1], secondary_y=False)
        self.curve.update_yaxes(
            title="rank (log, 1 = top)",
            type="log",
            secondary_y=True,
            range=[np.log10(model.vocabulary_size) + 0.05, -0.05],
            tickvals=_rank_ticks(model.vocabulary_size),
        )

        self.position_slider.observe(lambda _: self._refresh_position(), names="value")
        self.window_slider.observe(lambda _: self._refresh_grid(), names="value")
        self.answer_box.observe(self._on_answer_text, names="value")
        self.answer = int(self.top_ids[-1, position, 0]) if answer is None else self.parse_token(answer)
        self._refresh_grid()
        self._refresh_position()
        self.answer_box.value = self.token_label(self.answer)
        self.grid, self.curve = live(self.grid, self._on_cell_click), live(self.curve)
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.position_slider, self.window_slider]),
                self.grid,
                widgets.HBox([self.answer_box, self.message]),
                self.curve,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.widget.add_class(self.css_class)

    # === State ===
    def token_label(self, token_id: int) -> str:
        """`"text #17"` (just `"#17"` without a tokenizer)."""
        text, number = self.vocab(token_id), f"#{int(token_id)}"
        return number if text == number else f"{text} {number}"

    def parse_token(self, answer) -> int:
        """A token id from an id, `"#17"`, `"text #17"` or a token string."""
        vocabulary = self.model.vocabulary_size
        if isinstance(answer, (int, np.integer)) and not isinstance(answer, bool):
            return check_in_range("answer", answer, 0, vocabulary)
        if isinstance(answer, str):
            match = re.search(r"#(\d+)$", answer.strip())
            if match:
                return check_in_range("answer", int(match.group(1)), 0, vocabulary)
            if isinstance(self.tokenizer, (list, tuple)) and answer in self.tokenizer:
                return self.tokenizer.index(answer)
            if hasattr(self.tokenizer, "token_to_id"):
                try:
                    return check_in_range("answer", int(self.tokenizer.token_to_id(answer)), 0, vocabulary)
                except (KeyError, ValueError):
                    pass
        raise bad_argument("answer", answer, f"a token id in [0, {vocabulary}), '#id', or a token of the tokenizer")

    def set_answer(self, answer) -> None:
        """Follow token `answer` (id or string) through the layers."""
        self.answer = self.parse_token(answer)
        self.answer_box.value = self.token_label(self.answer)
        self._refresh_curve()

    def answer_curve(self, answer=None, position: int | None = None):
        """Probability `[R]` and rank `[R]` (1 = most likely) of `answer` at
        `position`, for every row (layer, stream) of the lens."""
        answer = self.answer if answer is None else self.parse_token(answer)
        position = self.position if position is None else check_index("position", position, self.length, "position")
        curve = answer_curve(self.model, self.trace, answer, position=position, where=self.where, batch=self.batch)
        return curve["probability"].to_numpy(), curve["rank"].to_numpy()

    # === Rendering ===
    def _on_cell_click(self, trace, points, state):
        if points.xs:
            self.position_slider.value = int(str(points.xs[0]).split(" ", 1)[0])

    def _on_answer_text(self, change) -> None:
        if not change["new"] or change["new"] == self.token_label(self.answer):
            return
        try:
            self.set_answer(change["new"])
        except ValueError as error:
            self.message.value = f"<span style='color:#b00'>{escape(str(error))}</span>"

    def _cell_texts(self, positions: range):
        top1 = [[escape(self.vocab(self.top_ids[r, p, 0])) for p in positions] for r in range(len(self.rows))]
        hover = [
            [
                "<br>".join(
                    f"{escape(self.vocab(i))} #{i}: {q:.3f}" for i, q in zip(self.top_ids[r, p], self.top_probs[r, p])
                )
                for p in positions
            ]
            for r in range(len(self.rows))
        ]
        return top1, hover

    def _refresh_grid(self) -> None:
        positions = self.positions
        top1, hover = self._cell_texts(positions)
        with self.grid.batch_update():
            heat = self.grid.data[0]
            heat.z = self.top_probs[:, positions.start : positions.stop, 0]
            heat.x = axis_labels(self.labels, positions)
            heat.y = self.row_labels
            heat.text = top1
            heat.hovertext = hover
            heat.hovertemplate = "layer %{y}, position %{x}<br>top tokens:<br>%{hovertext}<extra></extra>"
            heat.update(**Scale.probability().plotly())
            self.grid.layout.title.text = "Logit lens: top next-token prediction of each residual stream"
        self._refresh_highlight()

    def _refresh_highlight(self) -> None:
        self.grid.layout.shapes = column_highlight(self.positions, self.position)

    def _refresh_position(self) -> None:
        p = self.position
        if p not in self.positions:
            self.window_slider.value = window(p - self.max_tokens + 1, self.max_tokens, self.length).start
        candidates = dict.fromkeys(int(i) for i in self.top_ids[::-1, p, :].ravel())
        self.answer_box.options = [self.token_label(i) for i in candidates]
        self._refresh_highlight()
        self._refresh_curve()

    def _refresh_curve(self) -> None:
        probs, ranks = self.answer_curve()
        with self.curve.batch_update():
            self.curve.data[0].y = probs
            self.curve.data[1].y = ranks
            self.curve.layout.title.text = (
                f"Answer {escape(self.token_label(self.answer))} at position "
                f"{self.position} ({escape(self.labels[self.position])}) through the layers"
            )
        self.message.value = f"final probability {probs[-1]:.3f}, rank {ranks[-1]} of {self.model.vocabulary_size}"

    def _figures(self):
        return [self.grid, self.curve]

    def _draw_static(self):
        positions = self.positions
        figure = new_figure(14, max(4.5, 0.32 * len(self.rows) + 2.5))
        left, right = figure.subplots(1, 2, width_ratios=[3, 1.4])
        mpl_heatmap(
            left,
            self.top_probs[:, positions.start : positions.stop, 0],
            Scale.probability(),
            title="Logit lens: top next-token prediction of each residual stream",
            xlabel="position (input token)",
            ylabel="layer, residual stream",
            colorbar="top-1 probability",
            x_labels=[f"{p} {self.labels[p]}" for p in positions],
            y_labels=self.row_labels,
        )
        if len(positions) <= 48 and len(self.rows) <= 48:
            for r in range(len(self.rows)):
                for column, p in enumerate(positions):
                    q = self.top_probs[r, p, 0]
                    left.text(
                        column,
                        r,
                        self.vocab(self.top_ids[r, p, 0])[:8],
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if q > 0.6 else "black",
                    )
        if self.position in positions:
            left.axvline(self.position - positions.start, color=HIGHLIGHT, linewidth=2)
        probs, ranks = self.answer_curve()
        right.plot(self.row_labels, probs, marker="o", label="probability")
        right.set_ylim(0, 1)
        right.set_ylabel("probability")
        right.set_xlabel("layer, residual stream")
        right.tick_params(axis="x", rotation=90, labelsize=7)
        twin = right.twinx()
        twin.plot(self.row_labels, ranks, marker="s", linestyle=":", color="#d62728", label="rank")
        twin.set_yscale("log")
        twin.set_ylim(self.model.vocabulary_size * 1.1, 0.9)  # rank 1 at the top, as in the widget
        ticks = _rank_ticks(self.model.vocabulary_size)
        twin.set_yticks(ticks, [str(t) for t in ticks])
        twin.minorticks_off()
        twin.set_ylabel("rank (log, 1 = top)")
        right.set_title(f"Answer {self.token_label(self.answer)} at position {self.position}", fontsize=10, loc="left")
        right.legend(handles=right.get_lines() + twin.get_lines(), fontsize=8, loc="center left")
        return figure

    def __repr__(self):
        return (
            f"LogitLensView(rows={len(self.rows)}, positions={self.length}, position={self.position}, "
            f"answer={self.answer}, k={self.k})"
        )
