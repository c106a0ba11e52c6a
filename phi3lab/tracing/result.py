"""`Trace`: the host-side result of `phi3lab.trace`."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

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
    """

    def __init__(self, arrays, *, token_ids, padding_mask, tokens, output, rope, model,
                 query_window=None, attention_heads=None):
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
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -self.num_layers <= layer < self.num_layers:
            raise bad_argument("layer", layer, f"an int in [0, {self.num_layers})")
        return int(layer) % self.num_layers

    def attention(self, layer: int, head: int | None = None) -> np.ndarray:
        """Attention probabilities `[B, H, Tq, Tk]`, or `[B, Tq, Tk]` for one head."""
        pattern = self[block_name(self._layer(layer), "attn.hook_pattern")]
        if head is None:
            return pattern
        kept = self.attention_heads or tuple(range(self.num_query_heads))
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)) or head not in kept:
            raise bad_argument("head", head, f"one of the captured query heads {list(kept)}")
        return pattern[:, kept.index(head)]

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

    def to_pandas(self, name: str, batch: int = 0) -> pd.DataFrame:
        """A tidy per-token table of activation `name` for row `batch`.

        Attention scores/patterns give one row per (head, query, key) with
        both tokens (only the captured heads and query window); every other site gives one row per position with its
        token, the vector's L2 norm, and the values as columns `0, 1, ...`.
        """
        rows = self.token_ids.shape[0]
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not -rows <= batch < rows:
            raise bad_argument("batch", batch, f"an int in [0, {rows})")
        batch = int(batch) % rows
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
