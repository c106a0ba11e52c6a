"""Linear probes and contrast (steering) vectors over collected activations.

`probe` fits a scikit-learn classifier (logistic regression) or regressor
(ridge) on standardized activations and reports its held-out score and its
direction, mapped back to the model's own basis (the standardization undone),
so the direction can be added to the residual stream with `phi3lab.hooks.add`.
`probe_sweep` fits one probe per site; `contrast_vector` is the difference of
the mean activations of two corpora.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from phi3lab.checks import check_choice
from phi3lab.errors import bad_argument
from phi3lab.tracing.names import split_name

KINDS = ("logistic", "linear")


def _features(store_or_arrays, site: str | None) -> np.ndarray:
    """Rows `[N, D]` of `site` in a store, or the array given."""
    from phi3lab.activations import ActivationStore

    if isinstance(store_or_arrays, ActivationStore):
        if site is None:
            raise bad_argument("site", site, f"the hook name to probe, one of {store_or_arrays.names}")
        array = store_or_arrays.to_numpy(site)
    else:
        array = np.asarray(store_or_arrays)
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.floating) or len(array) < 2:
        raise bad_argument(
            "store_or_arrays",
            f"array of shape {array.shape}, dtype {array.dtype}",
            "an ActivationStore or floats [N, D]",
        )
    return array.reshape(len(array), -1).astype(np.float64)


def _labels(labels, rows: int, kind: str) -> np.ndarray:
    values = np.asarray(labels)
    if values.shape != (rows,):
        raise bad_argument("labels", f"array of shape {values.shape}", f"one label per row, shape ({rows},)")
    if kind == "logistic" and len(np.unique(values)) != 2:
        raise bad_argument("labels", f"{len(np.unique(values))} classes", "exactly two classes for kind='logistic'")
    if kind == "linear" and not np.issubdtype(values.dtype, np.number):
        raise bad_argument("labels", f"dtype {values.dtype}", "numbers for kind='linear'")
    return values


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """A fitted linear probe.

    Attributes:
        site: the hook name probed (None for arrays given directly).
        kind: `"logistic"` (score: accuracy) or `"linear"` (score: R^2).
        train_score, test_score: scores on the training and held-out rows.
        direction: `[D]` unit vector in the model's basis (the probe's
            weights with the standardization undone): adding it moves the
            prediction towards the larger label (True, 1) or larger values.
        weights, bias: the probe on raw activations: `x @ weights + bias`
            is the logit (or the prediction).
        estimator: the fitted scikit-learn pipeline (scaler and model).
    """

    site: str | None
    kind: str
    train_score: float
    test_score: float
    train_size: int
    test_size: int
    direction: np.ndarray
    weights: np.ndarray
    bias: float
    estimator: Any

    def score(self, store_or_arrays, labels, site: str | None = None) -> float:
        """The probe's accuracy (or R^2) on other rows, e.g. held-out names."""
        features = _features(store_or_arrays, site or self.site)
        return float(self.estimator.score(features, _labels(labels, len(features), self.kind)))

    def to_pandas(self):
        """One line: site, kind, train and test scores and sizes."""
        import pandas as pd

        keys = ("site", "kind", "train_score", "test_score", "train_size", "test_size")
        return pd.DataFrame([{key: getattr(self, key) for key in keys}])


