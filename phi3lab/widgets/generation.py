"""`GenerationView`: what each generated token looked at."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np

from phi3lab.checks import check_in_range, is_int
from phi3lab.errors import bad_argument
from phi3lab.tracing.names import block_name
from phi3lab.widgets.common import (
    HIGHLIGHT,
    Scale,
    View,
    as_trace,
    escape,
    new_figure,
    position_labels,
)

MEAN = "mean"  # the "mean over layers / heads" choice


class GenerationView(View):
    """A token strip coloured by the attention of one generated token.

    Pick a generated token, a layer (or the mean over the captured layers)
    and a head (or the mean over heads): every earlier token is coloured by
    how much the chosen token's query attended to it. Prompt tokens are
    plain, generated ones underlined; the chosen one is outlined.

    Args:
        trace: what `phi3lab.generate(..., names=...)` returns for one
            prompt (a `Generation`, or its `.trace`) holding
            `blocks.*.attn.hook_pattern`; a plain trace works with
            `prompt_length=`.
        position: int. The generated position shown first (default: the
            first generated token).
        layer, head: int, or `"mean"` for the mean over the captured
            layers / all heads. Defaults to the means.
        prompt_length: int. Overrides `trace.prompt_length`.
        tokens: optional display strings, one per position.

    Example:
    ```python
    g = phi3lab.generate(model, "When Mary and John went to the store, John gave a drink to", tokenizer=tok,
                         max_new_tokens=4, names="blocks.*.attn.hook_pattern")
    phi3lab.widgets.GenerationView(g)
    ```
    """

    css_class = "phi3lab-generation"

    def __init__(
        self,
        trace,
        *,
        position: int | None = None,
        layer: int | str = MEAN,
        head: int | str = MEAN,
        prompt_length: int | None = None,
        tokens=None,
    ):
        self.trace = trace = as_trace(trace)
        self.length = trace.token_ids.shape[1]
        prompt = trace.prompt_length if prompt_length is None else prompt_length
        if prompt is None:
            raise bad_argument(
                "prompt_length",
                prompt_length,
                "an int (this trace has no prompt_length: it is not from phi3lab.generate)",
            )
        self.prompt_length = check_in_range("prompt_length", prompt, 1, self.length)
        self.layers = [l for l in range(trace.num_layers) if block_name(l, "attn.hook_pattern") in trace]
        if not self.layers:
            raise KeyError(
                "GenerationView needs 'blocks.*.attn.hook_pattern': generate with names='blocks.*.attn.hook_pattern'."
            )
        if trace.query_window is not None or trace.attention_heads is not None:
            raise ValueError("GenerationView needs whole attention maps (no `queries=`/`heads=` in the trace).")
        self.labels = position_labels(trace, 0, tokens)
        generated = list(range(self.prompt_length, self.length))
        position = (
            generated[0] if position is None else check_in_range("position", position, self.prompt_length, self.length)
        )
        if layer != MEAN and layer not in self.layers:
            raise bad_argument("layer", layer, f'"mean" or a captured layer {self.layers}')
        if head != MEAN and (not is_int(head) or not 0 <= head < trace.num_query_heads):
            raise bad_argument("head", head, f'"mean" or a query head in [0, {trace.num_query_heads})')

        self.position_select = widgets.Dropdown(
            options=[(f"{p} {self.labels[p]}", p) for p in generated], value=position, description="Generated token"
        )
        self.layer_select = widgets.Dropdown(
            options=[("mean", MEAN)] + [(f"layer {l}", l) for l in self.layers], value=layer, description="Layer"
        )
        self.head_select = widgets.Dropdown(
            options=[("mean", MEAN)] + [(f"head {h}", h) for h in range(trace.num_query_heads)],
            value=head,
            description="Head",
        )
        for control, css in (
            (self.position_select, "phi3lab-position"),
            (self.layer_select, "phi3lab-layer"),
            (self.head_select, "phi3lab-head"),
        ):
            control.add_class(css)
            control.observe(lambda _: self._refresh(), names="value")
        self.strip = widgets.HTML()
        self.strip.add_class("phi3lab-strip")
        self._refresh()
        self.widget = widgets.VBox(
            [widgets.HBox([self.position_select, self.layer_select, self.head_select]), self.strip]
        )
        self.widget.add_class(self.css_class)

    # === State ===
    @property
    def position(self) -> int:
        return self.position_select.value

    def weights(self) -> np.ndarray:
        """Attention of the selected token over positions `0 .. position`,
        float64, for the selected layer and head (or their means)."""
        layers = self.layers if self.layer_select.value == MEAN else [self.layer_select.value]
        rows = np.stack([self.trace.attention(l)[0, :, self.position, : self.position + 1] for l in layers])
        rows = rows.astype(np.float64)  # [layers, heads, keys]
        if self.head_select.value != MEAN:
            rows = rows[:, [self.head_select.value]]
        return rows.mean(axis=(0, 1))

    def title(self) -> str:
        layer = "mean over layers" if self.layer_select.value == MEAN else f"layer {self.layer_select.value}"
        head = "mean over heads" if self.head_select.value == MEAN else f"head {self.head_select.value}"
        return f"What generated token {self.position} {self.labels[self.position]!r} looked at ({layer}, {head})"

    # === Rendering ===
    def _refresh(self) -> None:
        weights = self.weights()
        scale = Scale.magnitude(weights)
        spans = []
        for p, w in enumerate(weights):
            background, text = scale.css(w)
            kind = "prompt" if p < self.prompt_length else "generated"
            border = f"2px solid {HIGHLIGHT}" if p == self.position else "1px solid #ccc"
            underline = "underline" if kind == "generated" else "none"
            spans.append(
                f'<span class="phi3lab-weight phi3lab-{kind}" data-position="{p}" data-weight="{w:.6g}" '
                f'title="position {p} ({kind}): {w:.4f}" style="background:{background};color:{text};'
                f"border:{border};text-decoration:{underline};padding:1px 3px;margin:1px;"
                f'display:inline-block;font-family:monospace">{escape(self.labels[p])}</span>'
            )
        self.strip.value = (
            f"<div class='phi3lab-strip-title'><b>{escape(self.title())}</b> "
            f"<small>(colour: probability, 0 to {scale.vmax:.3g}; generated tokens underlined)</small>"
            f"</div><div style='line-height:1.9'>{''.join(spans)}</div>"
        )

    def _figures(self):
        return []

    def _html(self):
        return [self.strip.value]

    def _draw_static(self):
        weights = self.weights()
        figure = new_figure(max(6.0, 0.45 * len(weights)), 1.9)
        ax = figure.add_subplot()
        ax.imshow(weights[None], aspect="auto", interpolation="nearest", **Scale.magnitude(weights).matplotlib())
        ax.set_yticks([])
        ax.set_xticks(range(len(weights)))
        ax.set_xticklabels([self.labels[p] for p in range(len(weights))], rotation=90, fontsize=7)
        for tick, p in zip(ax.get_xticklabels(), range(len(weights))):
            tick.set_color(HIGHLIGHT if p == self.position else ("black" if p < self.prompt_length else "#1f77b4"))
        ax.axvline(self.prompt_length - 0.5, color="black", linewidth=1)
        ax.set_title(self.title() + " — prompt | generated (blue)", fontsize=9, loc="left")
        return figure

    def __repr__(self):
        return (
            f"GenerationView(position={self.position}, layer={self.layer_select.value}, "
            f"head={self.head_select.value}, prompt_length={self.prompt_length}, positions={self.length})"
        )
