"""Where a dictionary's training activations come from: one stream of
shuffled `(inputs [batch, d_in], targets [batch, d_out] | None)` batches.

Sources, told apart by type:

- an activation store: any object with `store.batches(name, batch_size,
  shuffle=True, seed=0)` yielding `[batch, D]` arrays
  (`phi3lab.activations.ActivationStore`), read once per epoch;
- arrays: `[N, D]` activations (an SAE), or a pair `(inputs, targets)` of
  `[N, d_in]` and `[N, d_out]` (a transcoder);
- token ids `[B, T]` (ints) or texts (with `tokenizer=`): activations are
  computed by the model as they are needed, in compiled forwards of
  `rows_per_run` sequences (`phi3lab.tracing.forward_fn`), pooled over a few
  forwards and shuffled, never written to disk.

Every stream repeats its source (a new order each epoch) until the trainer
has the tokens it asked for.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from jax import numpy as jnp

from phi3lab.checks import check_ids, check_mask
from phi3lab.errors import bad_argument

_POOL_BATCHES = 8  # streamed activations are shuffled in pools of this many batches
ROWS_PER_RUN = 16  # sequences per compiled forward when streaming from the model


def check_finite(array: np.ndarray, argument: str = "data") -> np.ndarray:
    """`array` if it holds no NaN or infinity, else a clear error."""
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise bad_argument(argument, f"activations with {bad} NaN/inf values", "finite activations")
    return array


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
    check_finite(inputs)
    if targets is not None:
        check_finite(targets)
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
            y = None if targets is None else check_finite(np.asarray(next(targets), np.float32))
            x = check_finite(np.asarray(x, np.float32))
            if x.shape[0] == batch_size:
                count += 1
                yield x, y
        if count == 0:
            raise bad_argument("data", store, f"an activation store with at least batch_size={batch_size} rows")
        epoch += 1


def token_ids(model, data, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Texts or ids as checked `[B, T]` ids and a padding mask."""
    if isinstance(data, str) or (isinstance(data, list | tuple) and data and all(isinstance(t, str) for t in data)):
        if not hasattr(tokenizer, "encode_batch"):
            raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer when `data` is text")
        ids, mask = tokenizer.encode_batch([data] if isinstance(data, str) else list(data))
        ids = check_ids("data", ids, model)
        return ids, check_mask(mask, ids.shape)
    try:
        ids = check_ids("data", data, model)
    except (TypeError, ValueError):
        raise bad_argument(
            "data",
            data,
            "[N, D] float activations, a pair of them (a transcoder), an activation store "
            "(an object with .batches(name, batch_size, shuffle, seed)), token ids [B, T] or texts",
        ) from None
    return ids, np.ones(ids.shape, bool)


def _from_model(model, data, site, target_site, batch_size: int, seed: int, tokenizer):
    from phi3lab.runtime import compile_cache
    from phi3lab.tracing.forward import forward_fn

    ids, mask = token_ids(model, data, tokenizer)
    if mask.sum() < batch_size:
        raise bad_argument("batch_size", batch_size, f"at most the number of tokens in `data` ({int(mask.sum())})")
    names = [site] if target_site is None else [site, target_site]
    fn = forward_fn(model, names=names)
    # Only the captures are returned, so XLA drops the layers after the last
    # site read: reading blocks.6 of 12 layers takes 0.6x the full forward.
    run = compile_cache.cached(
        model,
        ("features.stream", fn.program_key()),
        lambda: compile_cache.jit(lambda params, ids, mask, data: fn.run(params, ids, mask, data)[1]),
    )
    params = model.params()
    rows = min(ROWS_PER_RUN, ids.shape[0])
    rng = np.random.default_rng(seed)
    pool: list[tuple[np.ndarray, np.ndarray | None]] = []
    pooled = 0
    while True:
        order = rng.permutation(ids.shape[0])
        for start in range(0, len(order), rows):
            chosen = order[start : start + rows]
            chosen = np.concatenate([chosen, order[: rows - len(chosen)]])  # the last run filled up
            real = mask[chosen].copy()
            real[len(order[start : start + rows]) :] = False
            captures = run(params, ids[chosen], mask[chosen], fn.hook_data)
            x = np.asarray(captures[site]).reshape(*real.shape, -1)[real]
            y = None if target_site is None else np.asarray(captures[target_site]).reshape(*real.shape, -1)[real]
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
