"""Splicing a dictionary into a run: ordinary phi3lab hooks.

`splice` replaces a site by the dictionary's reconstruction (an SAE) or
prediction (a transcoder, written at its `target_site` from the value of
its input site in the same run), with or without the error term
`x - dictionary(x)`. `clamp`, `add` and `ablate` edit feature activations
and keep the error term by default, so the run differs from the clean one
only by the edit: `decode(edited) + (x - decode(acts))`.

The dictionary's weights, feature ids, values and positions are the hooks'
*data* (compiled inputs): a new clamp value, or another dictionary of the
same shape, compiles nothing. They work wherever hooks do: `phi3lab.trace`,
`phi3lab.generate`, `phi3lab.gradients` and the patching sweeps.

Example:
```python
import phi3lab.features as F
tr = phi3lab.trace(model, ids, hooks=F.hooks.splice(sae))                     # SAE output, no error term
tr = phi3lab.trace(model, ids, hooks=F.hooks.clamp(sae, None, {12: 5.0}))     # feature 12 held at 5
g = phi3lab.generate(model, tok, "Once", hooks=F.hooks.add(sae, None, {3: 8.0}, positions=None))
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from jax import numpy as jnp

from phi3lab.checks import is_int
from phi3lab.errors import bad_argument, close_matches
from phi3lab.features.dictionary import SparseDictionary
from phi3lab.tracing.hook_types import Hook, Hooks
from phi3lab.tracing.names import BLOCK_SITES, MODEL_SITES, all_names, site_shape, split_name

_EDITS = ("none", "set", "add")


def _encode_and_edit(x, ctx):
    """The hook: encode the site's input, edit features, decode (plus the error term)."""
    dictionary, features, values, positions = ctx.data
    edit, keep_error, input_site = ctx.static
    source = x if input_site is None else ctx.seen[input_site]
    flat = source.reshape(*source.shape[:2], -1)
    if edit == "none":  # one encode, one decode (of the k active features only for a top-k dictionary)
        output = dictionary(flat)
        if keep_error:  # x + (output - output): exactly x
            return (x + (output - output).reshape(x.shape)).astype(x.dtype)
        return output.reshape(x.shape).astype(x.dtype)
    acts = dictionary.encode(flat)
    current = acts[..., features]
    changed = values if edit == "set" else current + values
    if positions is not None:
        chosen = jnp.zeros(acts.shape[1], bool).at[positions].set(True)[None, :, None]
        changed = jnp.where(chosen, changed, current)
    if keep_error:  # x + (decode(edited) - decode(acts)), from the edited features' decoder rows alone
        return (x + dictionary.decode_change(changed - current, features, flat).reshape(x.shape)).astype(x.dtype)
    return dictionary.decode(acts.at[..., features].set(changed), flat).reshape(x.shape).astype(x.dtype)


def _record(x, ctx):
    """A hook that changes nothing: its site's value becomes `ctx.seen` for later hooks."""
    return None


def _site_width(model, name: str, argument: str) -> int:
    """The per-token width of site `name` (trailing axes flattened); clear
    errors for unknown names and sites without a position axis."""
    names = all_names(model)
    if name not in names:
        raise bad_argument(argument, name, f"a hook name of this model (close matches: {close_matches(name, names)})")
    _, local = split_name(name)
    symbols = BLOCK_SITES.get(local) or MODEL_SITES[local]
    if symbols[:2] != ("B", "T"):
        raise bad_argument(argument, name, "a site shaped [batch, position, ...] (not an attention map)")
    return math.prod(site_shape(model, name, 1, 1)[2:])


def _check_sites(dictionary: SparseDictionary, site: str, input_site: str | None):
    def check(model):
        width = _site_width(model, site, "site")
        config = dictionary.config
        reads = site if input_site is None else input_site
        read_width = width if input_site is None else _site_width(model, input_site, "dictionary.config.site")
        if read_width != config.d_in:
            accepted = f"a dictionary of d_in={read_width}, the width of {reads!r} (it has {config.d_in})"
            raise bad_argument("dictionary", dictionary, accepted)
        if width != config.d_out:
            accepted = f"a dictionary of d_out={width}, the width of {site!r} (it has {config.d_out})"
            raise bad_argument("dictionary", dictionary, accepted)
        if input_site is not None:
            order = all_names(model)
            if order.index(input_site) >= order.index(site):
                raise bad_argument(
                    "dictionary.config.site", input_site, f"a site the model reaches before the target {site!r}"
                )

    return check


