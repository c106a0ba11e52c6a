"""The catalogue of hook names, their shapes, and name selection.

Names follow TransformerLens where the concept is the same. Block names carry
the prefix `blocks.{layer}.`; the rest are model-level.

Some sites are **opt-in** (`OPT_IN_SITES`): the per-head inputs of attention
(`attn.hook_q_input` ...), each head's output (`attn.hook_result`) and the
MLP's own input (`hook_mlp_in`). The model builds their split paths only when
one is captured or hooked, so they are left out of "everything" (`names=None`,
a predicate) and out of glob patterns that do not name them: select them by
name (`"blocks.*.attn.hook_q_input"`).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterable

from phi3lab.checks import is_int
from phi3lab.errors import close_matches

# Block-local hook names in the order the forward reaches them, with shapes
# in symbols: B batch, T positions, D hidden, F intermediate, Hq / Hkv heads,
# dh head size.
BLOCK_SITES = {
    "hook_resid_pre": ("B", "T", "D"),
    "ln1.hook_normalized": ("B", "T", "D"),
    "attn.hook_q_input": ("B", "T", "Hq", "D"),
    "attn.hook_k_input": ("B", "T", "Hkv", "D"),
    "attn.hook_v_input": ("B", "T", "Hkv", "D"),
    "attn.hook_q": ("B", "T", "Hq", "dh"),
    "attn.hook_k": ("B", "T", "Hkv", "dh"),
    "attn.hook_v": ("B", "T", "Hkv", "dh"),
    "attn.hook_rot_q": ("B", "T", "Hq", "dh"),
    "attn.hook_rot_k": ("B", "T", "Hkv", "dh"),
    "attn.hook_attn_scores": ("B", "Hq", "T", "T"),
    "attn.hook_pattern": ("B", "Hq", "T", "T"),
    "attn.hook_z": ("B", "T", "Hq", "dh"),
    "attn.hook_result": ("B", "T", "Hq", "D"),
    "hook_attn_out": ("B", "T", "D"),
    "hook_resid_mid": ("B", "T", "D"),
    "hook_mlp_in": ("B", "T", "D"),
    "ln2.hook_normalized": ("B", "T", "D"),
    "mlp.hook_pre": ("B", "T", "F"),
    "mlp.hook_pre_linear": ("B", "T", "F"),
    "mlp.hook_post": ("B", "T", "F"),
    "hook_mlp_out": ("B", "T", "D"),
    "hook_resid_post": ("B", "T", "D"),
}
# Sites built only when named (see the module docstring): the residual stream
# entering the block, one copy per query head (`hook_q_input`) or key/value
# head (`hook_k_input`, `hook_v_input`), before ln1, which each copy then goes
# through (TransformerLens' split q/k/v inputs); each query head's output
# `z @ W_O` (`hook_result`, summing over heads to `hook_attn_out`); the
# residual stream as the MLP alone reads it, before ln2 (`hook_mlp_in`:
# changing it changes the MLP only, not `hook_resid_post`).
OPT_IN_SITES = frozenset(
    {"attn.hook_q_input", "attn.hook_k_input", "attn.hook_v_input", "attn.hook_result", "hook_mlp_in"}
)
MODEL_SITES = {
    "hook_embed": ("B", "T", "D"),
    "ln_final.hook_normalized": ("B", "T", "D"),
    "hook_logits": ("B", "T", "V"),
}
_BLOCK_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")
_NEGATIVE_BLOCK = re.compile(r"^blocks\.(-\d+)\.")


def block_name(layer: int, site: str) -> str:
    """`block_name(3, "attn.hook_pattern")` -> `"blocks.3.attn.hook_pattern"`."""
    return f"blocks.{layer}.{site}"


def split_name(name: str) -> tuple[int | None, str]:
    """`"blocks.3.attn.hook_z"` -> `(3, "attn.hook_z")`; model-level -> `(None, name)`."""
    match = _BLOCK_NAME.match(name)
    if match:
        return int(match.group(1)), match.group(2)
    return None, name


def all_names(model, opt_in: bool = False) -> list[str]:
    """Every hook name of `model` (a `Phi3Backbone`, or its number of
    blocks), in forward order; the `OPT_IN_SITES` only with `opt_in`.

    Example:
    >>> phi3lab.tracing.all_names(model)[:2]
    ['hook_embed', 'blocks.0.hook_resid_pre']
    """
    num_layers = model if is_int(model) else model.num_layers
    sites = [site for site in BLOCK_SITES if opt_in or site not in OPT_IN_SITES]
    names = ["hook_embed"]
    for layer in range(num_layers):
        names += [block_name(layer, site) for site in sites]
    return names + ["ln_final.hook_normalized", "hook_logits"]


def is_opt_in(name: str) -> bool:
    """Whether hook `name` is one of the `OPT_IN_SITES`."""
    return split_name(name)[1] in OPT_IN_SITES


def _with_opt_in(names: list[str]) -> list[str]:
    """`names` with the opt-in sites of every block they hold, in forward order."""
    layers = sorted({layer for layer, _ in map(split_name, names) if layer is not None})
    if not layers or layers != list(range(len(layers))):
        return names
    order = {name: i for i, name in enumerate(all_names(len(layers), opt_in=True))}
    extra = [name for name in order if is_opt_in(name) and name not in names]
    return sorted([*names, *extra], key=lambda name: order.get(name, -1))


def _names_opt_in(pattern: str, name: str) -> bool:
    """Whether `pattern` selects the opt-in site `name`: it spells the
    site's last part (`hook_q_input`), so broad globs never build split paths."""
    return split_name(name)[1].rsplit(".", 1)[-1] in pattern


