"""The logit lens: read every residual stream through the model's own output.

Each residual stream (before, between and after the halves of every block)
goes through `model.readout` (the final RMS norm, then the LM head) by the
run pipeline (`read_rows`: bucketed, compiled ahead of time, guarded).
Applied to the last block's output this is exactly how the model computes
`hook_logits`. The `LogitLensView` widget shows these numbers; it computes
none of its own.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.analysis._common import as_list, check_trace, require
from phi3lab.checks import check_in_range, check_index, check_token
from phi3lab.deprecation import keyword_only_since
from phi3lab.errors import bad_argument
from phi3lab.tracing import pipeline
from phi3lab.tracing.names import block_name

WHERE = ("pre", "mid", "post")


LENS_ADVICE = "Read fewer positions (positions=[-1]) or fewer streams (where='post')."


def _top_k(model, k: int):
    """`(params, x [N, D]) -> (probabilities, ids)` `[N, k]` of the `k` most likely tokens."""

    def top(params, x):
        log_probs = jax.nn.log_softmax(model.readout(params, x).astype(jnp.float32), axis=-1)
        values, indices = jax.lax.top_k(log_probs, k)
        return jnp.exp(values), indices

    return top


def _answer_curve(model):
    """`(params, x [N, D], answer) -> (probability [N], rank [N])`."""

    def curve(params, x, answer):
        logits = model.readout(params, x).astype(jnp.float32)
        chosen = logits[:, answer]
        probability = jnp.exp(chosen - jax.nn.logsumexp(logits, axis=-1))
        rank = jnp.sum(logits > chosen[:, None], axis=-1) + 1
        return probability, rank

    return curve


def read_rows(
    model,
    key: tuple,
    fn,
    rows: np.ndarray,
    memory_budget: int | None,
    *extra,
    what: str = "This lens",
    advice: str | None = None,
):
    """`fn(params, rows [P, ...], *extra)` through the run pipeline: the `P`
    rows padded to their bucket (`pipeline.row_bucket`), compiled ahead of
    time under `key` (one program per bucket), guarded against
    `memory_budget` (refused with `CaptureTooLarge`, its message starting
    with `what` and ending with `advice`, default the lens's), each output
    cut back to `P` rows. The lens reads one stream at a time, so a stream
    reads the same whichever others are asked for.

    Example:
    >>> logits = read_rows(model, ("lens.readout",), model.readout, resid, None)   # [P, V]
    """
    bucket = pipeline.row_bucket(model, rows.shape[0])
    args = (model.params(), jnp.asarray(bucket.pad(rows, (0,))), *extra)
    program = pipeline.compiled(model, key, fn, args, memory_budget, what, advice or LENS_ADVICE)
    return jax.tree.map(lambda out: np.asarray(out)[: bucket.length], program(*args))


def readout_logits(
    model, rows: np.ndarray, memory_budget: int | None, what: str = "This lens", advice: str | None = None
) -> np.ndarray:
    """Logits `[P, V]` of residual streams `rows` `[P, D]` through
    `model.readout` (the final norm, then the LM head), by `read_rows`."""
    return read_rows(model, ("lens.readout",), model.readout, rows, memory_budget, what=what, advice=advice)


def _check_where(where) -> tuple[str, ...]:
    if not isinstance(where, (str, Iterable)):
        raise bad_argument("where", where, 'a non-empty sequence of "pre", "mid", "post"')
    chosen = (where,) if isinstance(where, str) else tuple(where)
    if not chosen or any(not isinstance(w, str) or w not in WHERE for w in chosen):
        raise bad_argument("where", where, 'a non-empty sequence of "pre", "mid", "post"')
    return chosen


def _positions(tr, positions, batch: int) -> np.ndarray:
    """Positions to read: every real token of row `batch` when None."""
    if positions is None:
        return np.flatnonzero(np.asarray(tr.padding_mask[batch], bool))
    length = tr.token_ids.shape[1]
    return np.unique([check_index("positions", p, length, "position") for p in as_list("positions", positions)])


def _streams(model, tr, where: tuple[str, ...], batch: int, positions: np.ndarray) -> Iterable[tuple[int, np.ndarray]]:
    """`(layer, x [len(where), P, D])` for every layer."""
    names = [block_name(l, f"hook_resid_{w}") for l in range(model.num_layers) for w in where]
    require(tr, names, "The logit lens")
    for layer in range(model.num_layers):
        yield layer, np.stack([tr[block_name(layer, f"hook_resid_{w}")][batch, positions] for w in where])


@keyword_only_since("where", "batch", "positions")
def logit_lens_logits(
    model,
    tr,
    *,
    where: str | Sequence[str] = WHERE,
    batch: int = 0,
    positions: Sequence[int] | None = None,
    memory_budget: int | None = None,
) -> np.ndarray:
    """Logits of every residual stream, read as if it were the last.

    Each residual stream `blocks.{l}.hook_resid_{where}` goes through
    `model.readout` (the model's own final norm and LM head), compiled once
    per length bucket. The last layer's `"post"` entry equals the trace's
    `hook_logits`.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.*.hook_resid_{where}`.
        where: which streams of each block: any of `"pre"`, `"mid"`,
            `"post"`, in the order given. Defaults to all three.
        batch: int. Which row of the trace (negative counts from the end).
        positions: positions to read (None: every position). Few positions
            keep memory small on 32k vocabularies.
        memory_budget: bytes one layer's readout may use (default the free
            memory); refused before it runs when over it.

    Returns:
        float32 `[num_layers, len(where), P, V]` (`P = T` by default).

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
    pipeline.check_budget(memory_budget)
    chosen = np.arange(tr.token_ids.shape[1]) if positions is None else _positions(tr, positions, batch)
    streams = _streams(model, tr, where, batch, chosen)
    return np.stack([[readout_logits(model, rows, memory_budget) for rows in x] for _, x in streams]).astype(
        np.float32, copy=False
    )


@keyword_only_since("k", "where", "batch", "positions", "tokenizer")
def logit_lens(
    model,
    tr,
    *,
    k: int = 5,
    where: str | Sequence[str] = WHERE,
    batch: int = 0,
    positions: Sequence[int] | None = None,
    tokenizer=None,
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """The top-`k` next-token predictions of every residual stream.

    Reads each residual stream through `model.readout` (see
    `logit_lens_logits`) and keeps, per layer, stream and position, the `k`
    most probable tokens. Top-k and softmax run on the device, so only `k`
    values per position come back (fine for 32k vocabularies).

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.*.hook_resid_{where}`.
        k: int. How many top tokens per row. Defaults to 5.
        where: any of `"pre"`, `"mid"`, `"post"`. Defaults to all three.
        batch: int. Which row of the trace.
        positions: positions to keep (None: every real, non-padding token).
        tokenizer: optional `Phi3Tokenizer`; adds a `top_strings` column.
        memory_budget: bytes one layer's readout may use (default the free
            memory); refused before it runs when over it.

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
    k = check_in_range("k", k, 1, model.vocabulary_size + 1)
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    pipeline.check_budget(memory_budget)
    keep = _positions(tr, positions, batch)
    top = _top_k(model, k)
    rows = []
    for layer, x in _streams(model, tr, where, batch, keep):
        probs, ids = (
            np.stack(a) for a in zip(*(read_rows(model, ("lens.top_k", k), top, rows, memory_budget) for rows in x))
        )
        for w_index, w in enumerate(where):
            for p_index, p in enumerate(keep):
                rows.append((layer, w, int(p), ids[w_index, p_index].tolist(), probs[w_index, p_index].tolist()))
    table = pd.DataFrame(rows, columns=["layer", "where", "position", "top_tokens", "top_probs"])
    if tr.tokens is not None:
        table.insert(3, "token", [tr.tokens[batch][p] for p in table["position"]])
    if tokenizer is not None:
        table["top_strings"] = [
            tokenizer.display_tokens(ids, beyond_vocabulary="<unused {}>") for ids in table["top_tokens"]
        ]
    table.attrs.update(k=k, batch=batch)
    return table


@keyword_only_since("position", "where", "batch")
def answer_curve(
    model,
    tr,
    answer: int,
    *,
    position: int = -1,
    where: str | Sequence[str] = WHERE,
    batch: int = 0,
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """Probability and rank of one token through the layers, at one position.

    Args:
        model: the `Phi3Backbone` that produced `tr`.
        tr: a `Trace` holding `blocks.*.hook_resid_{where}`.
        answer: int. The token id to follow.
        position: int. The position read (negative counts from the end).
        where: any of `"pre"`, `"mid"`, `"post"`. Defaults to all three.
        batch: int. Which row of the trace.
        memory_budget: bytes the readout may use (default the free memory);
            refused before it runs when over it.

    Returns:
        A DataFrame with one row per (layer, where), in residual order:
        `layer`, `where`, `probability`, `rank` (1 = the most likely token).

    Example:
    ```python
    curve = phi3lab.analysis.answer_curve(model, tr, answer=tok.to_single_token("Mary"))
    curve[curve["rank"] == 1].head(1)     # the first stream that predicts it
    ```
    """
    check_trace(model, tr)
    where = _check_where(where)
    batch = check_index("batch", batch, tr.token_ids.shape[0], "batch row")
    position = check_index("position", position, tr.token_ids.shape[1], "position")
    answer = int(check_token("answer", answer, model.vocabulary_size, 1)[0])
    pipeline.check_budget(memory_budget)
    layers = range(model.num_layers)
    x = np.stack([x[:, 0] for _, x in _streams(model, tr, where, batch, np.array([position]))])  # [L, W, D]
    rows = x.reshape(-1, x.shape[-1])
    probability, rank = read_rows(model, ("lens.answer",), _answer_curve(model), rows, memory_budget, np.int32(answer))
    return pd.DataFrame(
        {
            "layer": np.repeat(np.asarray(layers), len(where)),
            "where": list(where) * model.num_layers,
            "probability": np.asarray(probability, np.float64),
            "rank": np.asarray(rank, np.int64),
        }
    )
