"""The explorer's overview of a long head: block maxima under a draggable
zoom-window box, with its title."""

from __future__ import annotations

from typing import Callable

import ipywidgets as widgets
import numpy as np

from phi3lab.widgets.attention_marks import OVERVIEW_CELLS, overview_image
from phi3lab.widgets.common import Scale, png, pool_factor
from phi3lab.widgets.zoom_box import ZoomBox


class Overview:
    """The overview widgets of `AttentionExplorer`.

    Args:
        on_drag: called with `(query_start, key_start)` when the box is
            dragged or the overview clicked in the browser.
    """

    def __init__(self, on_drag: Callable[[int, int], None]):
        self.box = ZoomBox()
        self.title = widgets.HTML()
        self.widget = widgets.VBox([self.title, self.box])
        self.widget.add_class("phi3lab-overview")
        self.box.observe(lambda change: on_drag(*change["new"][:2]), names="window")

    def draw(self, held: np.ndarray, scale: Scale, first_row: int, queries: range, keys: range, head: int) -> None:
        """Show `held [rows, T]` (rows from `first_row`) with the window box on
        `queries` x `keys`."""
        rows, length = held.shape
        fr, fc = pool_factor(rows, OVERVIEW_CELLS), pool_factor(length, OVERVIEW_CELLS)
        with self.box.hold_sync():
            self.box.image = png(overview_image(held, scale, first_row, queries, keys, boxed=False))
            self.box.extent = [first_row, rows, length, -(-rows // fr) * fr, -(-length // fc) * fc]
            self.box.window = [queries.start, keys.start, len(queries), len(keys)]
        self.title.value = f"<b>Overview</b> of head {head}: {rows} × {length} (block maxima; drag the box to zoom)"
