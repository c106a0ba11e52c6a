"""`HeadThumbnails`: the small picture and "head n" button of every held
head in an `AttentionExplorer`."""

from __future__ import annotations

from typing import Callable

import ipywidgets as widgets


class HeadThumbnails:
    """A thumbnail image and a button per query head, in rows of four or, with
    `group_toggle` ticked, one row per key/value head (grouped-query attention).

    Args:
        heads: the query heads shown (none: the toggle is hidden).
        kv_head: query head -> the key/value head it reads.
        on_select: called with a head when its button is clicked.
        by_kv_head: bool. Start grouped by key/value head.
    """

    def __init__(
        self,
        heads: list[int],
        kv_head: Callable[[int], int],
        on_select: Callable[[int], None],
        by_kv_head: bool = False,
    ):
        self.heads, self.kv_head = heads, kv_head
        self.images, self.buttons, self.cells = [], [], []
        for h in heads:
            image = widgets.Image(format="png", layout=widgets.Layout(width="72px", height="72px"))
            button = widgets.Button(
                description=f"head {h}",
                tooltip=f"query head {h}, kv head {kv_head(h)}",
                layout=widgets.Layout(width="72px", height="24px", padding="0"),
            )
            button.add_class("phi3lab-thumbnail")
            button.on_click(lambda _, h=h: on_select(h))
            self.images.append(image)
            self.buttons.append(button)
            self.cells.append(widgets.VBox([image, button], layout=widgets.Layout(margin="2px")))
        self.widget = widgets.VBox()
        self.group_toggle = widgets.Checkbox(
            value=by_kv_head,
            description="group by kv head (GQA)",
            indent=False,
            layout=widgets.Layout(display=None if heads else "none"),
        )
        self.group_toggle.add_class("phi3lab-gqa")
        self.group_toggle.observe(lambda change: self.arrange(change.new), names="value")
        self.arrange(by_kv_head)

    def arrange(self, by_kv_head: bool) -> None:
        """Rows of four heads, or one row per key/value head."""
        if not self.cells:
            return
        cells = dict(zip(self.heads, self.cells))
        buttons = dict(zip(self.heads, self.buttons))
        if by_kv_head:
            rows = []
            for kv in sorted({self.kv_head(h) for h in self.heads}):
                members = [h for h in self.heads if self.kv_head(h) == kv]
                label = widgets.HTML(f"<b>kv {kv}</b>", layout=widgets.Layout(width="40px"))
                rows.append(widgets.HBox([label] + [cells[h] for h in members]))
                for h in members:
                    buttons[h].description = f"q{h}·kv{kv}"
            self.widget.children = rows
        else:
            columns = min(len(self.heads), 4)
            for h in self.heads:
                buttons[h].description = f"head {h}"
            self.widget.children = [
                widgets.HBox(self.cells[i : i + columns]) for i in range(0, len(self.heads), columns)
            ]

    def draw(self, png_of: Callable[[int], bytes]) -> None:
        """Set every head's image to `png_of(head)`."""
        for h, image in zip(self.heads, self.images):
            image.value = png_of(h)

    def mark(self, head: int) -> None:
        """Highlight the button of the selected head."""
        for h, button in zip(self.heads, self.buttons):
            button.button_style = "primary" if h == head else ""
