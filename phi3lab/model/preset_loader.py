"""The slot through which `Phi3Backbone.from_preset` reaches `phi3lab.presets`.

The model sits below the preset formats (they build and fill a
`Phi3Backbone`), so it never imports them. `phi3lab.presets` installs its
loader here when it is imported, which `import phi3lab` (and so any import
of `phi3lab.model`, whose parent package it is) always does first.
"""

from __future__ import annotations

from typing import Callable, NamedTuple


class PresetLoader(NamedTuple):
    """What the model asks of the preset package.

    Attributes:
        load: `load(cls, preset, load_weights=..., **overrides)` -> a built
            and filled `cls`.
        builtin_presets: `builtin_presets()` -> {name: description}.
    """

    load: Callable
    builtin_presets: Callable[[], dict]


_installed: PresetLoader | None = None


def install(loader: PresetLoader) -> None:
    """Make `loader` the one `from_preset` and `presets` use."""
    global _installed
    _installed = loader


def installed() -> PresetLoader:
    """The installed loader, or a clear error when `phi3lab.presets` was never imported."""
    if _installed is None:
        raise RuntimeError(
            "No preset loader is installed: `phi3lab.presets` installs it when imported, which "
            "`import phi3lab` does. Import phi3lab (or phi3lab.presets) before calling from_preset."
        )
    return _installed


class BuiltinPresets:
    """`Phi3Backbone.presets`: built-in preset names and their descriptions,
    read on the class or an instance from the installed loader."""

    def __get__(self, instance, owner) -> dict:
        return installed().builtin_presets()
