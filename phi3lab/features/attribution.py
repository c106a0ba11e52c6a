"""Feature attribution: activation x gradient per feature and position.

With the dictionary spliced in with its error term the run is the clean
run, and a feature's effect on a metric, to first order, is its activation
times the metric's gradient with respect to that activation
(`a_f * d metric / d a_f`, Marks et al. 2024, "Sparse feature circuits").
The gradient comes from one compiled forward+backward
(`phi3lab.gradients`) at the replaced site, pulled back through the
dictionary's decoder (`jax.vjp` of `decode`, so input normalisation and
decoder-norm rescaling are honoured).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.features.dictionary import SparseDictionary


@dataclasses.dataclass(frozen=True)
class FeatureAttribution:
    """Per feature and position: activation, gradient and their product.

    Attributes:
        activations: `[B, T, F]` feature activations.
        gradients: `[B, T, F]` d metric / d activation.
        scores: `[B, T, F]` activations x gradients.
        padding_mask: `[B, T]`, True for real tokens.
        metric: the metric per row.
    """

    activations: np.ndarray
    gradients: np.ndarray
    scores: np.ndarray
    padding_mask: np.ndarray
    metric: np.ndarray

    def top(self, n: int = 10) -> pd.DataFrame:
        """The `n` (batch, position, feature) triples of largest |score|, largest first."""
        n = check_positive_int("n", n)
        scores = np.where(self.padding_mask[..., None], self.scores, 0.0)
        flat = np.argsort(-np.abs(scores), axis=None)[:n]
        batch, position, feature = np.unravel_index(flat, scores.shape)
        return pd.DataFrame(
            {
                "batch": batch,
                "position": position,
                "feature": feature,
                "activation": self.activations[batch, position, feature],
                "gradient": self.gradients[batch, position, feature],
                "score": scores[batch, position, feature],
            }
        )


def attribute(
    model,
    dictionary: SparseDictionary,
    inputs,
    metric=None,
    answer=None,
    counterfactual=None,
    *,
    tokenizer=None,
    padding_mask=None,
) -> FeatureAttribution:
    """Activation x gradient of every feature of `dictionary` at every position.

    Args:
        model: a `Phi3Backbone`.
        dictionary: a `SparseDictionary` whose config names its site (and a
            transcoder's `target_site`).
        inputs, metric, answer, counterfactual, tokenizer, padding_mask: as
            `phi3lab.gradients` (default metric: `logit[answer] -
            logit[counterfactual]` at the last real position).

    Returns:
        A `FeatureAttribution`; `.top(n)` lists the largest scores.

    Example:
    >>> attr = phi3lab.features.attribute(model, sae, ids, answer=mary, counterfactual=john)
    >>> attr.top(5)
    """
    from phi3lab.tracing.gradient_trace import gradients

    if not isinstance(dictionary, SparseDictionary):
        raise bad_argument("dictionary", dictionary, "a phi3lab.features.SparseDictionary")
    config = dictionary.config
    if not isinstance(config.site, str) or (config.transcoder and not isinstance(config.target_site, str)):
        raise bad_argument("dictionary", dictionary, "a dictionary whose config names its site (and target_site)")
    output_site = config.target_site if config.transcoder else config.site
    names = sorted({config.site, output_site})
    run = gradients(
        model,
        inputs,
        metric,
        answer,
        counterfactual,
        names=names,
        tokenizer=tokenizer,
        padding_mask=padding_mask,
    )
    x = jnp.asarray(run[config.site])
    x = x.reshape(*x.shape[:2], -1)
    grad_out = jnp.asarray(run.grad(output_site))
    grad_out = grad_out.reshape(*grad_out.shape[:2], -1)
    if (x.shape[-1], grad_out.shape[-1]) != (config.d_in, config.d_out):
        widths = f"d_in={x.shape[-1]} and d_out={grad_out.shape[-1]}, the widths of its sites"
        raise bad_argument("dictionary", dictionary, f"a dictionary of {widths}")
    acts = dictionary.encode(x)
    _, pull_back = jax.vjp(lambda a: dictionary.decode(a, x), acts)
    (grad_acts,) = pull_back(grad_out.astype(acts.dtype))
    acts, grad_acts = np.asarray(acts), np.asarray(grad_acts)
    return FeatureAttribution(acts, grad_acts, acts * grad_acts, np.asarray(run.padding_mask), np.asarray(run.metric))
