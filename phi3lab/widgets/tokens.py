"""`TokenView`: the text with each token coloured by a per-token value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import ipywidgets as widgets
import numpy as np

from phi3lab.analysis.attribution import next_token_attribution, next_token_mask
from phi3lab.checks import check_in_range, check_index
from phi3lab.errors import bad_argument
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import (
    BLANK,
    GENERATED,
    HIGHLIGHT,
    Scale,
    View,
    as_trace,
    escape,
    new_figure,
    position_labels,
    prompt_length,
)

# Scoped to the view: a token shows its value in a tooltip while hovered.
TOKEN_STYLE = """<style>
.phi3lab-tokview .phi3lab-tok { position: relative; display: inline-block; padding: 1px 3px; margin: 1px;
  border-radius: 3px; font-family: monospace; white-space: pre; cursor: default; border: 1px solid transparent; }
.phi3lab-tokview .phi3lab-tok.generated { border: 1px dashed %(generated)s; }
.phi3lab-tokview .phi3lab-tok.selected { border: 2px solid %(highlight)s; }
.phi3lab-tokview .phi3lab-tip { display: none; position: absolute; left: 0; bottom: 120%%; z-index: 10;
  background: #222; color: #fff; padding: 2px 6px; border-radius: 3px; font-size: 11px; white-space: nowrap; }
.phi3lab-tokview .phi3lab-tok:hover .phi3lab-tip { display: block; }
.phi3lab-tokview .phi3lab-legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
  border: 1px solid #888; margin: 0 6px; }
</style>""" % dict(generated=GENERATED, highlight=HIGHLIGHT)


class TokenView(View):
    """Text with each token coloured by a per-token value (loss, an
    attribution, the attention from one token, a neuron's activation).

    Hovering a token shows its position and value. The colour scale follows
    the data's sign: diverging around 0 (blue < 0 < red) when any value is
    negative, sequential from 0 otherwise; positions without a value (NaN:
    the first token's loss, keys after the query) are grey. With several
    rows of values a selector switches between them. When the tokens come
    from generation (`prompt_length`), generated tokens get a dashed border.

    Args:
        tokens: display strings, one per position.
        values: `[T]`, `[rows, T]`, or a mapping name -> `[T]`.
        names: row names for an array `values` (default `row 0`, ...).
        title: a line above the text.
        label: what the values are (shown in the legend), e.g. `"loss (nats)"`.
        prompt_length: int or None. Positions from there on were generated.
        selected: int or None. A position to outline (e.g. the query).

    Example:
    ```python
    phi3lab.widgets.TokenView(["The", " cat", " sat"], [0.1, 2.5, 0.7], label="loss")
    phi3lab.widgets.TokenView.loss(tr)                 # from a trace with hook_logits
    phi3lab.widgets.TokenView.attention(tr, layer=1, head=0, query=-1)
    phi3lab.widgets.TokenView.logit_attribution(model, tr)   # which component predicted each token
    ```
    """

    css_class = "phi3lab-tokens"

    def __init__(
        self,
        tokens: Sequence[str],
        values,
        *,
        names: Sequence[str] | None = None,
        title: str = "",
        label: str = "value",
        prompt_length: int | None = None,
        selected: int | None = None,
    ):
        self.tokens = [str(t) for t in tokens]
        self.rows = _rows(values, names, len(self.tokens))
        self.title, self.label = str(title), str(label)
        self.prompt_length = (
            None if prompt_length is None else check_in_range("prompt_length", prompt_length, 0, len(self.tokens) + 1)
        )
        self.selected = None if selected is None else check_in_range("selected", selected, 0, len(self.tokens))
        names = list(self.rows)
        self.row_select = widgets.Dropdown(
            options=names,
            value=names[0],
            description="Values",
            layout=widgets.Layout(width="auto", display=None if len(names) > 1 else "none"),
        )
        self.row_select.add_class("phi3lab-row")
        self.text = widgets.HTML()
        self.text.add_class("phi3lab-token-text")
        self.row_select.observe(lambda _: self._refresh(), names="value")
        self._refresh()
        self.widget = widgets.VBox([self.row_select, self.text], layout=widgets.Layout(width="100%"))
        self.widget.add_class(self.css_class)

    # === From a trace ===
    @classmethod
    def loss(cls, trace, batch: int = 0, tokens=None) -> "TokenView":
        """Each token coloured by the model's next-token loss on it:
        `-log softmax(logits[t - 1])[ids[t]]` in nats (the first token and
        padding have none). Needs `hook_logits`."""
        trace = as_trace(trace)
        batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        logits = np.asarray(trace.logits[batch], np.float64)
        ids = trace.token_ids[batch]
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        loss = np.full(len(ids), np.nan)
        loss[1:] = log_z[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
        loss[~next_token_mask(trace.padding_mask[batch])] = np.nan
        return cls(
            position_labels(trace, batch, tokens),
            {"next-token loss": loss},
            label="loss (nats)",
            title="Next-token loss of each token (how surprised the model was)",
            prompt_length=prompt_length(trace),
        )

    @classmethod
    def attention(cls, trace, layer: int, head: int, query: int, batch: int = 0, tokens=None) -> "TokenView":
        """What `query` attends to: each token coloured by the attention
        probability from position `query` (negative counts from the end),
        one row per captured head of `layer` (`head` shown first). Keys after
        the query (never attended) and padding are grey."""
        trace = as_trace(trace)
        batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        length = trace.token_ids.shape[1]
        query = check_index("query", query, length, "position")
        rows = range(*trace.query_window) if trace.query_window is not None else range(length)
        if query not in rows:
            raise bad_argument(
                "query",
                query,
                f"a position whose attention row the trace holds: {rows.start}–{rows.stop - 1} (trace(queries=...))",
            )
        heads = list(trace.attention_heads) if trace.attention_heads is not None else list(range(trace.num_query_heads))
        valid = np.asarray(trace.padding_mask[batch], bool)
        values = {}
        for h in [head] + [h for h in heads if h != head]:  # trace.attention checks layer and head
            row = np.array(trace.attention(layer, h)[batch, query - rows.start], np.float64)
            row[query + 1 :] = np.nan
            row[~valid] = np.nan
            values[f"layer {layer} · head {h}"] = row
        labels = position_labels(trace, batch, tokens)
        return cls(
            labels,
            values,
            label="attention probability",
            selected=query,
            title=f"Attention from position {query} ({escape(labels[query])})",
            prompt_length=prompt_length(trace),
        )

    @classmethod
    def logit_attribution(cls, model, trace, batch: int = 0, heads: bool = False, tokens=None) -> "TokenView":
        """Each token coloured by what predicted it: the direct logit
        attribution of each component to the logit the model gave the token
        (`analysis.next_token_attribution`), one row per component (the
        embedding, each attention block or head, each MLP), after a first
        row with the whole logit. Needs what `analysis.decompose_resid` does."""
        trace = as_trace(trace)
        table = next_token_attribution(model, trace, batch=batch, heads=heads)
        positions = list(range(trace.token_ids.shape[1]))
        values = {"logit of the token": table.attrs["logit"]}
        values |= {name: row for name, row in zip(table["component"], table[positions].to_numpy(np.float64))}
        return cls(
            position_labels(trace, batch, tokens),
            values,
            label="direct logit attribution",
            title="What wrote each token's logit (at the position before it)",
            prompt_length=prompt_length(trace),
        )

    @classmethod
    def neurons(
        cls, trace, layer: int, neurons: int | Sequence[int], batch: int = 0, tokens=None, where: str = "post"
    ) -> "TokenView":
        """Each token coloured by MLP neuron activations of `layer`
        (`blocks.{layer}.mlp.hook_{where}`, `where` one of "pre", "post"),
        one row per neuron."""
        trace = as_trace(trace)
        batch = check_index("batch", batch, trace.token_ids.shape[0], "batch row")
        if where not in ("pre", "post"):
            raise bad_argument("where", where, '"pre" or "post"')
        acts = trace[block_name(trace._layer(layer), f"mlp.hook_{where}")][batch]
        chosen = [neurons] if np.ndim(neurons) == 0 else list(neurons)
        if not chosen:
            raise bad_argument("neurons", neurons, "a neuron index or a non-empty list of them")
        values = {
            f"layer {layer} · neuron {n}": np.asarray(
                acts[:, check_in_range("neurons", n, 0, acts.shape[-1])], np.float64
            )
            for n in chosen
        }
        return cls(
            position_labels(trace, batch, tokens),
            values,
            label=f"activation (mlp.hook_{where})",
            title=f"MLP neuron activations, layer {layer}",
            prompt_length=prompt_length(trace),
        )

    # === State ===
    @property
    def row(self) -> str:
        return self.row_select.value

    @property
    def current(self) -> np.ndarray:
        """The values shown now `[T]`."""
        return self.rows[self.row]

    def scale(self) -> Scale:
        values = self.current
        if np.any(values[np.isfinite(values)] < 0):
            return Scale.signed(values)
        return Scale.magnitude(values)

    # === Rendering ===
    def _refresh(self) -> None:
        scale = self.scale()
        spans = token_spans(
            self.tokens, self.current, scale, self.label, prompt_length=self.prompt_length, selected=self.selected
        )
        self.text.value = (
            f"{TOKEN_STYLE}<div class='phi3lab-tokview'>"
            + (f"<div style='margin-bottom:4px'><b>{self.title}</b></div>" if self.title else "")
            + f"<div style='line-height:2.1'>{spans}</div>{self._legend(scale)}</div>"
        )

    def _legend(self, scale: Scale) -> str:
        steps = np.linspace(scale.vmin, scale.vmax, 9)
        gradient = ", ".join(scale.css(v)[0] for v in steps)
        generated = (
            f" · <span style='border:1px dashed {GENERATED};padding:0 3px'>generated</span> after "
            f"{self.prompt_length} prompt tokens"
            if self.prompt_length is not None
            else ""
        )
        return (
            f"<div class='phi3lab-legend-row' style='font-size:12px;margin-top:4px'>{escape(self.label)} "
            f"({escape(self.row)}): {scale.vmin:.3g}<span class='phi3lab-legend' "
            f"style='background:linear-gradient(to right, {gradient})'></span>{scale.vmax:.3g}{generated}</div>"
        )

    def _figures(self):
        return []

    def _html(self):
        return [self.text.value]

    def _draw_static(self):
        per_line = 16
        lines = -(-len(self.tokens) // per_line)
        figure = new_figure(12, 0.9 + 0.32 * lines)
        ax = figure.subplots()
        ax.set_xlim(0, per_line)
        ax.set_ylim(lines, -0.2)
        ax.axis("off")
        scale = self.scale()
        draw_tokens(ax, self.tokens, self.current, scale, per_line, self.prompt_length, self.selected)
        ax.set_title(
            f"{self.title or 'Tokens'} · {self.label} ({self.row}): {scale.vmin:.3g} to {scale.vmax:.3g}",
            fontsize=10,
            loc="left",
        )
        return figure

    def __repr__(self):
        return f"TokenView({len(self.tokens)} tokens, rows={list(self.rows)}, shown={self.row!r})"


def _rows(values, names, length: int) -> dict[str, np.ndarray]:
    """Value rows by name, each a float64 `[length]`."""
    if isinstance(values, Mapping):
        if names is not None:
            raise bad_argument("names", names, "None when `values` is a mapping (its keys name the rows)")
        items = [(str(k), v) for k, v in values.items()]
    else:
        array = np.asarray(values, dtype=object if np.ndim(values) == 0 else None)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise bad_argument("values", f"an array of shape {array.shape}", f"[T] or [rows, T] with T = {length}")
        names = [f"row {i}" for i in range(len(array))] if names is None else [str(n) for n in names]
        if len(names) != len(array):
            raise bad_argument("names", f"{len(names)} names", f"one name per row of values ({len(array)})")
        items = list(zip(names, array))
    if not items:
        raise bad_argument("values", values, "at least one row of per-token values")
    rows = {}
    for name, row in items:
        try:
            row = np.asarray(row, np.float64)
        except (TypeError, ValueError):
            raise bad_argument("values", f"row {name!r}", "numbers") from None
        if row.shape != (length,):
            raise bad_argument("values", f"row {name!r} of shape {row.shape}", f"one value per token: ({length},)")
        rows[name] = row
    return rows


# === Rendering, shared with other views (FeatureView's contexts) ===
def _generated(position: int, prompt_length: int | None) -> bool:
    return prompt_length is not None and position >= prompt_length


def token_spans(
    tokens: Sequence[str],
    values: np.ndarray,
    scale: Scale,
    label: str,
    *,
    prompt_length: int | None = None,
    selected: int | None = None,
    first_position: int = 0,
) -> str:
    """HTML: one coloured `<span>` per token with a tooltip of its value
    (styled by `TOKEN_STYLE` inside a `.phi3lab-tokview`); positions shown
    count from `first_position`."""
    spans = []
    for p, (token, value) in enumerate(zip(tokens, values)):
        if np.isfinite(value):
            background, text = scale.css(value)
            shown = f"{value:.4g}"
        else:
            background, text, shown = BLANK, "#000000", "no value"
        generated = _generated(p, prompt_length)
        classes = "phi3lab-tok" + (" generated" if generated else "") + (" selected" if p == selected else "")
        tip = f"{p + first_position} {escape(token)} · {escape(label)}: {shown}"
        tip += " · generated" if generated else ""
        spans.append(
            f'<span class="{classes}" data-position="{p + first_position}" data-value="{value:.6g}" '
            f'style="background:{background};color:{text}">{escape(token)}'
            f'<span class="phi3lab-tip">{tip}</span></span>'
        )
        if prompt_length is not None and p == prompt_length - 1 and p < len(tokens) - 1:
            spans.append(
                f'<span class="phi3lab-boundary" style="color:{GENERATED};font-weight:bold" '
                'title="generated from here">▏</span>'
            )
    return "".join(spans)


def draw_tokens(
    ax,
    tokens: Sequence[str],
    values: np.ndarray,
    scale: Scale,
    per_line: int,
    prompt_length: int | None = None,
    selected: int | None = None,
    first_line: int = 0,
) -> None:
    """Draw tokens as coloured boxes on a matplotlib `ax` whose x axis spans
    `[0, per_line]` and whose y axis counts lines downwards, `per_line`
    tokens a line from line `first_line` on."""
    for p, (token, value) in enumerate(zip(tokens, values)):
        background = scale.css(value)[0] if np.isfinite(value) else BLANK
        text = scale.css(value)[1] if np.isfinite(value) else "#000000"
        generated = _generated(p, prompt_length)
        edge = HIGHLIGHT if p == selected else (GENERATED if generated else "none")
        ax.text(
            p % per_line + 0.05,
            first_line + p // per_line + 0.5,
            token[:10],
            fontsize=8,
            family="monospace",
            color=text,
            va="center",
            bbox=dict(
                boxstyle="round,pad=0.2", fc=background, ec=edge, ls="--" if generated and p != selected else "-"
            ),
        )
