"""The logit lens: read every residual stream through the model's own output.

Each residual stream (before, between and after the halves of every block)
goes through the model's final RMS norm and its LM head, the layers' own
`apply` methods, compiled with `jax.jit`. Applied to the last block's output
this is exactly how the model computes `hook_logits`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.analysis._common import as_list, check_index, check_trace, compiled, is_int, require
from phi3lab.errors import bad_argument
from phi3lab.tracing.names import block_name

WHERE = ("pre", "mid", "post")


def _decode_fn(model):
    """`decode(params, x [N, T, D]) -> logits [N, T, V]` through the final
    norm and LM head of `model`."""

    def decode(params, x):
        normalized = model.final_norm.apply(params["final_norm"], x)
        return model.token_embedding.apply(params["token_embedding"], normalized, reverse=True)

    return decode


def decoder(model):
    """The compiled `decode(params, x) -> logits` of `model` (cached), and its params."""
    fn = compiled(model, "logit_lens.decode", lambda: jax.jit(_decode_fn(model)))
    params = {"final_norm": model.final_norm.params(), "token_embedding": model.token_embedding.params()}
    return fn, params


def _top_fn(model, k: int):
    decode = _decode_fn(model)

    def top(params, x):
        log_probs = jax.nn.log_softmax(decode(params, x).astype(jnp.float32), axis=-1)
        values, indices = jax.lax.top_k(log_probs, k)
        return jnp.exp(values), indices

    return jax.jit(top)


def _check_where(where) -> tuple[str, ...]:
    if not isinstance(where, (str, Iterable)):
        raise bad_argument("where", where, 'a non-empty sequence of "pre", "mid", "post"')
    chosen = (where,) if isinstance(where, str) else tuple(where)
    if not chosen or any(not isinstance(w, str) or w not in WHERE for w in chosen):
        raise bad_argument("where", where, 'a non-empty sequence of "pre", "mid", "post"')
    return chosen


def _streams(model, tr, where: tuple[str, ...], batch: int) -> Iterable[tuple[int, np.ndarray]]:
    """`(layer, x [len(where), T, D])` for every layer."""
    names = [block_name(l, f"hook_resid_{w}") for l in range(model.num_layers) for w in where]
    require(tr, names, "The logit lens")
    for layer in range(model.num_layers):
        yield layer, np.stack([tr[block_name(layer, f"hook_resid_{w}")][batch] for w in where])


def logit_lens_logits(
    model, tr, where: str | Sequence[str] = WHERE, batch: int = 0
) -> np.ndarray:
    """Logits of every residual stream, decoded as if it were the last.

    Each residual stream `blocks.{l}.hook_resid_{where}` goes through the
    model's own final norm (`model.final_norm.apply`) and LM head
    (`model.token_embedding.apply(..., reverse=True)`), compiled once per
    model. The last layer's `"post"` entry equals the trace's `hook_logits`.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.*.hook_resid_{where}`.
        where: which streams of each block: any of `"pre"`, `"mid"`,
            `"post"`, in the order given. Defaults to all three.
        batch: int. Which row of the trace.

    Returns:
        float32 `[num_layers, len(where), T, V]`.

    Example:
    ```python
    tr = phi3lab.trace(model, ids, names="blocks.*.hook_resid_*")
    logits = phi3lab.analysis.logit_lens_logits(model, tr, where="post")
    logits[-1, 0]        # the model's own final logits [T, V]
    ```
    """
    check_trace(model, tr)
    where = _check_where(where)
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    decode, params = decoder(model)
    out = [np.asarray(decode(params, jnp.asarray(x)), np.float32) for _, x in _streams(model, tr, where, batch)]
    return np.stack(out)


def logit_lens(
    model,
    tr,
    k: int = 5,
    where: str | Sequence[str] = WHERE,
    batch: int = 0,
    positions: Sequence[int] | None = None,
    tokenizer=None,
) -> pd.DataFrame:
    """The top-`k` next-token predictions of every residual stream.

    Decodes each residual stream through the model's final norm and LM head
    (see `logit_lens_logits`) and keeps, per layer, stream and position, the
    `k` most probable tokens. Top-k and softmax run on the device, so only
    `k` values per position come back (fine for 32k vocabularies).

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.*.hook_resid_{where}`.
        k: int. How many top tokens per row. Defaults to 5.
        where: any of `"pre"`, `"mid"`, `"post"`. Defaults to all three.
        batch: int. Which row of the trace.
        positions: positions to keep (None: every real, non-padding token).
        tokenizer: optional `Phi3Tokenizer`; adds a `top_strings` column.

    Returns:
        A DataFrame with one row per (layer, where, position): `layer`,
        `where`, `position`, `token` (when `tr.tokens` is set), `top_tokens`
        (list of ids, most probable first), `top_probs` (their
        probabilities), and `top_strings` with a tokenizer.

    Example:
    ```python
    tr = phi3lab.trace(model, "The capital of France is", tokenizer=tok)
    table = phi3lab.analysis.logit_lens(model, tr, k=3, where="post")
    table[table.position == table.position.max()]
    ```
    """
    check_trace(model, tr)
    where = _check_where(where)
    if not is_int(k) or not 1 <= k <= model.vocabulary_size:
        raise bad_argument("k", k, f"an int in [1, {model.vocabulary_size}] (the vocabulary size)")
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    length = tr.token_ids.shape[1]
    valid = np.asarray(tr.padding_mask[batch], bool)
    if positions is None:
        keep = np.flatnonzero(valid)
    else:
        keep = np.unique([check_index("positions", p, length, "position") for p in as_list("positions", positions)])
    top = compiled(model, ("logit_lens.top", int(k)), lambda: _top_fn(model, int(k)))
    _, params = decoder(model)
    rows = []
    for layer, x in _streams(model, tr, where, batch):
        probs, ids = (np.asarray(a) for a in top(params, jnp.asarray(x)))
        for w_index, w in enumerate(where):
            for p in keep:
                rows.append((layer, w, int(p), ids[w_index, p].tolist(), probs[w_index, p].tolist()))
    table = pd.DataFrame(rows, columns=["layer", "where", "position", "top_tokens", "top_probs"])
    if tr.tokens is not None:
        table.insert(3, "token", [tr.tokens[batch][p] for p in table["position"]])
    if tokenizer is not None:
        table["top_strings"] = [tokenizer.display_tokens(ids, beyond_vocabulary="<unused {}>") for ids in table["top_tokens"]]
    table.attrs.update(k=int(k), batch=batch)
    return table
