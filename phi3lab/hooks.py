"""Interventions that run inside a compiled trace: `phi3lab.hooks`.

A hook is `fn(x, ctx) -> x | None`; the ready-made ones below return `Hooks`,
which combine with `|`:

    hooks = phi3lab.hooks.ablate_heads(0, [1, 2]) | phi3lab.hooks.add("blocks.3.hook_resid_post", v)

The implementation lives in `phi3lab.tracing.hook_types` and
`phi3lab.tracing.interventions`.
"""

from phi3lab.tracing.hook_types import Hook, HookContext, Hooks
from phi3lab.tracing.interventions import (
    ablate_heads,
    add,
    key_value_head_of,
    patch,
    query_heads_sharing,
)

__all__ = [
    "Hook",
    "HookContext",
    "Hooks",
    "ablate_heads",
    "add",
    "key_value_head_of",
    "patch",
    "query_heads_sharing",
]
