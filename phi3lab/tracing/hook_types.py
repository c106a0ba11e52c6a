"""What a hook is: `Hook` (a function, its data and static settings),
`HookContext` (what it is called with) and `Hooks` (an ordered collection
of (pattern, hook) pairs, combined with `|`).

A hook is `fn(x, ctx) -> x | None`: it receives the activation and a
`HookContext` and returns a replacement (or None to leave it unchanged).
`ctx.name` is the full hook name, `ctx.layer` the block index (an int, or
None for model-level names), `ctx.data` the hook's array data and
`ctx.seen` the values of the sites hooked earlier in the same run (a
transcoder's hook on `hook_mlp_out` reads its `ln2.hook_normalized` there).

Array data (patch sources, steering vectors) travels into the compiled
function as an input, so new values never recompile; `fn` and the hashable
`static` settings are part of the compiled program, so define hook functions
once (not a new lambda per call) to reuse compilations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterable


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook function knows about the site it runs at."""

    name: str
    layer: int | None
    data: Any = None
    static: tuple = ()
    seen: Mapping = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Hook:
    """A hook function with its array `data` and hashable `static` settings.

    Args:
        fn: `fn(x, ctx) -> x | None`.
        data: a pytree of arrays given to `fn` as `ctx.data` (a compiled
            input, not a constant).
        static: hashable settings given as `ctx.static` (part of the
            compiled program).
        check: optional `check(model)` run before compiling, to reject bad
            settings with a clear error.
    """

    fn: Callable
    data: Any = None
    static: tuple = ()
    check: Callable | None = None


class Hooks:
    """An ordered list of `(name_or_pattern, Hook)`; combine with `|`.

    Two hooks on the same site both run, in order.

    Example:
    >>> hooks = Hooks({"blocks.0.hook_resid_post": lambda x, ctx: x * 0})
    >>> hooks = hooks | ablate_heads(1, [0])
    """

    def __init__(self, entries: Iterable | dict = ()):
        if isinstance(entries, Mapping):
            entries = entries.items()
        elif isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
            raise TypeError(
                "`hooks` must be a mapping {name_or_pattern: fn(x, ctx) -> x} or a phi3lab.hooks "
                f"intervention; received hooks={entries!r} of type {type(entries).__name__}."
            )
        pairs = []
        for entry in entries:
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise TypeError(
                    "`hooks` must be a mapping {name_or_pattern: fn(x, ctx) -> x} or (name, fn) "
                    f"pairs; received the entry {entry!r}."
                )
            pairs.append((entry[0], _as_hook(entry[0], entry[1])))
        self.entries: tuple[tuple[str, Hook], ...] = tuple(pairs)

    def __or__(self, other) -> "Hooks":
        other = other if isinstance(other, Hooks) else Hooks(other)
        return Hooks(self.entries + other.entries)

    def __ror__(self, other) -> "Hooks":
        return Hooks(other) | self

    def __len__(self):
        return len(self.entries)

    def __repr__(self):
        inner = ", ".join(f"{p!r}: {h.fn.__name__}{h.static or ''}" for p, h in self.entries)
        return f"Hooks({{{inner}}})"


def _as_hook(pattern, hook) -> Hook:
    if not isinstance(pattern, str):
        raise TypeError(f"`hooks` keys must be hook names or patterns; received {pattern!r}.")
    if isinstance(hook, Hook):
        return hook
    if callable(hook):
        return Hook(hook)
    raise TypeError(
        f"`hooks[{pattern!r}]` must be a function fn(x, ctx) -> x or a phi3lab.hooks.Hook; received {hook!r}."
    )


# === Ready-made interventions ===
