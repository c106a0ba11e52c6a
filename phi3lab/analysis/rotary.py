"""Rotary position embedding: the frequency table and per-band attention scores.

The table is built from the model's own `RotarySpec` (through
`phi3lab.tracing.rope.describe_rotary`); nothing here re-derives a
frequency. Band scores split a head's attention logits into the
contributions of its rotary dimension pairs: Phi-3 rotates dimension `i`
together with `i + rotary_dim / 2`, so after rotation

    score[t, s] = scale * (sum_i (q[t, i] k[s, i] + q[t, i + P] k[s, i + P])
                           + sum_{j >= rotary_dim} q[t, j] k[s, j])

with `P = rotary_dim / 2` and `scale` the attention layer's `score_scale`
(`head_dim ** -0.5`). The last sum is over the pass-through dimensions of a
partially rotary model (Phi-4-mini: 32 of 128), which carry no position.
Low pairs turn fast (position-sensitive), high pairs slowly (semantic).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.analysis._common import check_trace, require
from phi3lab.checks import check_index, check_positive_int
from phi3lab.deprecation import keyword_only_since
from phi3lab.errors import bad_argument
from phi3lab.model.attention import attention_mask
from phi3lab.tracing.interventions import key_value_head_of
from phi3lab.tracing.names import block_name
from phi3lab.tracing.rope import describe_rotary


def rotary_table(model, seq_len: int) -> pd.DataFrame:
    """The rotary embedding of `model` over `seq_len` positions, per pair.

    One row per rotary dimension pair `(i, i + rotary_dim/2)`: the factor in force,
    inverse frequency, wavelength in tokens, turns over `seq_len`
    positions (from `RotaryDescription.to_pandas`), and side by side the
    "su" `short_factor` / `long_factor` with the wavelengths each gives
    (`short_wavelength`, `long_wavelength`; all factors are 1 without
    scaling). `attrs` holds `factor_set` (the set in force at this length),
    `reason`, `attention_factor` (the cos/sin multiplier), `seq_len`,
    `pretraining_sequence_length`, `max_sequence_length`, `head_dim`,
    `rotary_dim` and `pass_through_dims` (the unrotated dimensions, which
    have no row: with partial rotary only `rotary_dim // 2` pairs turn).

    Args:
        model: a `Phi3Backbone`.
        seq_len: int. Number of positions in use (decides short vs long).

    Returns:
        A DataFrame, one row per dimension pair.

    Example:
    ```python
    table = phi3lab.analysis.rotary_table(model, seq_len=4096)
    table[["pair", "short_factor", "long_factor", "wavelength"]].head()
    table.attrs["factor_set"], table.attrs["attention_factor"]
    ```
    """
    check_positive_int("seq_len", seq_len)
    if seq_len > model.max_sequence_length:
        raise bad_argument("seq_len", seq_len, f"at most max_sequence_length={model.max_sequence_length}")
    spec = model.rotary
    description = describe_rotary(spec, int(seq_len))
    table = description.to_pandas()
    if "short_factor" not in table:
        ones = np.ones(spec.num_pairs, np.float32)
        table.insert(3, "short_factor", ones)
        table.insert(4, "long_factor", ones)
    # The short set serves one position, the long set one past the window.
    short, long = (spec.inverse_frequencies(n).astype(np.float64) for n in (1, spec.pretraining_sequence_length + 1))
    table["short_wavelength"] = 2 * np.pi / short
    table["long_wavelength"] = 2 * np.pi / long
    table.attrs.update(
        seq_len=int(seq_len),
        pretraining_sequence_length=spec.pretraining_sequence_length,
        max_sequence_length=spec.max_sequence_length,
        max_wavelength=spec.max_wavelength,
    )  # head_dim, rotary_dim and pass_through_dims come from the description
    return table


def _check_bands(bands, num_pairs: int, num_groups: int) -> list[np.ndarray]:
    """Bands as index arrays over the `num_groups` groups (the rotary pairs,
    then the pass-through block when there is one)."""
    if bands is None:
        return [np.array([i]) for i in range(num_groups)]
    where = f"[0, {num_groups})" + (f" ({num_pairs} is the pass-through block)" if num_groups > num_pairs else "")
    accepted = f"None or a list of pair-index lists (or slices) within {where}"
    if isinstance(bands, (str, bytes)) or not hasattr(bands, "__iter__"):
        raise bad_argument("bands", bands, accepted)
    chosen = []
    for band in bands:
        try:
            pairs = np.arange(num_groups)[band] if isinstance(band, slice) else np.atleast_1d(np.asarray(band))
        except (TypeError, ValueError, IndexError):
            raise bad_argument("bands", bands, accepted) from None
        if (
            pairs.size == 0
            or pairs.ndim != 1
            or not np.issubdtype(pairs.dtype, np.integer)
            or pairs.min() < 0
            or pairs.max() >= num_groups
        ):
            raise bad_argument("bands", bands, accepted)
        chosen.append(pairs)
    if not chosen:
        raise bad_argument("bands", bands, accepted)
    return chosen


@keyword_only_since("batch", "bands")
def rotary_band_scores(
    model,
    tr,
    layer: int,
    head: int,
    *,
    batch: int = 0,
    bands: Sequence[Sequence[int] | slice] | None = None,
) -> np.ndarray:
    """A head's attention scores split over rotary dimension pairs (bands).

    From `attn.hook_rot_q` (the query head) and `attn.hook_rot_k` (its
    key/value head under grouped-query attention), pair `i` contributes
    `scale * (q[t,i] k[s,i] + q[t,i+P] k[s,i+P])`, `P = rotary_dim / 2`.
    With partial rotary (`rotary_dim < head_dim`) one more group, index
    `P`, holds the pass-through dimensions' `scale * sum_j q[t,j] k[s,j]`.
    Summed over all groups this is `attn.hook_attn_scores` on the allowed
    (query, key) entries; masked entries (future keys, padding, outside a
    sliding window) are NaN.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.{layer}.attn.hook_rot_q` and `hook_rot_k`.
        layer: int. Decoder block.
        head: int. Query head.
        batch: int. Row of the trace.
        bands: None (one band per pair, plus the pass-through block if any)
            or a list of bands, each a list of group indices or a slice,
            e.g. `[slice(0, 8), slice(8, 16)]`.

    Returns:
        float32 `[num_bands, Tq, Tk]`.

    Example:
    ```python
    tr = phi3lab.trace(model, ids, names="blocks.0.attn.hook_rot_*")
    parts = phi3lab.analysis.rotary_band_scores(model, tr, layer=0, head=1)
    parts.shape                               # (rotary_dim // 2 [+ 1], T, T)
    np.nansum(np.abs(parts), axis=(1, 2))     # which pairs matter most
    ```
    """
    check_trace(model, tr)
    layer = check_index("layer", layer, model.num_layers, "layer")
    head = check_index("head", head, model.num_query_heads, "query head")
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    names = [block_name(layer, "attn.hook_rot_q"), block_name(layer, "attn.hook_rot_k")]
    require(tr, names, "rotary_band_scores")
    rotary_dim = model.rotary.rotary_dim
    pairs = rotary_dim // 2
    groups = pairs + (rotary_dim < model.head_dim)
    chosen = _check_bands(bands, pairs, groups)
    q = np.asarray(tr[names[0]][batch, :, head], np.float64)
    k = np.asarray(tr[names[1]][batch, :, key_value_head_of(model, int(head))], np.float64)
    rotated = lambda x: x[:, :rotary_dim].reshape(-1, 2, pairs)
    per_pair = np.einsum("thi,shi->its", rotated(q), rotated(k))
    if groups > pairs:
        per_pair = np.concatenate([per_pair, (q[:, rotary_dim:] @ k[:, rotary_dim:].T)[None]])
    per_pair = per_pair * model.decoder.attention.score_scale
    out = np.stack([per_pair[band].sum(0) for band in chosen])
    padding = jnp.asarray(tr.padding_mask[batch : batch + 1])
    allowed = np.asarray(attention_mask(padding, 0, q.shape[0], model.sliding_window))[0]
    return np.where(allowed[None], out, np.nan).astype(np.float32)