def probe(
    store_or_arrays,
    labels,
    *,
    site: str | None = None,
    kind: str = "logistic",
    test_size: float = 0.2,
    seed: int = 0,
    C: float = 1.0,
) -> ProbeResult:
    """Fit a linear probe for `labels` on activations.

    Args:
        store_or_arrays: an `ActivationStore` (with `site`) or floats `[N, D]`.
        labels: `[N]`, one per row: two classes for `"logistic"`, numbers
            for `"linear"`.
        site: the store's hook name to probe.
        kind: `"logistic"` (scikit-learn's `LogisticRegression`) or
            `"linear"` (`Ridge` with `alpha = 1 / C`).
        test_size: fraction of rows held out (stratified for classes).
        seed: seed of the split.
        C: inverse regularization strength, on standardized features.

    Returns:
        A `ProbeResult` whose `direction` lives in the model's basis.

    Example:
    ```python
    store = phi3lab.activations.collect(model, texts, "blocks.2.hook_resid_post", tokenizer=tok)
    labels = store.tokens["token_id"].isin(name_ids).to_numpy()
    result = phi3lab.analysis.probe(store, labels, site="blocks.2.hook_resid_post")
    result.test_score, phi3lab.hooks.add("blocks.2.hook_resid_post", result.direction, scale=4.0)
    ```
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_choice("kind", kind, KINDS)
    if not 0 < test_size < 1:
        raise bad_argument("test_size", test_size, "a fraction in (0, 1)")
    if not C > 0:
        raise bad_argument("C", C, "a positive number")
    features = _features(store_or_arrays, site)
    values = _labels(labels, len(features), kind)
    split = train_test_split(
        features, values, test_size=test_size, random_state=seed, stratify=values if kind == "logistic" else None
    )
    x_train, x_test, y_train, y_test = split
    model = LogisticRegression(C=C, max_iter=2000) if kind == "logistic" else Ridge(alpha=1.0 / C)
    estimator = make_pipeline(StandardScaler(), model).fit(x_train, y_train)
    scaler, fitted = estimator[0], estimator[-1]
    weights = np.ravel(fitted.coef_) / scaler.scale_  # binary logistic: towards the larger label
    bias = float(np.ravel(fitted.intercept_)[0] - scaler.mean_ @ weights)
    norm = np.linalg.norm(weights)
    return ProbeResult(
        site=site,
        kind=kind,
        train_score=float(estimator.score(x_train, y_train)),
        test_score=float(estimator.score(x_test, y_test)),
        train_size=len(x_train),
        test_size=len(x_test),
        direction=(weights / norm if norm > 0 else weights).astype(np.float32),
        weights=weights,
        bias=bias,
        estimator=estimator,
    )


@dataclasses.dataclass(frozen=True)
class ProbeSweep:
    """Probes of one concept at several sites.

    Attributes:
        results: site -> `ProbeResult`.
    """

    results: dict

    def to_pandas(self):
        """One line per site: site, layer, kind, train and test scores."""
        import pandas as pd

        frame = pd.concat([result.to_pandas() for result in self.results.values()], ignore_index=True)
        frame.insert(1, "layer", [split_name(site)[0] for site in frame["site"]])
        return frame

    @property
    def best(self) -> ProbeResult:
        """The probe with the highest held-out score."""
        return max(self.results.values(), key=lambda result: result.test_score)

    def figure(self):
        """A plotly figure of the train and test scores per site (plotly is
        imported only here)."""
        import plotly.graph_objects as go

        frame = self.to_pandas()
        figure = go.Figure()
        for column in ("train_score", "test_score"):
            figure.add_scatter(x=frame["site"], y=frame[column], mode="lines+markers", name=column)
        score = "accuracy" if frame["kind"].iloc[0] == "logistic" else "R^2"
        figure.update_layout(xaxis_title="site", yaxis_title=score, title="Probe scores by site")
        return figure


def probe_sweep(store, labels, *, sites=None, **options) -> ProbeSweep:
    """`probe` of `labels` at each of `sites` (default: every name `store`
    holds, e.g. `blocks.*.hook_resid_post`), with the same split.

    Args:
        store: an `ActivationStore`.
        labels: `[N]`, one per row.
        sites: hook names of the store; default all of them.
        **options: passed to `probe` (`kind`, `test_size`, `seed`, `C`).

    Example:
    >>> sweep = phi3lab.analysis.probe_sweep(store, labels)
    >>> sweep.to_pandas(), sweep.figure(), sweep.best.direction
    """
    sites = store.names if sites is None else [sites] if isinstance(sites, str) else list(sites)
    for site in sites:
        store[site]  # an unknown site is an error before anything is fitted
    return ProbeSweep({site: probe(store, labels, site=site, **options) for site in sites})


def contrast_vector(model, positive, negative, site: str, *, tokenizer=None, positions="last", **options) -> np.ndarray:
    """The mean activation at `site` over the `positive` corpus minus that
    over the `negative` one (`collect`, `positions="last"` by default): a
    steering vector for `phi3lab.hooks.add(site, vector)`.

    Args:
        model: a `Phi3Backbone`.
        positive, negative: corpora as `collect` takes them (texts with
            `tokenizer`, or token ids).
        site: one hook name with one row per token (e.g.
            `"blocks.2.hook_resid_post"`).
        tokenizer: a `Phi3Tokenizer`, for texts.
        positions: which positions are averaged (`collect`'s argument).
        **options: passed to `collect` (`batch_size`, `progress`, `hooks`...).

    Returns:
        float32 `[D]` (the site's row shape).

    Example:
    ```python
    vector = phi3lab.analysis.contrast_vector(model, happy_texts, sad_texts, "blocks.2.hook_resid_post", tokenizer=tok)
    phi3lab.generate(model, tok, "I feel", hooks=phi3lab.hooks.add("blocks.2.hook_resid_post", vector, scale=2.0))
    ```
    """
    from phi3lab.activations import collect

    if not isinstance(site, str):
        raise bad_argument("site", site, "one hook name, e.g. 'blocks.2.hook_resid_post'")
    means = [
        collect(model, corpus, site, tokenizer=tokenizer, positions=positions, **options).mean(site)
        for corpus in (positive, negative)
    ]
    return means[0] - means[1]
