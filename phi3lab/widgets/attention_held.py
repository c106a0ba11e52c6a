"""`HeldAttention`: what a trace holds of its attention maps, for one batch row."""

from __future__ import annotations

import numpy as np

from phi3lab.checks import check_index
from phi3lab.errors import bad_argument
from phi3lab.model.attention import key_value_heads
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import as_trace, blank_infinite, position_labels, prompt_length


class HeldAttention:
    """The layers, query rows and heads whose attention a trace holds.

    Memory-aware traces hold patterns of some layers only, windowed traces
    (`phi3lab.trace(..., queries=, heads=)`) some query rows and heads;
    views over them offer what is held and say what is not.

    Args:
        trace: a `phi3lab.Trace` holding `blocks.*.attn.hook_pattern` for
            at least one layer.
        batch: int. Which row of the trace.
        tokens: optional display strings, one per position.
    """

    def __init__(self, trace, batch: int = 0, tokens=None):
        self.trace = trace = as_trace(trace)
        self.batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        self.length = trace.token_ids.shape[1]
        self.group_size = trace.num_query_heads // trace.num_key_value_heads
        self.labels = position_labels(trace, self.batch, tokens)
        self.prompt_length = prompt_length(trace)
        self.query_rows = range(*trace.query_window) if trace.query_window is not None else range(self.length)
        self.heads = (
            list(trace.attention_heads) if trace.attention_heads is not None else list(range(trace.num_query_heads))
        )
        self.layers = [l for l in range(trace.num_layers) if block_name(l, "attn.hook_pattern") in trace]
        if not self.layers:
            raise KeyError(
                f"{type(self).__name__} needs 'blocks.*.attn.hook_pattern' for at least one layer. "
                "Capture it with phi3lab.trace(model, ids, names=['blocks.*.attn.hook_pattern', "
                "'blocks.*.attn.hook_attn_scores']) (or names=None)."
            )
        self.has_scores = all(block_name(l, "attn.hook_attn_scores") in trace for l in self.layers)

    def check_layer(self, layer) -> int:
        if layer not in self.layers:
            raise bad_argument("layer", layer, f"a layer whose pattern the trace holds: {self.layers}")
        return layer

    def check_head(self, head) -> int:
        if head not in self.heads or isinstance(head, bool):
            raise bad_argument("head", head, f"one of the captured query heads {self.heads}")
        return head

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads."""
        return int(key_value_heads(self.trace.num_query_heads, self.trace.num_key_value_heads)[head])

    def held_values(self, layer: int, head: int, values: str) -> np.ndarray:
        """The held `[rows, T]` matrix of one head, rows being `query_rows`:
        `values="pattern"` probabilities, `"scores"` with `-inf` as NaN."""
        if values == "pattern":
            return self.trace.attention(layer, head)[self.batch]
        scores = self.trace[block_name(layer, "attn.hook_attn_scores")][self.batch, self.heads.index(head)]
        return blank_infinite(scores)

    def missing(self) -> str:
        """What a windowed trace does not hold ('' when it holds everything)."""
        parts = []
        if len(self.query_rows) < self.length:
            parts.append(
                f"only queries {self.query_rows.start}–{self.query_rows.stop - 1} were captured (trace(queries=...))"
            )
        if len(self.heads) < self.trace.num_query_heads:
            parts.append(f"only heads {self.heads} of {self.trace.num_query_heads} were captured (trace(heads=...))")
        return "; ".join(parts)
