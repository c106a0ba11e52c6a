"""Attention heads: grouped-query grouping, behaviour detectors, statistics.

Detectors score each query head by how much attention it puts where a
known mechanism would (the previous token, an earlier copy of the current
token, or the token after that copy: induction). Statistics summarize each
head's pattern (entropy, attention to the first token, distance looked back).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from phi3lab.analysis._common import check_trace, require
from phi3lab.checks import check_index, check_positive_int, check_token_ids, is_int
from phi3lab.deprecation import keyword_only_since
from phi3lab.errors import bad_argument
from phi3lab.model.attention import key_value_heads
from phi3lab.tasks import repeated_tokens
from phi3lab.tracing import Trace
from phi3lab.tracing.interventions import query_heads_sharing
from phi3lab.tracing.names import block_name
from phi3lab.tracing.tracer import trace


def group_heads(model) -> dict[int, list[int]]:
    """Which query heads read each key/value head (grouped-query attention).

    Args:
        model: a `Phi3Backbone` (or a `Trace`: anything with
            `num_query_heads` and `num_key_value_heads`).

    Returns:
        `{kv_head: [query heads]}`, e.g. `{0: [0, 1], 1: [2, 3]}` for 4 query
        and 2 key/value heads.

    Example:
    >>> phi3lab.analysis.group_heads(model)
    {0: [0, 1], 1: [2, 3]}
    """
    return {kv: query_heads_sharing(model, kv) for kv in range(model.num_key_value_heads)}


def _patterns(tr, purpose: str) -> list[np.ndarray]:
    """Every layer's full pattern `[B, Hq, T, T]` as float64."""
    names = [block_name(l, "attn.hook_pattern") for l in range(tr.num_layers)]
    require(tr, names, purpose)
    if getattr(tr, "query_window", None) is not None or getattr(tr, "attention_heads", None) is not None:
        raise ValueError(
            f"{purpose} needs every query row and head of the attention patterns; `tr` holds only "
            f"queries={tr.query_window}, heads={tr.attention_heads}. Trace without `queries`/`heads`."
        )
    return [np.asarray(tr[n], np.float64) for n in names]


