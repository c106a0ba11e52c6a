"""`TokenButtons`: the clickable tokens of an `AttentionExplorer`'s zoom window."""

from __future__ import annotations

from typing import Callable

import ipywidgets as widgets


class TokenButtons:
    """One button per query row of the zoom window, made as the zoom needs.

    Args:
        on_click: called with a button's index in the window when clicked.
    """

    def __init__(self, on_click: Callable[[int], None]):
        self.buttons: list[widgets.Button] = []
        self.widget = widgets.Box(layout=widgets.Layout(flex_flow="row wrap"))
        self._on_click = on_click

    def resize(self, count: int) -> None:
        """Show `count` buttons (making the missing ones)."""
        for i in range(len(self.buttons), count):
            button = widgets.Button(layout=widgets.Layout(width="auto", height="26px", padding="0 4px", margin="1px"))
            button.add_class("phi3lab-token")
            button.on_click(lambda _, i=i: self._on_click(i))
            self.buttons.append(button)
        self.widget.children = self.buttons
        for i, button in enumerate(self.buttons):
            button.layout.display = None if i < count else "none"

    def label(self, labels, positions: range, selected: int | None, generated_from: int | None) -> None:
        """Label the buttons with the tokens at `positions`, `selected` in
        orange, generated ones (from `generated_from`) with their class."""
        for button, p in zip(self.buttons, positions):
            generated = generated_from is not None and p >= generated_from
            button.description = labels[p]
            button.tooltip = f"position {p}" + (" (generated)" if generated else "")
            button.button_style = "warning" if p == selected else ""
            if generated:
                button.add_class("phi3lab-generated")
            else:
                button.remove_class("phi3lab-generated")
