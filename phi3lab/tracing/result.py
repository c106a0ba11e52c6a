"""`Trace`: the host-side result of `phi3lab.trace`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from phi3lab.checks import check_index
from phi3lab.errors import bad_argument, close_matches
from phi3lab.tracing.names import block_name
from phi3lab.tracing.rope import RotaryDescription


class Trace(Mapping):
    """Captured activations of one run, by hook name, as NumPy arrays.

    A read-only mapping (`tr["blocks.3.attn.hook_pattern"]`) with helpers.

    Attributes:
        names: every captured name, in forward order.
        token_ids: int `[B, T]`.
        padding_mask: bool `[B, T]` (True for real tokens).
        tokens: display strings per row (`[B][T]`) when a tokenizer was
            given, else None.
        output: the backbone's output (final normalized hidden states).
        rope: `RotaryDescription` of the rotary embedding in this run.
        num_layers, num_query_heads, num_key_value_heads: model shape.
        query_window: `(start, stop)` query rows held by the attention maps,
            or None for all rows.
        attention_heads: the query heads held by the attention maps (in
            that order), or None for all heads.
        prompt_length: for a generation trace, how many positions (from the
            left, padding included) were the prompt; None for a plain trace.
    """

    def __init__(self, arrays, *, token_ids, padding_mask, tokens, output, rope, model,
                 query_window=None, attention_heads=None, prompt_length=None):
        self._arrays = arrays
        self.names = list(arrays)
        self.token_ids = token_ids
        self.padding_mask = padding_mask
        self.tokens = tokens
        self.output = output
        self.rope: RotaryDescription = rope
        self.num_layers = model.num_layers
        self.num_query_heads = model.num_query_heads
        self.num_key_value_heads = model.num_key_value_heads
        self.query_window = query_window
        self.attention_heads = attention_heads
        self.prompt_length = prompt_length

    # === Mapping ===
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            raise KeyError(
                f"{name!r} was not captured in this trace. Captured names close to it: "
                f"{close_matches(name, self.names)}. Capture it with "
                f"phi3lab.trace(..., names=[{name!r}]) (or names=None for everything)."
            ) from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __repr__(self):
        batch, length = self.token_ids.shape
        return f"<Trace batch={batch} positions={length} names={len(self.names)}>"

    # === Helpers ===
    def _layer(self, layer: int) -> int:
        return check_index("layer", layer, self.num_layers, "layer")

    def attention(self, layer: int, head: int | None = None) -> np.ndarray:
        """Attention probabilities `[B, H, Tq, Tk]`, or `[B, Tq, Tk]` for one head."""
        pattern = self[block_name(self._layer(layer), "attn.hook_pattern")]
        if head is None:
            return pattern
        kept = self.attention_heads or tuple(range(self.num_query_heads))
        chosen = check_index("head", head, self.num_query_heads, "query head")
        if chosen not in kept:
            raise bad_argument("head", head, f"one of the captured query heads {list(kept)}")
        return pattern[:, kept.index(chosen)]

    def resid(self, layer: int, where: str = "post") -> np.ndarray:
        """Residual stream `[B, T, D]` before (`"pre"`), between (`"mid"`) or
        after (`"post"`) block `layer`."""
        if where not in ("pre", "mid", "post"):
            raise bad_argument("where", where, '"pre", "mid" or "post"')
        return self[block_name(self._layer(layer), f"hook_resid_{where}")]

    @property
    def logits(self) -> np.ndarray:
        """Next-token logits `[B, T, V]` (`hook_logits`)."""
        return self["hook_logits"]

    def loss(self, per_token: bool = False):
        """Next-token cross-entropy of the traced tokens (from `hook_logits`).

        Position `t` predicts token `t + 1`; pairs where either token is
        padding do not count.

        Args:
            per_token: bool. Return the loss of every position, float64
                `[B, T - 1]` with NaN where it does not count, instead of the
                mean over the positions that count.

        Example:
        >>> tr = phi3lab.trace(model, ids, names="hook_logits")
        >>> tr.loss(), tr.loss(per_token=True)[0, :5]
        """
        logits = np.asarray(self.logits[:, :-1], np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1))
        chosen = np.take_along_axis(shifted, self.token_ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
        losses = log_norm - chosen
        counts = self.padding_mask[:, :-1] & self.padding_mask[:, 1:]
        if per_token:
            return np.where(counts, losses, np.nan)
        return float(losses[counts].mean()) if counts.any() else float("nan")

    def to_pandas(self, name: str, batch: int = 0) -> pd.DataFrame:
        """A tidy per-token table of activation `name` for row `batch`.

        Attention scores/patterns give one row per (head, query, key) with
        both tokens (only the captured heads and query window); every other site gives one row per position with its
        token, the vector's L2 norm, and the values as columns `0, 1, ...`.
        """
        batch = check_index("batch", batch, self.token_ids.shape[0], "batch row")
        values = self[name][batch]
        length = self.token_ids.shape[1]
        tokens = self.tokens[batch] if self.tokens is not None else [str(t) for t in self.token_ids[batch]]
        valid = self.padding_mask[batch]
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            # Respect a query window and a head selection (`trace(queries=,
            # heads=)`): rows are labelled with true positions and heads.
            head_ids = np.asarray(self.attention_heads or range(values.shape[0]))
            start, stop = self.query_window or (0, length)
            heads, queries, keys = np.meshgrid(
                head_ids, np.arange(start, stop), np.arange(length), indexing="ij"
            )
            table = pd.DataFrame({
                "head": heads.ravel(), "query": queries.ravel(), "key": keys.ravel(),
                "query_token": np.asarray(tokens, object)[queries.ravel()],
                "key_token": np.asarray(tokens, object)[keys.ravel()],
                "value": values.ravel(),
            })
            return table[np.asarray(valid)[table["query"]] & np.asarray(valid)[table["key"]]].reset_index(drop=True)
        flat = values.reshape(length, -1)
        table = pd.DataFrame(flat, columns=[str(i) for i in range(flat.shape[1])])
        table.insert(0, "norm", np.linalg.norm(flat.astype(np.float64), axis=-1))
        table.insert(0, "token", tokens)
        table.insert(0, "position", np.arange(length))
        return table[np.asarray(valid)].reset_index(drop=True)
