"""The one run pipeline: prepare -> bucket -> compile -> guard -> run -> slice back.

Every entry that runs the model (`trace`, `gradients`, the patching sweeps,
path patching, the logit lens, the head detectors, generation's prefill and
decode loop, `phi3lab.activations.collect`, the circuits' edge attribution,
edge patching and attribution graphs) takes the same steps:

1. **prepare**: token ids `[B, T]` and a bool padding mask (`prepare_inputs`,
   text through the tokenizer);
2. **bucket**: the positions are padded on the right (masked) to the length
   bucket `compile_cache.bucket_length` picks (`Bucket`), keeping the real
   length's rotary factors, so ten prompt lengths between 20 and 300 run at
   most four programs (rows read out of a trace: `row_bucket`);
3. **compile** ahead of time into the bounded per-model cache
   (`compile_cache.ahead_of_time`, a `compile_cache.Program`);
4. **guard**: XLA's memory analysis of that program against the budget
   (`memory_budget=`, default the free memory), refused with the estimate
   before anything is allocated (`guard`);
5. **run** the program;
6. **slice back**: every position axis cut to the real length
   (`Bucket.unpad`).

Right-padding with a mask is exact for causal attention: no real position
attends to a padded one. What reads positions must read real ones: the
default metric takes each row's last real position from the mask; a metric
function sees only the real positions (its programs compile per length);
sweeps patch nothing in padded rows and sum nothing over them.

Example:
```python
bucket = pipeline.bucket(model, ids.shape[1])
args = (params, bucket.pad(ids), bucket.pad(mask), fn.hook_data)
program = pipeline.compiled(model, ("trace", *fn.program_key()), fn.run, args, memory_budget)
hidden, captures = program(*args)
hidden = hidden[:, : bucket.length]
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from phi3lab.checks import check_ids, check_mask, is_int
from phi3lab.errors import bad_argument
from phi3lab.runtime import compile_cache
from phi3lab.tracing.memory import check_fits, measure
from phi3lab.tracing.names import position_index
from phi3lab.tracing.rope import warn_mixed_rotary


def check_budget(memory_budget) -> int | None:
    """`memory_budget` if it is None or a positive int (bytes), else a clear error."""
    if memory_budget is not None and (not is_int(memory_budget) or memory_budget <= 0):
        raise bad_argument("memory_budget", memory_budget, "None or a positive int (bytes)")
    return memory_budget


def prepare_inputs(model, inputs, padding_mask, tokenizer, name: str = "ids"):
    """Ids `[B, T]` int32 and a bool mask `[B, T]`.

    Args:
        model: the `Phi3Backbone` the ids are for.
        inputs: ids `[T]` / `[B, T]`, or a string / list of strings (with
            `tokenizer`).
        padding_mask: None or `[T]` / `[B, T]`; text takes the tokenizer's.
        tokenizer: None or a `Phi3Tokenizer`.
        name: the argument named in errors about the ids.
    """
    texts = None
    if isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, str) for i in inputs):
        texts = list(inputs)
    if texts is not None:
        if not hasattr(tokenizer, "encode_batch"):
            raise bad_argument("tokenizer", tokenizer, "a Phi3Tokenizer when the input is text")
        inputs, mask = tokenizer.encode_batch(texts)
        padding_mask = mask if padding_mask is None else padding_mask
    token_ids = check_ids(name, inputs, model)
    mask = check_mask(padding_mask, token_ids.shape)
    warn_mixed_rotary(model.rotary, mask)
    return token_ids, mask


def display_tokens(tokenizer, token_ids: np.ndarray) -> list[list[str]] | None:
    """Each row's tokens as text (None without a tokenizer), for a `Trace`."""
    return None if tokenizer is None else [tokenizer.display_tokens(row) for row in token_ids.tolist()]


def padded_length(model, length: int) -> tuple[int, int | None]:
    """`(padded, num_positions)`: the length bucket a run of `length`
    positions uses and the `num_positions` that keeps the real length's
    rotary factors (None when the padded length picks the same ones, so
    every length of a bucket shares one program)."""
    padded = compile_cache.bucket_length(length, model.max_sequence_length)
    rotary = model.rotary
    if rotary.factor_set(padded) == rotary.factor_set(length):
        return padded, None
    return padded, rotary.pretraining_sequence_length  # the short factors, as for `length`


