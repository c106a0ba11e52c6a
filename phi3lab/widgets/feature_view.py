"""`FeatureView`: a dashboard of one sparse-dictionary feature, with a search box."""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from phi3lab.checks import check_in_range, check_positive_int, is_int
from phi3lab.widgets import feature_data
from phi3lab.widgets.common import (
    Scale,
    View,
    base_layout,
    escape,
    live,
    mpl_labels,
    new_figure,
    vocabulary_labeler,
)
from phi3lab.widgets.tokens import TOKEN_STYLE, draw_tokens, token_spans

RAISED, LOWERED = "#b2182b", "#2166ac"  # the ends of DIVERGING
MAX_SIDE = 256  # the most stored positions a context shows on each side of its top token


class FeatureView(View):
    """One feature of a sparse dictionary: where it fires and what it writes.

    Shows the feature's top-activating contexts (each a window of its
    document, tokens coloured by the feature's activation on one scale for
    all rows, the top token outlined), a histogram of its positive
    activations, its density (the fraction of tokens where it fires), and
    the tokens whose logits its decoder direction raises and lowers most
    through the unembedding. Type another feature id in the search box to
    show it. Statistics of every feature come from one compiled pass over
    the store (`phi3lab.features.summarize`), made when the view is built.

    Args:
        dictionary: a `phi3lab.features.SparseDictionary` (an SAE or a
            transcoder; it is read at its input site).
        model: the `Phi3Backbone` it belongs to: for the logit effects, and
            to collect `store_or_data` when that is not a store. None shows
            no logit effects.
        store_or_data: an `ActivationStore` holding the dictionary's input
            site, or texts / token ids (collected with `model`).
        tokenizer: a `Phi3Tokenizer` (or a list of token strings) to show
            tokens; default the store's.
        feature: the feature shown first (default: the one that fires most).
        contexts: how many top contexts to show.
        before, after: stored positions shown before and after the top token.

    Example:
    ```python
    sae = phi3lab.features.from_preset("phi3lab_tiny_en", "resid_post_2")
    view = phi3lab.widgets.FeatureView(sae, model, texts, tokenizer=tok, feature=91)
    view.show(815)
    ```
    """

    css_class = "phi3lab-feature"

    def __init__(
        self,
        dictionary,
        model,
        store_or_data,
        *,
        tokenizer=None,
        feature: int | None = None,
        contexts: int = 12,
        before: int = 16,
        after: int = 4,
    ):
        from phi3lab.features.summary import store_site, summarize

        store = feature_data.as_store(dictionary, model, store_or_data, tokenizer)
        store_site(dictionary, store)
        self.dictionary, self.model, self.store = dictionary, model, store
        self.count = check_positive_int("contexts", contexts)
        self.before = check_in_range("before", before, 0, MAX_SIDE + 1)
        self.after = check_in_range("after", after, 0, MAX_SIDE + 1)
        self.summary = summarize(dictionary, self.store, top=self.count)
        tokenizer = tokenizer if tokenizer is not None else self.store.tokenizer
        self.labeler = vocabulary_labeler(tokenizer)
        # Model rows past the tokenizer's ids are never trained: left out of the logit effects.
        self.vocabulary = (
            len(tokenizer) if isinstance(tokenizer, (list, tuple)) else getattr(tokenizer, "vocabulary_size", None)
        )
        self.num_features = dictionary.config.d_sae
        if feature is None:
            feature = int(np.argmax(self.summary.counts))
        self._feature = check_in_range("feature", feature, 0, self.num_features)

        self.search = widgets.Text(
            value=str(self._feature),
            description="feature",
            placeholder=f"0 … {self.num_features - 1}",
            continuous_update=False,
            layout=widgets.Layout(width="200px"),
        )
        self.search.add_class("phi3lab-feature-search")
        self.header = widgets.HTML()
        self.header.add_class("phi3lab-feature-header")
        self.text = widgets.HTML()
        self.text.add_class("phi3lab-feature-contexts")
        self.histogram = live(self._histogram_figure())
        self.logits = live(self._logits_figure())
        self._render_text()
        self.search.observe(self._on_search, names="value")
        plots = [widgets.Box([plot], layout=widgets.Layout(width="50%")) for plot in self._figures()]
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.search, self.header]),
                widgets.HBox(plots, layout=widgets.Layout(width="100%")),
                self.text,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.widget.add_class(self.css_class)

    # === State ===
    @property
    def feature(self) -> int:
        return self._feature

    def show(self, feature: int) -> None:
        """Show `feature` (an int in `[0, d_sae)`)."""
        self._feature = check_in_range("feature", feature, 0, self.num_features)
        self.search.value = str(self._feature)
        self._update()

    def contexts(self):
        """The shown feature's top contexts (`feature_data.Context`s), largest first."""
        return feature_data.contexts(
            self.dictionary, self.store, self.summary, self._feature, self.count, self.before, self.after
        )

    def top_tokens(self, n: int = 10) -> tuple[list[int], list[int]]:
        """The ids of the `n` tokens whose logits the feature raises most and
        the `n` it lowers most (empty without a model or a residual-width
        decoder). Ids past the tokenizer's vocabulary are left out."""
        effects = self._effects()
        if effects is None:
            return [], []
        order = np.argsort(effects[: self.vocabulary], kind="stable")
        return order[::-1][:n].tolist(), order[:n].tolist()

    def _effects(self):
        return feature_data.logit_effects(self.model, self.dictionary, self._feature)

    def _on_search(self, change) -> None:
        text = str(change["new"]).strip()
        value = int(text) if text.lstrip("-").isdigit() else None
        if not is_int(value) or not 0 <= value < self.num_features:
            self.header.value = (
                f"<span class='phi3lab-feature-error' style='color:{RAISED}'>{escape(text)!r} is not a feature: "
                f"type an id in 0 … {self.num_features - 1}</span>"
            )
            return
        if value != self._feature:
            self._feature = value
            self._update()
        else:
            self._render_header()  # the same id retyped: clear an error from the header

    def _update(self) -> None:
        self._render_text()
        for widget, figure in ((self.histogram, self._histogram_figure()), (self.logits, self._logits_figure())):
            with widget.batch_update():
                widget.data[0].update(figure.data[0].to_plotly_json(), overwrite=True)
                widget.layout.title.text = figure.layout.title.text

    # === Rendering ===
    def _scale(self, shown) -> Scale:
        return Scale.magnitude([c.activations.max() for c in shown] or [1.0])

    def _render_header(self) -> None:
        summary, f = self.summary, self._feature
        self.header.value = (
            f"<span data-feature='{f}'><b>feature {f}</b> of {self.num_features} · fires on "
            f"{summary.counts[f]} of {summary.rows} tokens (density {summary.density[f]:.3%}) · "
            f"max activation {summary.top_values[f, 0]:.4g} · {escape(summary.site)}</span>"
        )

    def _render_text(self) -> None:
        self._render_header()
        f = self._feature
        shown = self.contexts()
        scale = self._scale(shown)
        rows = []
        for c in shown:
            spans = token_spans(
                [self.labeler(i) for i in c.token_ids],
                c.activations,
                scale,
                f"feature {f}",
                selected=c.peak,
                first_position=int(c.positions[0]),
            )
            rows.append(
                f"<div class='phi3lab-feature-context' data-doc='{c.doc}' "
                f"data-position='{int(c.positions[c.peak])}' style='line-height:2.1'>"
                f"<span style='color:#666;font-size:11px'>{c.activations[c.peak]:.3g} · doc {c.doc}</span> "
                f"{spans}</div>"
            )
        empty = "<i>this feature never fires on the store's tokens</i>"
        self.text.value = (
            f"{TOKEN_STYLE}<div class='phi3lab-tokview'><b>Top contexts of feature {f}</b>"
            f"{''.join(rows) or empty}</div>"
        )

    def _histogram_figure(self) -> go.Figure:
        f, summary = self._feature, self.summary
        counts = summary.histogram[f]
        used = np.flatnonzero(counts)
        lo, hi = (used[0], used[-1] + 1) if len(used) else (0, 1)
        edges = summary.edges[lo : hi + 1]
        figure = go.Figure(
            go.Bar(
                x=np.sqrt(edges[:-1] * edges[1:]),
                y=counts[lo:hi],
                width=np.diff(edges),
                marker_color=RAISED,
                hovertemplate="activation ≈ %{x:.3g}<br>%{y} tokens<extra></extra>",
            )
        )
        figure.update_layout(
            **base_layout(f"Activations of feature {f} where it fires", height=300),
            xaxis=dict(type="log", title="activation"),
            yaxis=dict(title="tokens"),
            bargap=0.05,
        )
        return figure

    def _logits_figure(self) -> go.Figure:
        raised, lowered = self.top_tokens()
        effects = self._effects()
        ids = lowered[::-1] + raised[::-1] if effects is not None else []
        figure = go.Figure(
            go.Bar(
                x=[float(effects[i]) for i in ids],
                y=[f"{escape(self.labeler(i))} ({i})" for i in ids],
                orientation="h",
                marker_color=[RAISED if effects[i] > 0 else LOWERED for i in ids],
                hovertemplate="%{y}: %{x:.3g}<extra></extra>",
            )
        )
        figure.update_layout(
            **base_layout(f"Logits feature {self._feature} raises and lowers", height=300),
            xaxis=dict(title="logit per unit of activation"),
            yaxis=dict(type="category", automargin=True),
        )
        return figure

    def _figures(self):
        return [self.histogram] + ([self.logits] if self._effects() is not None else [])

    def _html(self):
        return [self.header.value, self.text.value]

    def _draw_static(self):
        shown = self.contexts()
        per_line = self.before + self.after + 1
        figure = new_figure(13, 3.6 + 0.36 * max(len(shown), 1))
        grid = figure.add_gridspec(2, 2, height_ratios=[2.6, 0.36 * max(len(shown), 1)])
        bars, effects_ax = figure.add_subplot(grid[0, 0]), figure.add_subplot(grid[0, 1])
        text_ax = figure.add_subplot(grid[1, :])
        summary, f = self.summary, self._feature
        counts = summary.histogram[f]
        if counts.any():
            used = np.flatnonzero(counts)
            edges = summary.edges[used[0] : used[-1] + 2]
            bars.stairs(counts[used[0] : used[-1] + 1], edges, fill=True, color=RAISED)
            bars.set_xscale("log")
        mpl_labels(
            bars, f"Feature {f}: density {summary.density[f]:.3%} of {summary.rows} tokens", "activation", "tokens"
        )
        raised, lowered = self.top_tokens(8)
        effects = self._effects()
        if effects is not None:
            ids = lowered[::-1] + raised[::-1]
            effects_ax.barh(
                range(len(ids)), [effects[i] for i in ids], color=[RAISED if effects[i] > 0 else LOWERED for i in ids]
            )
            effects_ax.set_yticks(range(len(ids)), [self.labeler(i)[:14] for i in ids], fontsize=7)
        mpl_labels(effects_ax, "Logits it raises and lowers (unembedding)", "logit per unit", "")
        text_ax.set_xlim(0, per_line)
        text_ax.set_ylim(max(len(shown), 1), -0.2)
        text_ax.axis("off")
        text_ax.set_title(f"Top contexts (colour: activation of feature {f})", fontsize=10, loc="left")
        scale = self._scale(shown)
        for line, c in enumerate(shown):
            draw_tokens(
                text_ax,
                [self.labeler(i) for i in c.token_ids],
                c.activations,
                scale,
                per_line,
                selected=c.peak,
                first_line=line,
            )
        return figure

    def __repr__(self):
        return (
            f"FeatureView(feature {self._feature} of {self.num_features}, site={self.summary.site!r}, "
            f"{self.summary.rows} tokens)"
        )
