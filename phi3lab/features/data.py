"""Where a dictionary's training activations come from: one stream of
shuffled `(inputs [batch, d_in], targets [batch, d_out] | None)` batches.

Sources, told apart by type:

- an activation store: any object with `store.batches(name, batch_size,
  shuffle=True, seed=0)` yielding `[batch, D]` arrays
  (`phi3lab.activations.ActivationStore`), read once per epoch;
- arrays: `[N, D]` activations (an SAE), or a pair `(inputs, targets)` of
  `[N, d_in]` and `[N, d_out]` (a transcoder);
- token ids `[B, T]` (ints) or texts (with `tokenizer=`): activations are
  computed by the model as they are needed, through the corpus pipeline of
  `phi3lab.activations.collect` (`phi3lab.activations.batching.Batcher`:
  each row's real tokens a document, `ROWS_PER_RUN` documents per compiled
  forward of their length bucket), pooled over a few forwards and shuffled,
  never written to disk.

Every stream repeats its source (a new order each epoch) until the trainer
has the tokens it asked for.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_finite
from phi3lab.errors import bad_argument

_POOL_BATCHES = 8  # streamed activations are shuffled in pools of this many batches
ROWS_PER_RUN = 16  # documents per compiled forward when streaming from the model


def finite_activations(array) -> np.ndarray:
    """`array` if it holds no NaN or infinity, else a clear error naming `data`."""
    return check_finite("data", array, "finite activations", "activations")


def batches(
    model, data, *, site: str, target_site: str | None, batch_size: int, seed: int, tokenizer=None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The endless, shuffled `(inputs, targets)` stream of `data` (see the module)."""
    if hasattr(data, "batches"):
        return _from_store(data, site, target_site, batch_size, seed)
    if isinstance(data, tuple) and len(data) == 2 and all(is_activations(a) for a in data):
        if target_site is None:
            raise bad_argument("data", "a pair of arrays", "[N, D] activations for an SAE (target_site=None)")
        inputs, targets = (np.asarray(a, np.float32) for a in data)
        if inputs.ndim != 2 or targets.shape[0] != inputs.shape[0] or targets.ndim != 2:
            raise bad_argument("data", f"arrays of shapes {inputs.shape}, {targets.shape}", "[N, d_in] and [N, d_out]")
        return _from_arrays(inputs, targets, batch_size, seed)
    if is_activations(data):
        inputs = np.asarray(data, np.float32)
        if inputs.ndim != 2:
            raise bad_argument("data", f"an array of shape {inputs.shape}", "[N, D] activations")
        if target_site is not None:
            raise bad_argument("data", "one array", "a pair (inputs, targets) of arrays for a transcoder")
        return _from_arrays(inputs, None, batch_size, seed)
    if model is None:
        raise bad_argument("model", None, "a Phi3Backbone to compute activations of token ids or texts")
    return _from_model(model, data, site, target_site, batch_size, seed, tokenizer)


def is_activations(data) -> bool:
    """True for NumPy or JAX arrays of floats."""
    return hasattr(data, "dtype") and hasattr(data, "shape") and jnp.issubdtype(data.dtype, jnp.floating)


def _from_arrays(inputs, targets, batch_size: int, seed: int):
    if inputs.shape[0] < batch_size:
        raise bad_argument("batch_size", batch_size, f"at most the number of activation rows ({inputs.shape[0]})")
    finite_activations(inputs)
    if targets is not None:
        finite_activations(targets)
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(inputs.shape[0])
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield inputs[rows], None if targets is None else targets[rows]


def _from_store(store, site, target_site, batch_size: int, seed: int):
    epoch = 0
    while True:
        inputs = store.batches(site, batch_size, shuffle=True, seed=seed + epoch)
        targets = store.batches(target_site, batch_size, shuffle=True, seed=seed + epoch) if target_site else None
        count = 0
        for x in inputs:
            y = None if targets is None else finite_activations(np.asarray(next(targets), np.float32))
            x = finite_activations(np.asarray(x, np.float32))
            if x.shape[0] == batch_size:
                count += 1
                yield x, y
        if count == 0:
            raise bad_argument("data", store, f"an activation store with at least batch_size={batch_size} rows")
        epoch += 1


def token_ids(model, data, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Texts or ids as checked `[B, T]` ids and a padding mask (the run
    pipeline's `prepare_inputs`, errors naming `data`)."""
    from phi3lab.tracing.pipeline import prepare_inputs

    text = isinstance(data, str) or (isinstance(data, list | tuple) and data and all(isinstance(t, str) for t in data))
    try:
        return prepare_inputs(model, data, None, tokenizer, name="data")
    except (TypeError, ValueError):
        if text:
            raise
        raise bad_argument(
            "data",
            data,
            "[N, D] float activations, a pair of them (a transcoder), an activation store "
            "(an object with .batches(name, batch_size, shuffle, seed)), token ids [B, T] or texts",
        ) from None


def _from_model(model, data, site, target_site, batch_size: int, seed: int, tokenizer):
    from phi3lab.activations.batching import Batcher
    from phi3lab.tracing.forward import forward_fn

    ids, mask = token_ids(model, data, tokenizer)
    if mask.sum() < batch_size:
        raise bad_argument("batch_size", batch_size, f"at most the number of tokens in `data` ({int(mask.sum())})")
    documents = [row[real] for row, real in zip(ids, mask) if real.any()]
    names = [site] if target_site is None else [site, target_site]
    # The corpus pipeline of `phi3lab.activations.collect`: documents by
    # length bucket, one compiled program per bucket, captures alone.
    batcher = Batcher(forward_fn(model, names=names), min(ROWS_PER_RUN, len(documents)), None)
    rng = np.random.default_rng(seed)
    pool: list[tuple[np.ndarray, np.ndarray | None]] = []
    pooled = 0
    while True:
        order = rng.permutation(len(documents))
        for batch in batcher.batches(((int(i), documents[i]) for i in order), window=len(order)):
            real = batch.padding_mask & (batch.docs >= 0)[:, None]
            captures = batcher.captures(batch)
            x = np.asarray(captures[site])[real]
            y = None if target_site is None else np.asarray(captures[target_site])[real]
            pool.append((x, y))
            pooled += len(x)
            if pooled >= _POOL_BATCHES * batch_size:
                yield from _shuffled_batches(pool, batch_size, rng)
                pool, pooled = [], 0


def _shuffled_batches(pool, batch_size: int, rng):
    x = np.concatenate([p[0] for p in pool])
    y = None if pool[0][1] is None else np.concatenate([p[1] for p in pool])
    order = rng.permutation(len(x))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = order[start : start + batch_size]
        yield x[rows], None if y is None else y[rows]
