"""Hook points that capture and intervene: the tracer's side of the protocol
in `phi3lab.model.hook_points`."""

from __future__ import annotations

import dataclasses

from phi3lab.model.hook_points import HookPoints
from phi3lab.tracing.interventions import Hook, HookContext
from phi3lab.tracing.names import block_name, split_name

ATTENTION_MAPS = ("attn.hook_attn_scores", "attn.hook_pattern")


@dataclasses.dataclass(frozen=True)
class TracePlan:
    """What a trace keeps and which hooks run where (static, hashable).

    Attributes:
        keep: names whose values are returned.
        hooked: name -> indices into the hook list, in order.
        num_layers: depth of the model.
    """

    keep: frozenset
    hooked: tuple  # ((name, (entry indices...)), ...)
    num_layers: int
    query_window: tuple | None = None  # (start, stop) rows of scores/pattern
    attention_heads: tuple | None = None  # query heads of scores/pattern kept

    def hooks_at(self, name: str) -> tuple:
        return dict(self.hooked).get(name, ())

    def layer_signature(self, layer: int):
        """Layers with equal signatures can share one scanned block. A layer
        with any hook gets its own range, so hooks see an int `ctx.layer`."""
        prefix = f"blocks.{layer}."
        if any(name.startswith(prefix) for name, _ in self.hooked):
            return ("hooked", layer)
        return frozenset(n[len(prefix):] for n in self.keep if n.startswith(prefix))

    def segments(self) -> list[tuple[int, int]]:
        ranges, start = [], 0
        for layer in range(1, self.num_layers + 1):
            if layer == self.num_layers or self.layer_signature(layer) != self.layer_signature(start):
                ranges.append((start, layer))
                start = layer
        return ranges


class TraceSites(HookPoints):
    """Runs the plan's hooks and records the kept values.

    Args:
        plan: the `TracePlan`.
        hooks: the `Hook`s the plan's indices refer to.
        data: each hook's (traced) data, in the same order.
        prefix_layer: None for model-level sites; for a block's sites, the
            first layer of its range (names resolve against it).
    """

    def __init__(self, plan: TracePlan, hooks: tuple[Hook, ...], data: tuple, prefix_layer: int | None = None):
        super().__init__()
        self.plan = plan
        self.hooks = hooks
        self.data = data
        self.prefix_layer = prefix_layer
        self.query_window = plan.query_window

    def _full(self, name: str) -> str:
        return name if self.prefix_layer is None else block_name(self.prefix_layer, name)

    def wants(self, name: str) -> bool:
        full = self._full(name)
        return full in self.plan.keep or bool(self.plan.hooks_at(full))

    def __call__(self, name: str, x):
        full = self._full(name)
        for index in self.plan.hooks_at(full):
            hook = self.hooks[index]
            layer, _ = split_name(full)
            result = hook.fn(x, HookContext(full, layer, self.data[index], hook.static))
            if result is not None:
                if result.shape != x.shape:
                    raise ValueError(
                        f"The hook on {full!r} returned shape {result.shape}; it must "
                        f"return the activation's shape {x.shape} (or None)."
                    )
                x = result.astype(x.dtype)
        if full in self.plan.keep:
            heads = self.plan.attention_heads
            if heads is not None and name in ATTENTION_MAPS:
                self.captured[name] = x[:, list(heads)]
            else:
                self.captured[name] = x
        return x

    def segments(self, num_layers: int) -> list[tuple[int, int]]:
        return self.plan.segments()

    def block(self, start: int) -> "TraceSites":
        # Every layer of a range shares the signature of its first layer, and
        # hooked layers are ranges of one, so names resolve against `start`.
        return TraceSites(self.plan, self.hooks, self.data, prefix_layer=start)
