"""A corpus through the compiled forward, batch by batch: the one streaming
pipeline of activations.

`Batcher` sorts documents into the run pipeline's length buckets
(`corpus.batches`), picks each bucket's batch size against the memory
budget, compiles one program per bucket ahead of time and returns each
batch's captures, rows split over the devices (`phi3lab.sharding.BatchMesh`).
`phi3lab.activations.collect` stores what it returns; dictionary training
(`phi3lab.features.train` on token ids or texts) pools and shuffles it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from phi3lab.activations import corpus
from phi3lab.errors import bad_argument
from phi3lab.runtime import compile_cache
from phi3lab.sharding import BatchMesh
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import ForwardFn
from phi3lab.tracing.memory import CaptureTooLarge

TOKENS_PER_BATCH = 8192  # the batch size picked for a bucket, in tokens, before the memory check


class Batcher:
    """Padded batches of a document stream and their captures.

    A given `batch_size` is checked against the memory budget; `None` starts
    from `TOKENS_PER_BATCH` tokens (at most the documents of the bucket's
    first group) and halves until the program fits. Each program returns
    the captures alone, so XLA drops the layers after the last site read
    (reading block 6 of 12 costs about 0.6x the whole forward).

    Args:
        fn: the `ForwardFn` to run (its captures and hooks).
        batch_size: None or rows per batch (rounded up to the devices).
        memory_budget: None (the free memory) or bytes a batch may use.
        known: `"padded,num_positions" -> rows` chosen before (a resumed
            store's), kept as they are.

    Example:
    >>> batcher = Batcher(forward_fn(model, "blocks.1.hook_resid_post"), None, None)
    >>> for batch in batcher.batches(corpus.documents(texts, tok, model, None), window=1024):
    ...     acts = batcher.captures(batch)["blocks.1.hook_resid_post"]   # [B, T_bucket, D]
    """

    def __init__(self, fn: ForwardFn, batch_size: int | None, memory_budget: int | None, known: dict | None = None):
        self.fn = fn
        self.mesh = BatchMesh(fn.model.params())
        self.params = self.mesh.replicate(fn.model.params())
        self.batch_size, self.memory_budget = batch_size, memory_budget
        self.sizes = dict(known or {})  # "padded,num_positions" -> rows, kept in a store's metadata
        self.programs: dict = {}

    def batches(self, docs: Iterator[tuple[int, np.ndarray]], window: int) -> Iterator[corpus.Batch]:
        """`corpus.batches` of `docs` at this batcher's batch sizes."""
        return corpus.batches(docs, self.fn.model, self._size_of, window)

    def captures(self, batch: corpus.Batch) -> dict:
        """The captures of `batch` by name, `[B, T_bucket, ...]` device arrays."""
        _, ids, mask = self.mesh.put((), batch.token_ids, batch.padding_mask)
        return self.programs[batch.key](self.params, ids, mask, self.fn.hook_data)

    def _compile(self, key, rows: int) -> compile_cache.Program:
        padded, num_positions = key
        blank = np.zeros((rows, padded), np.int32)
        args = (*self.mesh.put(self.params, blank, blank.astype(bool)), self.fn.hook_data)
        program_key = ("collect", *self.fn.program_key(), num_positions, self.mesh.size)
        run = functools.partial(_captures, self.fn, num_positions=num_positions)
        return compile_cache.ahead_of_time(self.fn.model, program_key, run, args)

    def _size_of(self, key, group: int) -> int:
        label = f"{key[0]},{key[1]}"
        if label in self.sizes:
            rows = self.sizes[label]
        elif self.batch_size is not None:
            rows = self.mesh.round(self.batch_size)
        else:
            rows = self.mesh.round(min(max(1, TOKENS_PER_BATCH // key[0]), group))
        while True:
            program = self._compile(key, rows)
            try:
                pipeline.guard(program, self.params, self.memory_budget)
                break
            except CaptureTooLarge as error:
                if self.batch_size is not None or label in self.sizes or rows <= self.mesh.size:
                    raise bad_argument(
                        "memory_budget",
                        self.memory_budget,
                        f"enough for one batch of {rows} x {key[0]} tokens ({error}); give a smaller "
                        "batch_size, fewer names or a larger memory_budget",
                    ) from None
                rows = self.mesh.round(max(1, rows // 2))
        self.sizes[label] = rows
        self.programs[key] = program
        return rows


def _captures(fn: ForwardFn, params, token_ids, padding_mask, hook_data, num_positions=None) -> dict:
    """`fn`'s captures alone (the final hidden states are not returned)."""
    return fn.run(params, token_ids, padding_mask, hook_data, num_positions=num_positions)[1]
