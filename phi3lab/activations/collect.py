"""`collect`: activations of hook sites over a corpus, batched and compiled once per bucket."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from phi3lab.activations import corpus
from phi3lab.activations.batching import Batcher
from phi3lab.activations.store import (
    FORMAT,
    ActivationStore,
    MemorySink,
    ZarrSink,
    model_fingerprint,
    row_dtype,
    tokenizer_description,
)
from phi3lab.checks import check_choice, check_positive_int
from phi3lab.errors import bad_argument
from phi3lab.tracing.forward import as_hooks, forward_fn
from phi3lab.tracing.names import BLOCK_SITES, MODEL_SITES, Selection, all_names, select, site_shape, split_name

DTYPES = ("float32", "float16", "bfloat16")
WINDOW = 1024  # documents sorted into buckets together


def _sites(model, names: Selection) -> tuple[list[str], dict[str, list[int]]]:
    """The hook names asked for and the shape of one row of each; only sites
    with one position axis, right after the batch, can be stored per token."""
    chosen = select(names, all_names(model))
    if not chosen:
        raise bad_argument("names", names, "a selection of at least one hook name")
    for name in chosen:
        _, site = split_name(name)
        symbols = BLOCK_SITES.get(site) or MODEL_SITES[site]
        if symbols[1] != "T" or "T" in symbols[2:]:
            raise bad_argument(
                "names", name, "hook sites with one row per token (not attention scores or patterns, [B, H, T, T])"
            )
    return chosen, {name: list(site_shape(model, name, 1, 1)[2:]) for name in chosen}


def _positions_mask(positions, batch: corpus.Batch) -> np.ndarray:
    """`[B, T]`: the real positions of `batch` to store."""
    mask = batch.padding_mask.copy()
    mask[batch.docs < 0] = False
    if positions == "all":
        return mask
    lengths = mask.sum(1)
    if positions == "last":
        last = np.zeros_like(mask)
        rows = np.flatnonzero(lengths)
        last[rows, lengths[rows] - 1] = True
        return last
    for row in np.flatnonzero(lengths):
        ids = batch.token_ids[row, : lengths[row]]
        chosen = np.asarray(positions(ids.copy()))
        if chosen.shape != ids.shape or chosen.dtype != bool:
            raise bad_argument(
                "positions",
                positions,
                f"a function of a document's token ids [L] returning a bool mask [L]; for document "
                f"{batch.docs[row]} (L={len(ids)}) it returned an array of shape {chosen.shape}, "
                f"dtype {chosen.dtype}",
            )
        mask[row, : lengths[row]] = chosen
    return mask


def _hooks_label(hooks) -> list[str]:
    """What `resume` compares of the hooks: their sites and function names."""
    return [f"{pattern}:{getattr(hook.fn, '__qualname__', hook.fn)}" for pattern, hook in hooks.entries]


def collect(
    model,
    data,
    names: Selection,
    *,
    tokenizer=None,
    batch_size: int | None = None,
    max_length: int | None = None,
    positions: str | Callable = "all",
    store=None,
    dtype: str = "float32",
    progress: bool | None = None,
    memory_budget: int | None = None,
    hooks=None,
    resume: bool = False,
    window: int = WINDOW,
) -> ActivationStore:
    """Activations of hook sites over a corpus, one row per real token.

    Documents are read as a stream, `window` at a time, sorted into the
    length buckets `trace` runs at, padded (masked) on the right and run in
    batches through the compiled forward: one program per bucket. Every row
    equals the same position of `phi3lab.trace` of its document alone; no
    padding is stored.

    Args:
        model: a `Phi3Backbone`.
        data: a list of strings or of token-id sequences, a 2-D id array,
            a `datasets.Dataset` (column `input_ids` or `text`), or any
            iterable of strings / id sequences (read lazily).
        names: the hook sites to keep (names, glob patterns or a predicate),
            sites with one row per token (`hook_resid_post`, `attn.hook_z`,
            `mlp.hook_post`, `hook_logits`...).
        tokenizer: a `Phi3Tokenizer`, to encode texts and show tokens.
        batch_size: documents per batch; None picks one per bucket (about
            8,192 tokens, fewer if the memory budget requires).
        max_length: cut documents to their first `max_length` tokens.
        positions: `"all"` real tokens, `"last"` (each document's last
            token) or a function `fn(ids [L]) -> bool [L]` choosing them.
        store: None (in memory) or a directory: a Zarr v3 store written a
            batch at a time.
        dtype: `"float32"`, `"float16"` or `"bfloat16"` (half the bytes of
            float32 with its range; stored on disk as its 16 bits, read back
            as `ml_dtypes.bfloat16`): the stored dtype.
        progress: show a tqdm bar with tokens/s (None: when attached to a
            terminal or notebook; False: never).
        memory_budget: bytes a batch may use (default the device's free
            memory); a budget too small for one row is an error.
        hooks: interventions run on every batch, as for `trace`; they see
            the padded batch `[B, T_bucket, ...]` (position-wise hooks such
            as `hooks.add` and `hooks.ablate_heads` give what `trace` gives).
        resume: continue the partial store at `store` (same model and
            settings) from the first batch it lacks.
        window: documents sorted into buckets together (bounds the memory
            of the stream and the length of a resumed batch's recomputation).

    Returns:
        An `ActivationStore`. With several devices, each batch's rows are
        split over them (data parallel).

    Example:
    ```python
    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tok = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    store = phi3lab.activations.collect(model, texts, "blocks.*.hook_resid_post", tokenizer=tok, store="acts.zarr")
    store["blocks.2.hook_resid_post"].shape      # [N, 128], N the real tokens of `texts`
    ```
    """
    chosen, shapes = _sites(model, names)
    check_choice("dtype", dtype, DTYPES)
    stored = row_dtype(dtype)
    if not (positions in ("all", "last") if isinstance(positions, str) else callable(positions)):
        raise bad_argument("positions", positions, '"all", "last" or a function fn(ids [L]) -> bool mask [L]')
    for argument, value in (("batch_size", batch_size), ("max_length", max_length), ("memory_budget", memory_budget)):
        if value is not None:
            check_positive_int(argument, value)
    check_positive_int("window", window)
    if resume and store is None:
        raise bad_argument("resume", resume, "False when `store` is None (only a store on disk can be resumed)")
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise bad_argument("store", store, "None (in memory) or a directory path")
    hooks = as_hooks(hooks)
    fn = forward_fn(model, chosen, hooks)
    from phi3lab import __version__

    metadata = {
        "format": FORMAT,
        "model": model_fingerprint(model),
        "names": chosen,
        "shapes": shapes,
        "dtype": dtype,
        "positions": positions if isinstance(positions, str) else getattr(positions, "__qualname__", "callable"),
        "max_length": max_length,
        "window": window,
        "hooks": _hooks_label(hooks),
        "tokenizer": tokenizer_description(tokenizer),
        "phi3lab_version": __version__,
    }
    sink = MemorySink(metadata, tokenizer) if store is None else ZarrSink(store, metadata, resume, tokenizer)
    skip = sink.batches_done
    batcher = Batcher(fn, batch_size, memory_budget, dict(sink.metadata.get("batch_sizes") or {}))
    stream = corpus.documents(data, tokenizer, model, max_length)
    bar = _progress_bar(progress)
    seen = 0
    try:
        for number, batch in enumerate(batcher.batches(stream, window)):
            seen += 1
            real = int(batch.padding_mask[batch.docs >= 0].sum())
            if number < skip:
                bar.update(real)
                continue
            keep = _positions_mask(positions, batch)
            captures = batcher.captures(batch)
            rows = {name: np.asarray(captures[name])[keep].astype(stored, copy=False) for name in chosen}
            rows_of, position = np.nonzero(keep)
            rows["doc"] = batch.docs[rows_of]
            rows["position"] = position.astype(np.int32)
            rows["token_id"] = batch.token_ids[rows_of, position]
            sink.metadata["batch_sizes"] = batcher.sizes
            sink.append(rows, documents=int((batch.docs >= 0).sum()))
            bar.update(real)
    finally:
        bar.close()
    if not seen:
        raise bad_argument("data", data, "a corpus of at least one document")
    return sink.store()


def _progress_bar(progress: bool | None):
    """A tqdm bar counting tokens (notebook-aware); `None` shows it only on a
    terminal or in a notebook."""
    from tqdm.auto import tqdm

    return tqdm(unit="tok", unit_scale=True, desc="collect", disable=None if progress is None else not progress)
