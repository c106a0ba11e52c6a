"""`summarize`: every feature's statistics over an activation store, in one compiled pass.

A feature dashboard needs, for each feature, the rows where it fires most,
how often it fires and how its activations are spread. All three are folded
over the store's rows by one compiled step (`_fold`), a chunk of rows at a
time, for every feature at once: the store is read once, whatever feature
is shown afterwards.

The histogram bins are fixed in advance (logarithmic, `BINS_PER_DECADE` a
decade from `HISTOGRAM_LOW`), so chunks add up exactly without knowing the
largest activation first.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.features.dictionary import SparseDictionary

BINS_PER_DECADE = 8
HISTOGRAM_LOW = 1e-4  # activations below fall in the first bin, above 1e6 in the last
HISTOGRAM_EDGES = np.geomspace(HISTOGRAM_LOW, 1e6, 10 * BINS_PER_DECADE + 1)
CHUNK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class FeatureSummary:
    """Per feature: where it fires most, how often, and how strongly.

    Attributes:
        site: the store's name read (the dictionary's input site).
        rows: the rows read (tokens).
        counts: `[F]` rows where the feature's activation is > 0.
        top_values: `[F, K]` its K largest activations, largest first (0
            past the rows where it fires).
        top_rows: `[F, K]` the store rows of `top_values` (-1 where the
            activation is 0).
        histogram: `[F, B]` counts of its positive activations in the bins
            `edges`.
        edges: `[B + 1]` bin edges (logarithmic; the outer bins also hold
            what lies beyond them).
    """

    site: str
    rows: int
    counts: np.ndarray
    top_values: np.ndarray
    top_rows: np.ndarray
    histogram: np.ndarray
    edges: np.ndarray

    @property
    def density(self) -> np.ndarray:
        """`[F]` the fraction of rows where each feature fires."""
        return self.counts / max(self.rows, 1)


def summarize(dictionary: SparseDictionary, store, top: int = 32, chunk_rows: int = CHUNK_ROWS) -> FeatureSummary:
    """Every feature's top rows, firing count and histogram over `store`.

    Args:
        dictionary: a `SparseDictionary`; its input site (`config.site`) is
            the store's name read.
        store: an `ActivationStore` holding that site.
        top: K, the top rows kept per feature.
        chunk_rows: rows folded per step (the last chunk is padded, so one
            program serves the whole store).

    Returns:
        A `FeatureSummary`.

    Example:
    >>> store = phi3lab.activations.collect(model, texts, sae.config.site, tokenizer=tok)
    >>> summary = phi3lab.features.summarize(sae, store)
    >>> summary.top_rows[91, :5], summary.density[91]
    """
    import jax
    from jax import numpy as jnp

    site = store_site(dictionary, store)
    top = check_positive_int("top", top)
    chunk_rows = check_positive_int("chunk_rows", chunk_rows)
    rows, d_sae = len(store), dictionary.config.d_sae
    if rows == 0:
        raise bad_argument("store", store, "a store holding at least one row")
    top = min(top, rows)
    bins = len(HISTOGRAM_EDGES) - 1
    state = (
        jnp.zeros(d_sae, jnp.int32),
        jnp.zeros((d_sae, top), jnp.float32),
        jnp.full((d_sae, top), -1, jnp.int32),
        jnp.zeros((d_sae, bins), jnp.int32),
    )
    step = _fold_program(top)
    size = min(chunk_rows, rows)
    array = store[site]
    for start in range(0, rows, size):
        x = np.asarray(array[start : start + size], np.float32).reshape(-1, dictionary.config.d_in)
        valid = np.zeros(size, bool)
        valid[: len(x)] = True
        if len(x) < size:
            x = np.concatenate([x, np.zeros((size - len(x), x.shape[1]), np.float32)])
        state = step(state, dictionary, jnp.asarray(x), jnp.asarray(valid), jnp.int32(start))
    counts, values, found, histogram = jax.device_get(state)
    return FeatureSummary(
        site=site,
        rows=rows,
        counts=counts.astype(np.int64),
        top_values=values,
        top_rows=np.where(values > 0, found, -1).astype(np.int64),
        histogram=histogram.astype(np.int64),
        edges=HISTOGRAM_EDGES,
    )


def store_site(dictionary: SparseDictionary, store) -> str:
    """The dictionary's input site, checked to be in `store` with its width."""
    from phi3lab.activations import ActivationStore

    if not isinstance(dictionary, SparseDictionary):
        raise bad_argument("dictionary", dictionary, "a phi3lab.features.SparseDictionary")
    site = dictionary.config.site
    if not isinstance(site, str):
        raise bad_argument("dictionary", dictionary, "a dictionary whose config names its input site (config.site)")
    if not isinstance(store, ActivationStore):
        raise bad_argument("store", store, "a phi3lab.activations.ActivationStore")
    if site not in store:
        raise bad_argument(
            "store",
            store,
            f"a store holding the dictionary's input site {site!r} (this one holds {store.names}); "
            f"collect it with phi3lab.activations.collect(model, texts, {site!r})",
        )
    width = int(np.prod(store[site].shape[1:]))
    if width != dictionary.config.d_in:
        raise bad_argument("store", store, f"rows of width d_in={dictionary.config.d_in} at {site!r}, not {width}")
    return site


@functools.cache
def _fold_program(top: int):
    """The compiled step folding one chunk of rows into the running state
    (compiled once per dictionary shape and chunk size)."""
    from jax import lax
    from jax import numpy as jnp

    from phi3lab.runtime import compile_cache

    edges = jnp.asarray(HISTOGRAM_EDGES[1:-1], jnp.float32)

    def fold(state, dictionary, x, valid, start):
        counts, values, found, histogram = state
        acts = jnp.where(valid[:, None], dictionary.encode(x).astype(jnp.float32), 0.0)  # [C, F]
        fired = acts > 0
        counts = counts + fired.sum(0, dtype=jnp.int32)
        chunk_values, chunk_index = lax.top_k(acts.T, top)  # [F, K]
        merged_values = jnp.concatenate([values, chunk_values], axis=1)
        merged_rows = jnp.concatenate([found, chunk_index.astype(jnp.int32) + start], axis=1)
        values, keep = lax.top_k(merged_values, top)
        found = jnp.take_along_axis(merged_rows, keep, axis=1)
        bins = jnp.searchsorted(edges, acts, side="right")  # [C, F]
        features = jnp.broadcast_to(jnp.arange(acts.shape[1]), acts.shape)
        histogram = histogram.at[features, bins].add(fired.astype(jnp.int32))
        return counts, values, found, histogram

    return compile_cache.jit(fold)
