"""What a feature dashboard shows of one feature: its top contexts and the
tokens its decoder direction promotes, read from a `FeatureSummary`."""

from __future__ import annotations

import dataclasses

import numpy as np

from phi3lab.errors import bad_argument


@dataclasses.dataclass(frozen=True)
class Context:
    """A window of one document around a row where a feature fires.

    Attributes:
        doc: the document.
        positions: `[L]` the positions shown (the rows the store holds there).
        token_ids: `[L]`.
        activations: `[L]` the feature's activation on each.
        peak: the index in `positions` of the top row.
    """

    doc: int
    positions: np.ndarray
    token_ids: np.ndarray
    activations: np.ndarray
    peak: int


def contexts(dictionary, store, summary, feature: int, count: int, before: int, after: int) -> list[Context]:
    """The `count` contexts of `feature`'s largest activations (one per top
    row, largest first): up to `before` stored positions before the top row
    and `after` after it, with the feature's activation on each, encoded in
    one call."""
    top = summary.top_rows[feature]
    top = top[top >= 0][:count]
    if not len(top):
        return []
    docs, positions = store.tag("doc"), store.tag("position")
    windows = []
    for row in top:
        doc_rows = np.flatnonzero(docs == docs[row])
        doc_rows = doc_rows[np.argsort(positions[doc_rows], kind="stable")]
        at = int(np.searchsorted(positions[doc_rows], positions[row]))
        windows.append((doc_rows[max(0, at - before) : at + after + 1], at - max(0, at - before)))
    rows = np.concatenate([w for w, _ in windows])
    x = np.asarray(store[summary.site][np.sort(rows)], np.float32).reshape(len(rows), -1)
    acts = dict(zip(np.sort(rows).tolist(), np.asarray(dictionary.encode(x))[:, feature].tolist()))
    token_ids = store.tag("token_id")
    return [
        Context(
            doc=int(docs[w[0]]),
            positions=positions[w],
            token_ids=token_ids[w],
            activations=np.array([acts[r] for r in w.tolist()], np.float64),
            peak=peak,
        )
        for w, peak in windows
    ]


def logit_effects(model, dictionary, feature: int) -> np.ndarray | None:
    """`[V]`: the logits the feature's decoder direction writes through the
    unembedding alone (`model.unembed`, no final norm), per unit of
    activation; None when the dictionary does not write the residual
    stream's width."""
    direction = np.asarray(dictionary.W_dec[feature], np.float32)
    if model is None or direction.shape[-1] != model.hidden_dim:
        return None
    return np.asarray(model.unembed(model.params(), direction), np.float64)


def as_store(dictionary, model, store_or_data, tokenizer):
    """An `ActivationStore` holding the dictionary's input site: the one
    given, or one collected from texts / token ids with `model`."""
    from phi3lab.activations import ActivationStore, collect
    from phi3lab.features import SparseDictionary

    if not isinstance(dictionary, SparseDictionary):
        raise bad_argument("dictionary", dictionary, "a phi3lab.features.SparseDictionary")
    if isinstance(store_or_data, ActivationStore):
        return store_or_data
    if model is None:
        raise bad_argument(
            "model", None, "a Phi3Backbone to collect the dictionary's input site from texts or token ids"
        )
    site = dictionary.config.site
    if not isinstance(site, str):
        raise bad_argument("dictionary", dictionary, "a dictionary whose config names its input site (config.site)")
    return collect(model, store_or_data, site, tokenizer=tokenizer, progress=False)