def site_shape(model, name: str, batch: int, length: int) -> tuple[int, ...]:
    """The shape of activation `name` for a `[batch, length]` input."""
    _, site = split_name(name)
    sizes = {
        "B": batch,
        "T": length,
        "D": model.hidden_dim,
        "F": model.intermediate_dim,
        "Hq": model.num_query_heads,
        "Hkv": model.num_key_value_heads,
        "dh": model.head_dim,
        "V": model.vocabulary_size,
    }
    symbols = BLOCK_SITES.get(site) or MODEL_SITES[site]
    return tuple(sizes[s] for s in symbols)


def position_index(site: str, length: int) -> tuple[slice, ...]:
    """The index that keeps the first `length` positions of every position
    axis of hook `site` (e.g. `[:, :, :length, :length]` for a pattern):
    inputs padded on the right are cut back with it."""
    _, site = split_name(site)
    symbols = BLOCK_SITES.get(site) or MODEL_SITES[site]
    return tuple(slice(0, length) if s == "T" else slice(None) for s in symbols)


def _count_from_end(pattern: str, names: list[str]) -> str:
    """`blocks.-1.` counts from the last block, as negative indices do."""
    match = _NEGATIVE_BLOCK.match(pattern)
    if not match:
        return pattern
    num_layers = sum(name.endswith(".hook_resid_pre") for name in names)
    layer = int(match.group(1)) + num_layers
    return pattern if layer < 0 else f"blocks.{layer}." + pattern[match.end() :]


Selection = None | str | Iterable[str] | Callable[[str], bool]


def select(selection: Selection, names: list[str], argument: str = "names") -> list[str]:
    """The names (in forward order) picked by `selection`.

    Args:
        selection: None (everything), a name or glob pattern
            (`"blocks.*.attn.hook_pattern"`), a list of those, or a predicate
            `fn(name) -> bool`.
        names: every available name.
        argument: the user-facing argument name, for error messages.

    The opt-in sites (`OPT_IN_SITES`) of the blocks in `names` are selected
    only by patterns that spell them, never by None or a predicate.

    Raises `ValueError` for a name or pattern that matches nothing, listing
    close matches.
    """
    names = [n for n in names if not is_opt_in(n)]
    if selection is None:
        return names
    if callable(selection):
        return [n for n in names if selection(n)]
    if not isinstance(selection, (str, Iterable)):
        raise TypeError(
            f"`{argument}` must be None, a hook name or glob pattern, a list of those, or a "
            f"predicate; received {argument}={selection!r} of type {type(selection).__name__}."
        )
    patterns = [selection] if isinstance(selection, str) else list(selection)
    everything = _with_opt_in(names)
    chosen = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(
                f"`{argument}` must hold hook names or glob patterns (strings); "
                f"received {pattern!r} of type {type(pattern).__name__}."
            )
        resolved = _count_from_end(pattern, names)
        matched = [n for n in fnmatch.filter(everything, resolved) if not is_opt_in(n) or _names_opt_in(resolved, n)]
        if not matched:
            raise ValueError(
                f"`{argument}` entry {pattern!r} matches no hook name. Close "
                f"matches: {close_matches(pattern, names)}. Names look like "
                "'blocks.0.attn.hook_pattern', patterns like 'blocks.*.hook_resid_post'."
            )
        chosen.update(matched)
    return [n for n in everything if n in chosen]
