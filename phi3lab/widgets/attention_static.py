"""The static picture of an `AttentionExplorer`: the zoom window as a
heatmap beside every head's thumbnail, drawn with matplotlib."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from phi3lab.widgets.common import GENERATED, HIGHLIGHT, mpl_heatmap, new_figure, pool_max


def draw_explorer(view) -> Figure:
    """`view` (an `AttentionExplorer`) as it is displayed now."""
    heads = len(view.heads)
    columns = view.group_size if view.group_toggle.value else min(heads, 4)
    rows = -(-heads // columns)
    figure = new_figure(14, max(6.5, 1.2 * rows + 1))
    outer = figure.add_gridspec(1, 2, width_ratios=[3, 2])
    q, k = view.query_window, view.key_window
    ax = figure.add_subplot(outer[0])
    values = view.window_values()
    mpl_heatmap(
        ax,
        values,
        view.scale(),
        title=view.title(),
        xlabel="key (position token)",
        ylabel="query (position token)",
        colorbar=view.colorbar_title(),
        x_labels=[f"{p} {view.labels[p]}" for p in k],
        y_labels=[f"{p} {view.labels[p]}" for p in q],
    )
    if view.selected is not None:
        if view.selected in q:
            ax.add_patch(
                Rectangle(
                    (-0.5, view.selected - q.start - 0.5), len(k), 1, fill=False, edgecolor=HIGHLIGHT, linewidth=2
                )
            )
        if view.selected in k:
            ax.add_patch(
                Rectangle(
                    (view.selected - k.start - 0.5, -0.5), 1, len(q), fill=False, edgecolor=HIGHLIGHT, linewidth=2
                )
            )
    if view.prompt_length is not None and view.prompt_length in k:
        ax.axvline(view.prompt_length - k.start - 0.5, color=GENERATED, linestyle="--", linewidth=1.5)
    grid = outer[1].subgridspec(rows, columns)
    for index, h in enumerate(view.heads):
        thumb = figure.add_subplot(grid[index // columns, index % columns])
        full = view.head_values(view.layer, h)
        thumb.imshow(
            np.ma.masked_invalid(pool_max(full, view.thumbnail_size)),
            interpolation="nearest",
            aspect="auto",
            **view.scale(full).matplotlib(),
        )
        thumb.set_xticks([])
        thumb.set_yticks([])
        thumb.set_title(f"head {h} (kv {view.kv_head(h)})", fontsize=8, color=HIGHLIGHT if h == view.head else "black")
        if h == view.head:
            for spine in thumb.spines.values():
                spine.set_edgecolor(HIGHLIGHT)
                spine.set_linewidth(2.5)
    missing = view.missing()
    figure.suptitle(
        f"Layer {view.layer}: {heads} query heads (block maxima), selected head on the left"
        + (f"\n{missing}" if missing else ""),
        fontsize=11,
        x=0.99,
        ha="right",
    )
    return figure