def _mean_over(weights: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """Per head, the mean of `weights [B, H, T]` over the `chosen [B, T]` queries."""
    count = chosen.sum()
    if count == 0:
        return np.full(weights.shape[1], np.nan)
    return (weights * chosen[:, None, :]).sum(axis=(0, 2)) / count


def detector_scores(pattern: np.ndarray, token_ids: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Previous-token, duplicate-token and induction scores of one layer.

    Args:
        pattern: `[B, H, T, T]` attention probabilities.
        token_ids: `[B, T]`.
        valid: `[B, T]` bool, True for real tokens.

    Returns:
        `{"previous_token", "duplicate_token", "induction"}`, each `[H]`:
        the attention a query puts on its target keys, averaged over the
        queries that have targets (NaN if none has). Previous token: key
        `t - 1`. Duplicate token: earlier keys `s < t` holding the same
        token. Induction: keys `s < t` right after an earlier copy of the
        query's token (`ids[s - 1] == ids[t]`).
    """
    length = token_ids.shape[1]
    t, s = np.arange(length)[:, None], np.arange(length)[None, :]
    pair_valid = valid[:, :, None] & valid[:, None, :]
    same = (token_ids[:, :, None] == token_ids[:, None, :]) & (s < t) & pair_valid
    previous = (s == t - 1) & pair_valid
    after_copy = np.zeros_like(same)
    after_copy[:, :, 1:] = same[:, :, :-1] & (s[:, 1:] < t) & pair_valid[:, :, 1:]
    scores = {}
    for key, targets in (("previous_token", previous), ("duplicate_token", same), ("induction", after_copy)):
        weights = (pattern * targets[:, None]).sum(-1)
        scores[key] = _mean_over(weights, targets.any(-1))
    return scores


@keyword_only_since("seq_len", "num_sequences", "seed", "bos_token")
def head_scores(
    model,
    tr=None,
    *,
    seq_len: int = 16,
    num_sequences: int = 4,
    seed: int = 0,
    bos_token: int | None = 1,
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """Score every head as a previous-token, duplicate-token and induction head.

    With `tr=None`, `num_sequences` random token sequences of length
    `seq_len`, each repeated twice after a BOS-like first token, are traced
    (see `repeated_tokens`); in the second copy every token has an earlier
    duplicate and a known induction target. With a trace, its own tokens are
    used (any repeated token counts). See `detector_scores` for the
    definitions; every score is in [0, 1].

    Args:
        model: a `Phi3Backbone`.
        tr: a `Trace` holding `blocks.*.attn.hook_pattern`, or None.
        seq_len: int. Random tokens per copy (with `tr=None`).
        num_sequences: int. How many random sequences (with `tr=None`).
        seed: int. Seed of the random tokens.
        bos_token: int or None. First token of each random sequence.
        memory_budget: bytes the trace of the random sequences may use
            (`phi3lab.trace`'s guard; with `tr=None`).

    Returns:
        A DataFrame with `layer`, `head`, `kv_head`, `previous_token`,
        `duplicate_token`, `induction`, one row per query head.

    Example:
    ```python
    scores = phi3lab.analysis.head_scores(model, seq_len=32)
    scores.sort_values("induction", ascending=False).head()
    ```
    """
    if tr is None:
        check_positive_int("seq_len", seq_len)
        check_positive_int("num_sequences", num_sequences)
        if not is_int(seed):
            raise bad_argument("seed", seed, "an int")
        if bos_token is not None:
            check_token_ids("bos_token", bos_token, model.vocabulary_size, ndim=0)
        if 2 * seq_len + (bos_token is not None) > model.max_sequence_length:
            raise bad_argument(
                "seq_len",
                seq_len,
                f"at most {(model.max_sequence_length - (bos_token is not None)) // 2} (each sequence is repeated "
                f"twice{' after bos_token' if bos_token is not None else ''} within max_sequence_length="
                f"{model.max_sequence_length})",
            )
        ids = repeated_tokens(model.vocabulary_size, seq_len, num_sequences, seed, bos_token)
        tr = trace(model, ids, names="blocks.*.attn.hook_pattern", memory_budget=memory_budget)
    check_trace(model, tr)
    valid = np.asarray(tr.padding_mask, bool)
    kv = key_value_heads(model.num_query_heads, model.num_key_value_heads)
    frames = []
    for layer, pattern in enumerate(_patterns(tr, "head_scores")):
        scores = detector_scores(pattern, np.asarray(tr.token_ids), valid)
        frames.append(pd.DataFrame({"layer": layer, "head": np.arange(len(kv)), "kv_head": kv, **scores}))
    return pd.concat(frames, ignore_index=True)


def attention_stats(tr, batch: int | None = None) -> pd.DataFrame:
    """Per-head summaries of the attention patterns of a trace.

    Averaged over real (non-padding) query positions of the chosen rows:
    `entropy` (nats) of each query's distribution over keys;
    `bos_attention`, the weight on the row's first real token; and
    `mean_distance`, the expected `query - key` distance in positions.

    Args:
        tr: a `Trace` holding `blocks.*.attn.hook_pattern`.
        batch: int row, or None to pool every row.

    Returns:
        A DataFrame with `layer`, `head`, `kv_head`, `entropy`,
        `bos_attention`, `mean_distance`.

    Example:
    ```python
    tr = phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern")
    phi3lab.analysis.attention_stats(tr).sort_values("entropy").head()
    ```
    """
    if not isinstance(tr, Trace):
        raise bad_argument("tr", tr, "a phi3lab.Trace (from phi3lab.trace(model, ids))")
    rows = np.arange(tr.token_ids.shape[0])
    if batch is not None:
        rows = rows[[check_index("batch", batch, len(rows), "batch row")]]
    valid = np.asarray(tr.padding_mask, bool)[rows]
    length = valid.shape[1]
    first = np.argmax(valid, axis=1)
    distance = (np.arange(length)[:, None] - np.arange(length)[None, :]).astype(np.float64)
    kv = key_value_heads(tr.num_query_heads, tr.num_key_value_heads)
    frames = []
    for layer, pattern in enumerate(_patterns(tr, "attention_stats")):
        pattern = pattern[rows]
        chosen = valid & (pattern.sum(-1) > 0).any(1)
        logs = np.log(np.where(pattern > 0, pattern, 1.0))
        stats = {
            "entropy": _mean_over(-(pattern * logs).sum(-1), chosen),
            "bos_attention": _mean_over(
                np.take_along_axis(pattern, first[:, None, None, None], axis=-1)[..., 0], chosen
            ),
            "mean_distance": _mean_over((pattern * distance).sum(-1), chosen),
        }
        frames.append(pd.DataFrame({"layer": layer, "head": np.arange(len(kv)), "kv_head": kv, **stats}))
    return pd.concat(frames, ignore_index=True)
