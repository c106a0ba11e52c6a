"""The pieces of `AttentionExplorer`'s pictures: the heatmap with outlines of
the selected token and dashed marks where generation starts, the boxed
overview, the token strips coloured by attention, and the status line."""

from __future__ import annotations

import matplotlib
import numpy as np
import plotly.graph_objects as go

from phi3lab.widgets.common import (
    GENERATED,
    HIGHLIGHT,
    Scale,
    base_layout,
    colorbar,
    escape,
    highlight_box,
    pool_factor,
    pool_max,
)


def heatmap_figure() -> go.Figure:
    """The empty heatmap of one head: keys on x, queries on y (top down),
    both labelled by position and token."""
    figure = go.Figure(go.Heatmap(hoverongaps=False, colorbar=colorbar("")))
    figure.update_layout(**base_layout("", height=600, margin=dict(l=110, r=30, t=50, b=110)))
    figure.update_yaxes(autorange="reversed", title="query (position token)", type="category", tickfont=dict(size=11))
    figure.update_xaxes(title="key (position token)", type="category", tickangle=-90, tickfont=dict(size=11))
    return figure


def heatmap_shapes(queries: range, keys: range, selected: int | None, boundary: int | None) -> list[dict]:
    """Plotly shapes of the heatmap over `queries` x `keys`: the row and
    column of position `selected` outlined, a dashed line before position
    `boundary` (where generation starts) on each axis it falls inside."""
    shapes = []
    if selected in queries:
        shapes.append(highlight_box(range(len(keys)), range(selected - queries.start, selected - queries.start + 1)))
    if selected in keys:
        shapes.append(highlight_box(range(selected - keys.start, selected - keys.start + 1), range(len(queries))))
    if boundary is not None:
        for axis, positions in (("x", keys), ("y", queries)):
            if boundary in positions and boundary > positions.start:
                shapes.append(_dashed_line(axis, boundary - positions.start - 0.5))
    return shapes


def _dashed_line(axis: str, at: float) -> dict:
    """A dashed line across the plot at category coordinate `at` of `axis`."""
    across = "y" if axis == "x" else "x"
    return {
        "type": "line",
        f"{axis}ref": axis,
        f"{across}ref": "paper",
        f"{axis}0": at,
        f"{axis}1": at,
        f"{across}0": 0,
        f"{across}1": 1,
        "line": dict(color=GENERATED, width=2, dash="dash"),
    }


OVERVIEW_CELLS = 96  # at most this many block-maxima cells a side


def overview_image(
    held: np.ndarray, scale: Scale, first_row: int, queries: range, keys: range, boxed: bool = True
) -> np.ndarray:
    """uint8 RGB block maxima of `held [rows, T]` (rows from `first_row`; at
    most 96 cells a side, each drawn `288 // cells` pixels wide), with the
    `queries` x `keys` window boxed (unless `boxed` is False)."""
    pooled = pool_max(held, OVERVIEW_CELLS)
    fr, fc = pool_factor(held.shape[0], OVERVIEW_CELLS), pool_factor(held.shape[1], OVERVIEW_CELLS)
    pixels = max(1, 288 // max(pooled.shape))
    image = np.repeat(np.repeat(scale.rgb(pooled), pixels, 0), pixels, 1)
    if not boxed:
        return image
    top = (queries.start - first_row) // fr * pixels
    bottom = min(image.shape[0], -(-(queries.stop - first_row) // fr) * pixels) - 1
    left, right = keys.start // fc * pixels, min(image.shape[1], -(-keys.stop // fc) * pixels) - 1
    box = np.round(np.array(matplotlib.colors.to_rgb(HIGHLIGHT)) * 255).astype(np.uint8)
    image[top : bottom + 1, [left, right]] = box
    image[[top, bottom], left : right + 1] = box
    return image


def token_strip(
    title: str, labels, positions: range, weights: np.ndarray, selected: int | None, generated_from: int | None
) -> str:
    """HTML: the tokens at `positions` coloured by `weights[positions]`
    (0 to their largest), `selected` outlined, generated tokens (from
    position `generated_from`) with dashed borders."""
    shown = weights[positions.start : positions.stop]
    scale = Scale.magnitude(shown)
    spans = []
    for p, w in zip(positions, shown):
        background, text = scale.css(w)
        if p == selected:
            border = f"2px solid {HIGHLIGHT}"
        elif generated_from is not None and p >= generated_from:
            border = f"1px dashed {GENERATED}"
        else:
            border = "1px solid #ccc"
        spans.append(
            f'<span class="phi3lab-weight" data-position="{p}" data-weight="{w:.6g}" '
            f'title="position {p}: {w:.4f}" style="background:{background};color:{text};'
            f"border:{border};padding:1px 3px;margin:1px;display:inline-block;"
            f'font-family:monospace">{escape(labels[p])}</span>'
        )
    return (
        f"<div style='margin:4px 0'>{title} <small>(colour: probability, 0 to {scale.vmax:.3g})</small>"
        f"<div style='line-height:1.9'>{''.join(spans)}</div></div>"
    )


def selection_strips(
    labels,
    held: np.ndarray,
    selected: int,
    held_rows: range,
    queries: range,
    keys: range,
    generated_from: int | None,
    missing: str,
) -> str:
    """HTML: what `selected` attends to over `keys` (its row of `held`, the
    pattern over `held_rows`) and what attends to it over `queries`."""
    offset = held_rows.start
    name = f"<b>{escape(labels[selected])}</b> (position {selected})"
    if selected in held_rows:
        rows = [(f"{name} attends to →", keys, held[selected - offset])]
    else:
        rows = [(f"{name}: its row was not captured ({missing})", range(0), np.zeros(0))]
    rows.append((f"← attended to by (column {selected})", queries, np.pad(held[:, selected], (offset, 0))))
    return "".join(
        token_strip(title, labels, positions, weights, selected, generated_from) for title, positions, weights in rows
    )


def status_line(text: str, labels, selected: int | None, generated_from: int | None, missing: str) -> str:
    """HTML of the status line: `text`, then the prompt / generated split,
    the selected token and what a windowed trace does not hold."""
    if generated_from is not None:
        text += f" · prompt 0–{generated_from - 1}, generated from {generated_from}"
    if selected is not None:
        text += f" · selected {selected} {escape(labels[selected])!s}"
    if missing:
        text += f"<br><span class='phi3lab-missing'>Windowed trace: {escape(missing)}.</span>"
    return f"<span class='phi3lab-status-text'>{text}</span>"
