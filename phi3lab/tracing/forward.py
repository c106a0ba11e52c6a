"""The one forward entry: a pure function of weights, inputs and hook data.

`forward_fn(model, names=..., hooks=...)` returns a `ForwardFn`, a pure
function `fn(params, token_ids, padding_mask, hook_data)` that runs the model
with the requested captures and hooks. It is what `trace` compiles, what the
analysis sweeps `vmap`, and what users give to `jax.jit`, `jax.grad`,
`jax.jvp` or `jax.vmap`: hook data (steering vectors, patch sources, scales,
masks) are ordinary inputs, so they may be tracers.

Example:
```python
fn = phi3lab.tracing.forward_fn(model, names="blocks.1.hook_resid_post",
                                hooks=phi3lab.hooks.add("blocks.0.hook_resid_post", vector))
out = jax.jit(fn)(model.params(), ids, mask, fn.hook_data)
out.captures["blocks.1.hook_resid_post"]            # [B, T, D]
grad = jax.grad(lambda data: fn(model.params(), ids, mask, data).logits[0, -1, 7])(fn.hook_data)
```
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.names import Selection, all_names, select
from phi3lab.tracing.sites import TracePlan, TraceSites


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """What one forward returns; a JAX pytree (leaves: `hidden` and the
    captured arrays), so jitted and vmapped functions may return it.

    Attributes:
        hidden: the final normalized hidden states `[B, T, D]`.
        captures: captured name -> array, in the shapes of the hook-name
            catalogue (`phi3lab.tracing.names`).
        logits: `hook_logits` `[B, T, V]` when it was captured, else None.
    """

    hidden: Any
    captures: dict

    @property
    def logits(self):
        return self.captures.get("hook_logits")


@dataclasses.dataclass(frozen=True, eq=False)
class ForwardFn:
    """A pure forward of `model` with a fixed capture plan and hook functions.

    Call it as `fn(params, token_ids, padding_mask=None, hook_data=None)`;
    `hook_data` is a tuple with one entry per hook (in `hooks` order), the
    default being the data the hooks were made with (`fn.hook_data`).

    Attributes:
        model: the `Phi3Backbone`.
        plan: the static `TracePlan` (captures, hooked sites, windows).
        hooks: the `Hook`s the plan refers to.
        hook_data: each hook's data as given (a tuple).
    """

    model: Any
    plan: TracePlan
    hooks: tuple[Hook, ...]
    hook_data: tuple

    def program_key(self) -> tuple:
        """What a compiled program of this forward depends on besides its
        inputs: the plan and each hook's function and static settings (not
        its data, which are inputs), for `phi3lab.runtime.compile_cache` keys."""
        return (self.plan, tuple((hook.fn, hook.static) for hook in self.hooks))

    def run(self, params, token_ids, padding_mask=None, hook_data=None, num_positions=None, length=None, **cached):
        """The raw result `(hidden, captures)`, the captures by full hook
        name. `num_positions` (static) picks the rotary
        factors of inputs padded past their real length (see
        `Phi3Backbone.apply`); `length` (static), their real length: hooks
        then see only the first `length` positions.

        `cached` passes `positions`, `cache` and `cache_index` to
        `Phi3Backbone.apply` (cached decoding, `phi3lab.generate`); with a
        `cache`, the updated cache comes fourth."""
        data = self.hook_data if hook_data is None else tuple(hook_data)
        if len(data) != len(self.hooks):
            raise ValueError(
                f"`hook_data` must hold one entry per hook ({len(self.hooks)}); received {len(data)} entries."
            )
        sites = TraceSites(self.plan, self.hooks, data, length=length)
        return self.model.apply(params, token_ids, padding_mask, sites, num_positions=num_positions, **cached)

    def __call__(self, params, token_ids, padding_mask=None, hook_data=None) -> ForwardOutput:
        return ForwardOutput(*self.run(params, token_ids, padding_mask, hook_data))


def plan_for(model, names: Selection, hooks: Hooks, window=None, heads=None, capture_dtype=None) -> TracePlan:
    """The static `TracePlan` for captures `names` and `hooks` on `model`.

    Resolves names and hook patterns against the catalogue (clear errors for
    unknown ones) and runs each hook's `check(model)`.
    """
    available = all_names(model)
    keep = select(names, available)
    hooked: dict[str, list[int]] = {}
    for index, (pattern, hook) in enumerate(hooks.entries):
        if hook.check is not None:
            hook.check(model)
        for name in select(pattern, available, argument="hooks"):
            hooked.setdefault(name, []).append(index)
    if window is not None:
        clash = [n for n in hooked if n.endswith(("hook_attn_scores", "hook_pattern"))]
        if clash:
            raise ValueError(
                f"`hooks` on {clash[:3]} cannot run with a query window (`queries`): the "
                "window reports only some rows of the attention maps. Drop `queries` to hook them."
            )
    return TracePlan(
        keep=frozenset(keep),
        hooked=tuple(sorted((name, tuple(indices)) for name, indices in hooked.items())),
        num_layers=model.num_layers,
        query_window=window,
        attention_heads=heads,
        capture_dtype=capture_dtype,
    )


def as_hooks(hooks) -> Hooks:
    """`hooks` (None, a mapping, pairs or a `Hooks`) as a `Hooks`."""
    return hooks if isinstance(hooks, Hooks) else Hooks(hooks if hooks is not None else {})


def forward_fn(model, names: Selection = (), hooks=None, *, window=None, heads=None, capture_dtype=None) -> ForwardFn:
    """A pure, jittable, differentiable forward of `model`.

    Args:
        model: a `Phi3Backbone`.
        names: what to capture (a name, glob pattern, list, predicate, or
            None for everything); by default nothing.
        hooks: `{name_or_pattern: fn(x, ctx) -> x | None}` or a `Hooks`.
        window: None, or `(start, stop)` query rows that the attention maps
            report (`trace`'s `queries=`, already resolved to positions).
        heads: None, or a tuple of query heads whose maps are kept.
        capture_dtype: None, or `"bfloat16"`: the dtype captured attention
            scores and patterns are returned in (`trace`'s argument).

    Returns:
        A `ForwardFn`: `fn(params, token_ids, padding_mask=None,
        hook_data=None) -> ForwardOutput`, pure in all its arguments.

    Hook data may be JAX tracers (`hooks.add(name, tracer)` inside a
    `jax.grad`), and `hook_data` is an ordinary argument, so `jax.grad`,
    `jax.jvp` and `jax.vmap` compose with it (docs/design.md, "Differentiable
    runs"); `phi3lab.gradients` is built on it.

    Example:
    ```python
    fn = phi3lab.tracing.forward_fn(model, names="hook_logits")
    logits = jax.jit(fn)(model.params(), ids).logits
    steer = phi3lab.tracing.forward_fn(model, hooks=phi3lab.hooks.add("blocks.1.hook_resid_post", v))
    answer_logit = lambda data: model.unembed(model.params(), steer(model.params(), ids, None, data).hidden)[0, -1, 7]
    d_vector, d_scale = jax.jit(jax.grad(answer_logit))(steer.hook_data)[0]
    ```
    """
    hooks = as_hooks(hooks)
    plan = plan_for(model, names, hooks, window, heads, capture_dtype)
    return ForwardFn(model, plan, tuple(hook for _, hook in hooks.entries), tuple(h.data for _, h in hooks.entries))
