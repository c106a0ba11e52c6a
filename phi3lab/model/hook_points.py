"""The hook-point protocol that the layers call, and its no-op default.

Every layer reports its intermediate values through a `HookPoints` object:
`x = sites("attn.hook_q", x)`. The plain forward passes `NO_HOOKS`, whose call
returns `x` unchanged, so under `jit` a hook point costs nothing. The tracing
package implements the same protocol to capture and change activations.
Names passed to a block's sites are local to the block (`"attn.hook_q"`);
the tracer adds the `blocks.{layer}.` prefix.
"""

from __future__ import annotations


class HookPoints:
    """Hook points that neither read nor change anything (the plain forward).

    The protocol:
      * `sites(name, x) -> x`: report `x` at hook point `name`, get back the
        value to use downstream.
      * `sites.wants(name) -> bool`: whether anything reads or changes `name`
        (lets a layer skip work nobody asked for).
      * `sites.segments(num_layers)`: consecutive layer ranges `(start,
        stop)` whose hook points behave alike, so each range can run as one
        `lax.scan` over stacked weights. A range of several layers neither
        captures nor hooks: layers that do run alone, so their captures
        leave the program as arrays of their own.
      * `sites.query_window`: None, or `(start, stop)` query rows that the
        attention scores/pattern sites report (long inputs).
      * `sites.block(start)`: the hook points of a decoder block in the
        range that starts at layer `start` (every layer of a range behaves
        alike).
      * `sites.captured`: the values captured so far, by full hook name
        (`"blocks.3.attn.hook_z"`), one dict shared by the model-level
        sites and every block's.
    """

    # Query rows `(start, stop)` that attention scores/pattern report, or
    # None for all rows.
    query_window = None

    def __init__(self):
        self.captured: dict = {}

    def __call__(self, name: str, x):
        return x

    def wants(self, name: str) -> bool:
        return False

    def segments(self, num_layers: int) -> list[tuple[int, int]]:
        return [(0, num_layers)]

    def block(self, start: int) -> "HookPoints":
        return self


NO_HOOKS = HookPoints()
