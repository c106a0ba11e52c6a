"""Residual-stream decomposition and direct logit attribution.

The last residual stream is a sum: the embedding, plus every block's
attention output, plus every block's MLP output. Each attention output is in
turn a sum over query heads, `z[b, t, n, :] @ output_kernel[l, n]` (Phi-3's
output projection has no bias). Direct logit attribution reads each term
through the final norm and the LM head with the norm's scale frozen at its
value in the traced run, which makes the read-out linear.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.analysis._common import as_list, check_trace, require
from phi3lab.analysis.lens import read_rows, readout_logits
from phi3lab.checks import check_choice, check_index, check_token_ids, is_int, last_positions
from phi3lab.deprecation import keyword_only_since
from phi3lab.errors import bad_argument
from phi3lab.model.quantize import dequantize
from phi3lab.tracing import pipeline
from phi3lab.tracing.names import block_name


@dataclasses.dataclass(frozen=True)
class ResidualDecomposition:
    """The final residual stream split into what wrote it.

    `embed + attn_out.sum(0) + mlp_out.sum(0) == final` and, per layer,
    `head_out[l].sum(0) == attn_out[l]` (up to float rounding).

    Attributes:
        embed: `[B, T, D]`, `hook_embed`.
        attn_out: `[L, B, T, D]`, each block's `hook_attn_out`.
        head_out: `[L, Hq, B, T, D]`, each query head's share of it.
        mlp_out: `[L, B, T, D]`, each block's `hook_mlp_out`.
        final: `[B, T, D]`, the last block's `hook_resid_post`.
        batch, positions: the trace rows and positions kept (axes B and T).
    """

    embed: np.ndarray
    attn_out: np.ndarray
    head_out: np.ndarray
    mlp_out: np.ndarray
    final: np.ndarray
    batch: np.ndarray
    positions: np.ndarray

    def labels(self, heads: bool = True) -> pd.DataFrame:
        """One row per component of `stack(heads)`: `component`, `layer`,
        `head` and `kind` (`"embed"`, `"attn"`, `"head"` or `"mlp"`)."""
        num_layers, num_heads = self.head_out.shape[:2]
        return component_table(num_layers, num_heads, heads=heads)

    def stack(self, heads: bool = True) -> np.ndarray:
        """The components `[C, B, T, D]` in the order of `labels(heads)`;
        they sum to `final`. With `heads=True` each block's attention is
        split into its query heads."""
        parts = [self.embed[None]]
        for layer in range(self.attn_out.shape[0]):
            parts.append(self.head_out[layer] if heads else self.attn_out[layer][None])
            parts.append(self.mlp_out[layer][None])
        return np.concatenate(parts)


def component_table(num_layers: int, num_heads: int, heads: bool = True) -> pd.DataFrame:
    """Component labels in residual order: `embed`, then per layer its
    heads (`L{l}H{h}`, with `heads`) or its attention block (`L{l}_attn`)
    and its MLP (`L{l}_mlp`). Columns `component, layer, head, kind`."""
    rows = [("embed", None, None, "embed")]
    for layer in range(num_layers):
        if heads:
            rows += [(f"L{layer}H{h}", layer, h, "head") for h in range(num_heads)]
        else:
            rows.append((f"L{layer}_attn", layer, None, "attn"))
        rows.append((f"L{layer}_mlp", layer, None, "mlp"))
    table = pd.DataFrame(rows, columns=["component", "layer", "head", "kind"])
    return table.astype({"layer": "Int64", "head": "Int64"})


ATTRIBUTION_ADVICE = "Attribute fewer positions (positions=[-1]) or fewer rows (batch=0)."


def _head_outputs(model, z: np.ndarray, memory_budget: int | None) -> np.ndarray:
    """Each query head's share of its block's attention output,
    `[L, Hq, B, P, D]` from `z` `[P, L, B, Hq, dh]` (positions first):
    `z @ output_kernel[l, n]` (dequantized if int8) in float32, through the
    run pipeline (`lens.read_rows`: the positions bucketed, guarded)."""
    attention = model.decoder.attention

    def split(params, z):
        kernel = dequantize(params["decoder"]["attention"], attention.compute_dtype)["output_kernel"]
        return jnp.einsum("tlbnh,lnhd->tlnbd", z.astype(jnp.float32), kernel.astype(jnp.float32))

    heads = read_rows(
        model, ("attribution.heads",), split, z, memory_budget, what="This decomposition", advice=ATTRIBUTION_ADVICE
    )
    return heads.transpose(1, 2, 3, 0, 4)


def _lm_head_columns(model, token_ids: np.ndarray, memory_budget: int | None) -> np.ndarray:
    """The LM head's columns of `token_ids` `[C]` as float64 `[D, C]`, in the
    model's compute dtype first (as `model.unembed` multiplies them): the
    attribution tables read out only these, never a `[N, V]` array."""
    embedding = model.token_embedding

    def columns(params, ids):
        head = embedding.lm_head(params["token_embedding"])  # [D, V]
        return jnp.take(head, ids, axis=1).T.astype(embedding.compute_dtype)

    ids = np.asarray(token_ids, np.int32)
    rows = read_rows(
        model, ("attribution.lm_head",), columns, ids, memory_budget, what="This attribution", advice=ATTRIBUTION_ADVICE
    )
    return rows.astype(np.float64).T


def _rows(tr, name: str, values, what: str, size: int) -> np.ndarray:
    if values is None:
        return np.arange(size)
    picked = [check_index(name, v, size, what) for v in as_list(name, values)]
    return np.asarray(picked, np.int64)


@keyword_only_since("batch", "positions")
def decompose_resid(
    model,
    tr,
    *,
    batch: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    memory_budget: int | None = None,
) -> ResidualDecomposition:
    """Split the final residual stream into embedding, heads and MLPs.

    Head contributions come from `attn.hook_z` and the attention's
    `output_kernel` `[L, Hq, dh, D]`: `z[b, t, n] @ output_kernel[l, n]`,
    computed in float32.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `hook_embed`, `blocks.*.hook_attn_out`,
            `blocks.*.attn.hook_z`, `blocks.*.hook_mlp_out` and the last
            block's `hook_resid_post`.
        batch: rows to keep (int or list); None keeps all.
        positions: positions to keep (int or list); None keeps all. Keeping
            few positions keeps memory small on large models.
        memory_budget: bytes the per-head products may use (default the
            free memory); refused with the estimate before they run.

    Returns:
        A `ResidualDecomposition`.

    Example:
    ```python
    tr = phi3lab.trace(model, ids)
    parts = phi3lab.analysis.decompose_resid(model, tr, positions=[-1])
    np.allclose(parts.stack().sum(0), parts.final, atol=1e-4)   # True
    ```
    """
    check_trace(model, tr)
    pipeline.check_budget(memory_budget)
    layers = range(model.num_layers)
    names = (
        ["hook_embed"]
        + [block_name(l, s) for l in layers for s in ("hook_attn_out", "attn.hook_z", "hook_mlp_out")]
        + [block_name(model.num_layers - 1, "hook_resid_post")]
    )
    require(tr, names, "The residual decomposition")
    rows = _rows(tr, "batch", batch, "batch row", tr.token_ids.shape[0])
    cols = _rows(tr, "positions", positions, "position", tr.token_ids.shape[1])
    take = lambda a: np.asarray(a)[rows][:, cols]
    z = np.stack([take(tr[block_name(l, "attn.hook_z")]) for l in layers])  # [L, B, P, Hq, dh]
    return ResidualDecomposition(
        embed=take(tr["hook_embed"]),
        attn_out=np.stack([take(tr[block_name(l, "hook_attn_out")]) for l in layers]),
        head_out=_head_outputs(model, z.transpose(2, 0, 1, 3, 4), memory_budget),
        mlp_out=np.stack([take(tr[block_name(l, "hook_mlp_out")]) for l in layers]),
        final=take(tr[block_name(model.num_layers - 1, "hook_resid_post")]),
        batch=rows,
        positions=cols,
    )


def frozen_norm_scale(model, final: np.ndarray) -> tuple[float, np.ndarray]:
    """`(1 / rms, 1/rms * norm_weight)` of the final norm at residual `final` `[D]`.

    The inverse RMS is read from the model's own norm, applied with unit
    weight (`x * inv_rms`), projected back on `x`: `<x * inv_rms, x> / <x, x>`,
    so its epsilon and float32 arithmetic are the model's.
    """
    try:
        final = np.asarray(final, np.float64)
    except (TypeError, ValueError):
        final = None
    if final is None or final.shape != (model.hidden_dim,):
        raise bad_argument("final", final, f"a float vector of shape [hidden_dim] = ({model.hidden_dim},)")
    norm = model.final_norm
    weight = np.asarray(norm.params()["scale"], np.float32)
    unit = np.asarray(
        norm.apply({"scale": jnp.ones_like(weight)}, jnp.asarray(final[None], jnp.float32))[0], np.float64
    )
    x = np.asarray(final, np.float64)
    inv_rms = float(unit @ x / (x @ x))
    return inv_rms, (inv_rms * weight.astype(np.float64))


@keyword_only_since("position", "batch")
def direct_logit_attribution(
    model,
    tr,
    answer: int,
    counterfactual: int | None = None,
    *,
    position: int = -1,
    batch: int = 0,
    level: str = "heads",
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """How much each head (or attention block) and MLP writes to a logit.

    The final norm divides the last residual stream `x` by its RMS and
    multiplies by a weight `w`. Freezing the RMS at its value in this run
    (the standard convention) makes the read-out linear, so each component
    `c` contributes `(c / rms(x) * w) @ W_U[:, answer]` (minus the same for
    `counterfactual`), through the model's own LM head. Attributions of the
    embedding, the attention blocks and the MLPs then sum exactly to the
    model's logit (difference). The frozen scale is read from the model's
    final norm (see `frozen_norm_scale`), not recomputed.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` with the names `decompose_resid` needs.
        answer: int. Token id whose logit is attributed.
        counterfactual: int or None. When set, the logit difference
            `answer - counterfactual` is attributed.
        position: int. Query position; negative values count back from the
            row's last real (non-padding) token. Defaults to -1.
        batch: int. Which row of the trace.
        level: `"heads"` (the default: a row per query head) or `"layers"`
            (a row per attention block). An argument, not both kinds of row
            in one table, so that every table partitions the residual
            stream: its rows sum to the total, and sorting or summing them
            counts each contribution once. The heads of a layer sum to its
            block's row at the other level.
        memory_budget: bytes each of its programs may use (default the free
            memory); refused with the estimate before they run.

    Returns:
        A DataFrame with `component`, `layer`, `head`, `kind` and
        `attribution`, in residual order. `kind` is `"embed"`, `"head"` (one
        query head; level `"heads"`), `"attn"` (a block's whole attention;
        level `"layers"`) or `"mlp"`. The rows sum to the model's logit
        (difference). `attrs` holds `level`, `total` (the frozen-scale sum),
        `logit_diff` (the model's own value, from `hook_logits` or the final
        norm and LM head), `inv_rms`, `answer`, `counterfactual`,
        `position`, `batch`.

    Example:
    ```python
    tr = phi3lab.trace(model, ids)
    table = phi3lab.analysis.direct_logit_attribution(model, tr, answer=17, counterfactual=4)
    table.sort_values("attribution").tail()     # the heads and MLPs that write the answer
    blocks = phi3lab.analysis.direct_logit_attribution(model, tr, answer=17, counterfactual=4, level="layers")
    ```
    """
    check_trace(model, tr)
    check_choice("level", level, ("heads", "layers"))
    pipeline.check_budget(memory_budget)
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    answer_id = int(check_token_ids("answer", answer, model.vocabulary_size, ndim=0))
    counter_id = None
    if counterfactual is not None:
        counter_id = int(check_token_ids("counterfactual", counterfactual, model.vocabulary_size, ndim=0))
    length = tr.token_ids.shape[1]
    last = int(last_positions(np.asarray(tr.padding_mask, bool)[batch : batch + 1])[0])
    if not is_int(position) or not -(last + 1) <= position < length:
        raise bad_argument(
            "position",
            position,
            f"an int in [{-(last + 1)}, {length}) (negative values count back from the last real token, {last})",
        )
    absolute = last + 1 + int(position) if position < 0 else int(position)

    parts = decompose_resid(model, tr, batch=[batch], positions=[absolute], memory_budget=memory_budget)
    heads = level == "heads"
    final = parts.final[0, 0]
    inv_rms, scale = frozen_norm_scale(model, final)

    columns = _lm_head_columns(model, [answer_id] + ([counter_id] if counter_id is not None else []), memory_budget)
    written = (parts.stack(heads=heads)[:, 0, 0] * scale) @ columns  # [components, 1 or 2]
    table = parts.labels(heads=heads)
    table["attribution"] = written[:, 0] - (written[:, 1] if counter_id is not None else 0.0)

    if "hook_logits" in tr.names:
        logits = np.asarray(tr["hook_logits"][batch, absolute], np.float64)
    else:
        logits = readout_logits(model, final[None], memory_budget, "This attribution", ATTRIBUTION_ADVICE)[0]
        logits = logits.astype(np.float64)
    model_value = logits[answer_id] - (logits[counter_id] if counter_id is not None else 0.0)
    table.attrs.update(
        level=level,
        total=float(table["attribution"].sum()),
        logit_diff=float(model_value),
        inv_rms=inv_rms,
        answer=answer_id,
        counterfactual=counter_id,
        position=absolute,
        batch=batch,
    )
    return table


def next_token_mask(padding_mask) -> np.ndarray:
    """`[T]` bool: the positions whose token was predicted from a real one,
    i.e. `p >= 1` with tokens `p - 1` and `p` both real (not padding)."""
    valid = np.asarray(padding_mask, bool)
    predicted = np.zeros_like(valid)
    predicted[1:] = valid[1:] & valid[:-1]
    return predicted


@keyword_only_since("batch", "heads")
def next_token_attribution(
    model, tr, *, batch: int = 0, heads: bool = False, memory_budget: int | None = None
) -> pd.DataFrame:
    """Direct logit attribution of every token: how much each component
    wrote, at the position before it, to the logit of the token that came.

    Column `p` holds each component's share of `logits[p - 1, ids[p]]`, the
    logit the model gave token `p` (read out with the final norm's scale
    frozen at position `p - 1`, as `direct_logit_attribution` does), so the
    embedding, attention and MLP rows of a column sum to that logit.
    Column 0 and padding positions are NaN.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` with the names `decompose_resid` needs.
        batch: int. Which row of the trace.
        heads: bool. Split each block's attention into its query heads
            (rows `L{l}H{h}`) instead of one `L{l}_attn` row.
        memory_budget: bytes each of its programs may use (default the free
            memory); refused with the estimate before they run.

    Returns:
        A DataFrame with one row per component (columns `component`, `layer`,
        `head`, `kind`, then one column per position `0 .. T-1`).
        `attrs["logit"]` is the model's own logit of each token `[T]`
        (from `hook_logits`, or the final norm and LM head), which the
        rows sum to.

    Example:
    ```python
    table = phi3lab.analysis.next_token_attribution(model, tr)
    table.set_index("component")[list(range(tr.token_ids.shape[1]))].sum()   # = attrs["logit"]
    ```
    """
    check_trace(model, tr)
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    pipeline.check_budget(memory_budget)
    ids = np.asarray(tr.token_ids[batch])
    length = len(ids)
    parts = decompose_resid(model, tr, batch=[batch], memory_budget=memory_budget)
    stack = parts.stack(heads=heads)[:, 0, :-1]  # [C, T-1, D]: what predicts tokens 1..T-1
    scales = np.stack([frozen_norm_scale(model, parts.final[0, t])[1] for t in range(length - 1)])
    wanted, where = np.unique(ids[1:], return_inverse=True)
    columns = _lm_head_columns(model, wanted, memory_budget)[:, where]  # [D, T-1]: each next token's column
    predicted = next_token_mask(tr.padding_mask[batch])
    values = np.full((stack.shape[0], length), np.nan)
    values[:, 1:] = np.einsum("ctd,td,dt->ct", stack, scales, columns)
    values[:, ~predicted] = np.nan
    table = parts.labels(heads=heads)
    table = pd.concat([table, pd.DataFrame(values, columns=range(length))], axis=1)
    if "hook_logits" in tr.names:
        logits = np.asarray(tr["hook_logits"][batch, :-1], np.float64)
    else:
        final = parts.final[0, :-1]
        logits = readout_logits(model, final, memory_budget, "This attribution", ATTRIBUTION_ADVICE).astype(np.float64)
    own = np.full(length, np.nan)
    own[1:] = logits[np.arange(length - 1), ids[1:]]
    own[~predicted] = np.nan
    table.attrs["logit"] = own
    return table