def _edit_hooks(dictionary, site, features, edit: str, positions, error: bool) -> Hooks:
    if not isinstance(dictionary, SparseDictionary):
        raise bad_argument("dictionary", dictionary, "a phi3lab.features.SparseDictionary")
    config = dictionary.config
    default = config.target_site if config.transcoder else config.site
    site = default if site is None else site
    if not isinstance(site, str):
        raise bad_argument("site", site, "a hook name (or None for the dictionary's own site)")
    input_site = config.site if config.transcoder else None
    if config.transcoder and not isinstance(input_site, str):
        raise bad_argument("dictionary.config.site", input_site, "the transcoder's input hook name")
    if features is None:
        ids, values = jnp.zeros(0, jnp.int32), jnp.zeros(0)
    else:
        ids, values = _feature_values(features, config.d_sae)
    if positions is not None:
        positions = np.atleast_1d(np.asarray(positions))
        if positions.ndim != 1 or not np.issubdtype(positions.dtype, np.integer):
            raise bad_argument("positions", positions, "None (every position) or a list of int positions")
        positions = jnp.asarray(positions, jnp.int32)
    hook = Hook(
        _encode_and_edit,
        data=(dictionary, ids, values, positions),
        static=(edit, error, input_site),
        check=_check_sites(dictionary, site, input_site),
    )
    entries = [] if input_site is None else [(input_site, Hook(_record))]
    return Hooks(entries + [(site, hook)])


def _feature_values(features, d_sae: int):
    """`{feature: value}` as (int32 ids, float32 values) arrays."""
    if not isinstance(features, Mapping) or not features:
        raise bad_argument("features", features, "a non-empty mapping {feature id: value}")
    ids = list(features)
    if not all(is_int(f) and 0 <= f < d_sae for f in ids):
        raise bad_argument("features", features, f"feature ids (ints) in [0, {d_sae})")
    try:
        values = np.asarray([features[f] for f in ids], np.float32)
    except (TypeError, ValueError):
        raise bad_argument("features", features, "numeric values") from None
    return jnp.asarray(ids, jnp.int32), jnp.asarray(values)


def splice(dictionary: SparseDictionary, site: str | None = None, *, error: bool = False) -> Hooks:
    """Replace `site` by the dictionary's output.

    Args:
        dictionary: a `SparseDictionary` (an SAE: its output replaces its
            input; a transcoder: its prediction from its input site replaces
            `target_site`).
        site: the site replaced; None for the dictionary's own
            (`config.site`, or `config.target_site` for a transcoder).
        error: add the error term `x - dictionary(x)`, which makes the run
            the clean run (to float rounding) while routing it through the
            features (for gradients and edits).

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=splice(sae))
    """
    return _edit_hooks(dictionary, site, None, "none", None, error)


def clamp(
    dictionary: SparseDictionary, site: str | None, features: Mapping[int, float], positions=None, *, error: bool = True
) -> Hooks:
    """Hold features at values: `{feature: value}` (at `positions`, or all).

    Args:
        dictionary: a `SparseDictionary`.
        site: the site it is spliced at (None: its own).
        features: `{feature id: value}`.
        positions: None (every position) or a list of positions.
        error: keep the error term (default), so only the edit changes the run.

    Example:
    >>> tr = phi3lab.trace(model, ids, hooks=clamp(sae, None, {7: 4.0}, positions=[-1]))
    """
    return _edit_hooks(dictionary, site, features, "set", positions, error)


def add(
    dictionary: SparseDictionary, site: str | None, features: Mapping[int, float], positions=None, *, error: bool = True
) -> Hooks:
    """Add `value` to each feature's activation (at `positions`, or all);
    otherwise as `clamp`."""
    return _edit_hooks(dictionary, site, features, "add", positions, error)


def ablate(dictionary: SparseDictionary, site: str | None, features, positions=None, *, error: bool = True) -> Hooks:
    """Set features (a list of ids) to zero (at `positions`, or all); otherwise as `clamp`."""
    if is_int(features):
        features = [features]
    if isinstance(features, (str, bytes, Mapping)) or not hasattr(features, "__iter__"):
        raise bad_argument("features", features, "a feature id or a list of feature ids")
    return clamp(dictionary, site, {int(f) if is_int(f) else f: 0.0 for f in features}, positions, error=error)