@dataclasses.dataclass(frozen=True)
class Bucket:
    """How a run of `length` positions is padded.

    Attributes:
        length: the real positions.
        padded: the positions the program runs at (`bucket_length`).
        num_positions: None, or the static `num_positions` of
            `Phi3Backbone.apply` that keeps the real length's rotary factors.
    """

    length: int
    padded: int
    num_positions: int | None

    def pad(self, array, axes: tuple[int, ...] = (1,)) -> np.ndarray:
        """`array` with `axes` (position axes of `length`) padded on the right
        to `padded` with zeros (False for masks)."""
        array = np.asarray(array)
        widths = [(0, 0)] * array.ndim
        for axis in axes:
            widths[axis] = (0, self.padded - array.shape[axis])
        return np.pad(array, widths)

    def pad_site(self, name: str, array, leading: int = 0) -> np.ndarray:
        """An activation of hook `name` (after `leading` extra axes, e.g. a
        stack of layers) padded on every position axis: `unpad`'s inverse."""
        index = position_index(name, self.length)
        return self.pad(array, tuple(leading + a for a, i in enumerate(index) if i != slice(None)))

    def unpad(self, name: str, array, leading: int = 0):
        """`array` (hook `name`, after `leading` extra axes) with every
        position axis cut back to the real `length` (a view)."""
        index = (slice(None),) * leading + position_index(name, self.length)
        shape = np.shape(array)
        if all(i == slice(None) or shape[a] == self.length for a, i in enumerate(index)):
            return array
        return array[index]


def hook_length(hooks, bucket: Bucket) -> int | None:
    """The static length the user's `hooks` see in a run padded to `bucket`:
    the real length when there are hooks and padding (a hook may read or
    write any position; such runs compile per length), else None (every
    position; the package's own position-wise hooks pass none here)."""
    return bucket.length if hooks and bucket.padded != bucket.length else None


def bucket(model, length: int) -> Bucket:
    """The `Bucket` a run of `length` positions of `model` uses.

    Example:
    >>> pipeline.bucket(model, 40)
    Bucket(length=40, padded=64, num_positions=None)
    """
    return Bucket(length, *padded_length(model, length))


# Reads of at most this many rows (one position, an answer and its
# counterfactual, a few layers' streams) pad to a power of two, not to 64.
_FEW_ROWS = 16


def row_bucket(model, rows: int) -> Bucket:
    """The `Bucket` of `rows` vectors read out of a trace (the logit lens,
    the attribution tables): a few rows (at most 16) padded to a power of
    two, so reading one position costs one, not 64 (the attribution of one
    position by Phi-3-mini's 1024 heads: 12 MB, not 0.8 GB); more padded to
    their length bucket, as positions are.

    Example:
    >>> [pipeline.row_bucket(model, n).padded for n in (1, 3, 16, 17, 300)]
    [1, 4, 16, 64, 384]
    """
    if rows <= _FEW_ROWS:
        return Bucket(rows, 1 << max(rows - 1, 0).bit_length(), None)
    return Bucket(rows, compile_cache.bucket_length(rows, model.max_sequence_length), None)


def compiled(
    model, key: tuple, fn: Callable, args, memory_budget: int | None, what: str = "This run", advice: str | None = None
) -> compile_cache.Program:
    """`fn` compiled ahead of time for `args` (cached under `key`, see
    `compile_cache.ahead_of_time`) once its memory passed the guard:
    `guard` with the weights `args[0]`.

    Example:
    >>> program = pipeline.compiled(model, ("gradients", key), run, args, memory_budget, "These gradients")
    """
    program = compile_cache.ahead_of_time(model, key, fn, args)
    guard(program, args[0], memory_budget, what, advice)
    return program


def guard(program, params, memory_budget: int | None, what: str = "This run", advice: str | None = None):
    """XLA's memory estimate of `program` (weights `params`), refused with
    `CaptureTooLarge` (carrying the estimate) when it exceeds `memory_budget`
    (default: the device's free memory). Nothing has been allocated then."""
    return check_fits(measure(program, params), memory_budget, what=what, advice=advice)
