"""Activation patching: which activations carry the clean run's answer.

The corrupted input runs again and again, each time with one unit (a
position of a residual/attention/MLP output, or one head) replaced by its
value in the clean run; a metric measures how much of the clean behaviour
comes back. Every patched run of a sweep goes through one compiled program:
the choice of unit travels as an input (a one-hot mask `[layers, units]`
given to a hook on every layer), and the runs are `jax.vmap`ped in chunks.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import numpy as np
import pandas as pd
from jax import numpy as jnp

from phi3lab.checks import check_ids, check_mask, is_int
from phi3lab.deprecation import keyword_only_since
from phi3lab.errors import bad_argument
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import forward_fn
from phi3lab.tracing.hook_types import Hook
from phi3lab.tracing.metrics import Metric, finite_metric, resolve_metric
from phi3lab.tracing.names import block_name
from phi3lab.tracing.tracer import trace

# site -> (block hook name, unit axes of the activation, unit names)
SITES = {
    "resid_pre": ("hook_resid_pre", (1,), ("position",)),
    "attn_out": ("hook_attn_out", (1,), ("position",)),
    "mlp_out": ("hook_mlp_out", (1,), ("position",)),
    "head_z": ("attn.hook_z", (2,), ("head",)),
    "head_z_position": ("attn.hook_z", (1, 2), ("position", "head")),
    "head_q": ("attn.hook_q", (2,), ("head",)),
    "head_k": ("attn.hook_k", (2,), ("kv_head",)),
    "head_v": ("attn.hook_v", (2,), ("kv_head",)),
    "head_pattern": ("attn.hook_pattern", (1,), ("head",)),
}


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """The outcome of an `activation_patching` sweep.

    Attributes:
        values: `[num_layers, units]` (`[num_layers, positions, heads]`
            for `"head_z_position"`): the metric with that unit patched,
            normalized so the clean run is 1 and the corrupted run 0 (raw
            metric values when `normalize=False`).
        raw: the metric values before normalizing, same shape.
        clean_metric, corrupted_metric: the metric of the unpatched runs.
        site: the `sites` argument; `hook`: the patched hook names.
        axes: `("layer", unit)`, unit being `"position"`, `"head"` or
            `"kv_head"`; `("layer", "position", "head")` for
            `"head_z_position"`.
        clean_ids, corrupted_ids: the inputs `[B, T]`.
    """

    values: np.ndarray
    raw: np.ndarray
    clean_metric: float
    corrupted_metric: float
    site: str
    hook: str
    axes: tuple[str, str]
    clean_ids: np.ndarray
    corrupted_ids: np.ndarray

    def to_pandas(self) -> pd.DataFrame:
        """One row per (layer, unit): `layer`, the unit columns, `value`,
        `raw`; position sites add the clean and corrupted token ids of row 0."""
        index = np.meshgrid(*(np.arange(n) for n in self.values.shape), indexing="ij")
        columns = {axis: grid.ravel() for axis, grid in zip(self.axes, index)}
        table = pd.DataFrame(columns | {"value": self.values.ravel(), "raw": self.raw.ravel()})
        if "position" in columns:
            at = len(self.axes)
            table.insert(at, "clean_token", self.clean_ids[0][columns["position"]])
            table.insert(at + 1, "corrupted_token", self.corrupted_ids[0][columns["position"]])
        table.attrs.update(site=self.site, clean_metric=self.clean_metric, corrupted_metric=self.corrupted_metric)
        return table


def layer_units(mask, ctx, ndim: int):
    """This layer's part of a unit mask `[L, *unit sizes]`, shaped to
    broadcast over an activation of `ndim` axes along the hook's static unit
    axes (`ctx.static == (axes,)`)."""
    (axes,) = ctx.static
    shape = [1] * ndim
    for axis, size in zip(axes, mask.shape[1:]):
        shape[axis] = size
    return mask[ctx.layer].reshape(shape)


def _patch_units(x, ctx):
    """Hook: take the clean value wherever this layer's part of the mask is set."""
    clean, mask = ctx.data
    return jnp.where(layer_units(mask, ctx, x.ndim), clean[ctx.layer].astype(x.dtype), x)


SWEEP_ADVICE = "Use a smaller batch_size (patched runs per compiled call), a shorter input or fewer rows."


def mean_metric(model, metric: Metric, params, hidden, ids, padding, data, length: int | None = None):
    """The metric of a patched run: the rows' mean (or the metric's total),
    of the first `length` positions (`Metric.length`; all when None)."""
    batch = {"token_ids": ids, "padding_mask": padding}
    return jnp.mean(metric.rows(hidden, lambda h: model.unembed(params, h), data, batch, length))


def metric_of(model, ids, padding, metric: Metric, memory_budget: int | None = None) -> float:
    """The metric of a plain run of `ids` (through the run pipeline: padded to
    its bucket, compiled once per model, metric and bucket, guarded)."""
    bucket = pipeline.bucket(model, ids.shape[1])
    forward, length = forward_fn(model), metric.length(bucket)

    def run(params, ids, padding, data):
        hidden, _ = forward.run(params, ids, padding, num_positions=bucket.num_positions)
        return mean_metric(model, metric, params, hidden, ids, padding, data, length)

    params = model.params()
    args = (params, jnp.asarray(bucket.pad(ids)), jnp.asarray(bucket.pad(padding)), metric.data)
    key = ("patching.metric", metric.key, bucket.num_positions, length)
    program = pipeline.compiled(model, key, run, args, memory_budget, "This run", SWEEP_ADVICE)
    return float(finite_metric(program(*args), "the clean run"))


def _patcher(model, site: str, metric: Metric, bucket: pipeline.Bucket):
    """`(key, run)`: `run(params, ids [N,B,P], padding, clean [L,...], masks
    [N,L,*U], data) -> [N]` over ids padded to `bucket` (vmapped, uncompiled)."""
    name, axes, _ = SITES[site]
    forward = forward_fn(model, hooks={block_name("*", name): Hook(_patch_units, static=(axes,))})
    length = metric.length(bucket)

    def one(params, ids, padding, clean, mask, data):
        hidden, _ = forward.run(params, ids, padding, ((clean, mask),), num_positions=bucket.num_positions)
        return mean_metric(model, metric, params, hidden, ids, padding, data, length)

    key = ("patching", site, metric.key, bucket.num_positions, length)
    return key, jax.vmap(one, in_axes=(None, 0, None, None, 0, None))


def stacked_site(model, ids, padding, site: str, memory_budget: int | None = None) -> np.ndarray:
    """Activation `site` of every layer for `ids`, stacked `[L, ...]` (real positions)."""
    hook = SITES[site][0]
    tr = trace(model, ids, padding_mask=padding, names=block_name("*", hook), memory_budget=memory_budget)
    return np.stack([tr[block_name(layer, hook)] for layer in range(model.num_layers)])


def position_units(site: str) -> tuple[int, ...]:
    """The axes of a unit mask `[N, L, *units]` that count positions."""
    return tuple(2 + i for i, unit in enumerate(SITES[site][2]) if unit == "position")


class _Sweep:
    """Runs many patched forwards (each an ids array and a mask) in chunks."""

    def __init__(self, model, site, clean_ids, corrupted_ids, padding, metric: Metric, batch_size, memory_budget):
        self.model, self.site, self.batch_size, self.memory_budget = model, site, batch_size, memory_budget
        self.bucket = pipeline.bucket(model, clean_ids.shape[1])
        self.key, self.run_fn = _patcher(model, site, metric, self.bucket)
        self.clean_ids, self.corrupted_ids = clean_ids, corrupted_ids
        self.padding, self.data = jnp.asarray(self.bucket.pad(padding)), metric.data
        clean = stacked_site(model, clean_ids, padding, site, memory_budget)
        self._units = tuple(int(clean.shape[1 + axis]) for axis in SITES[site][1])
        self.clean = jnp.asarray(self.bucket.pad_site(SITES[site][0], clean, leading=1))

    def units(self) -> tuple[int, ...]:
        """The sizes of the unit axes (one, or positions and heads), real positions."""
        return self._units

    def run(self, ids: np.ndarray, masks: np.ndarray, progress: bool = False) -> np.ndarray:
        """Metric of each run `i`: input `ids[i]` `[B, T]`, `masks[i]` `[L, *units]` bool."""
        total = len(masks)
        size = min(self.batch_size, total)
        starts = range(0, total, size)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"patching {self.site}", unit="chunk")
        params, out, program = self.model.params(), [], None
        for start in starts:
            stop = min(start + size, total)
            chunk_ids = np.repeat(self.corrupted_ids[None], size, axis=0)
            chunk_masks = np.zeros((size,) + masks.shape[1:], bool)
            chunk_ids[: stop - start], chunk_masks[: stop - start] = ids[start:stop], masks[start:stop]
            chunk_ids = self.bucket.pad(chunk_ids, (2,))
            chunk_masks = self.bucket.pad(chunk_masks, position_units(self.site))
            args = (params, jnp.asarray(chunk_ids), self.padding, self.clean, jnp.asarray(chunk_masks), self.data)
            if program is None:
                program = pipeline.compiled(
                    self.model, self.key, self.run_fn, args, self.memory_budget, "This sweep", SWEEP_ADVICE
                )
            out.append(np.asarray(program(*args))[: stop - start])
        return finite_metric(np.concatenate(out), "the patched runs")


def check_site(sites) -> str:
    """`sites` if it names a row of `SITES`, else a clear error."""
    if not isinstance(sites, str) or sites not in SITES:
        raise bad_argument("sites", sites, f"one of {list(SITES)}")
    return sites


def check_pair(model, clean_ids, corrupted_ids, padding_mask):
    """Clean and corrupted ids `[B, T]` of one shape and their shared mask."""
    clean = check_ids("clean_ids", clean_ids, model)
    corrupted = check_ids("corrupted_ids", corrupted_ids, model)
    if clean.shape != corrupted.shape:
        raise bad_argument(
            "corrupted_ids", f"array of shape {corrupted.shape}", f"the shape of clean_ids, {clean.shape}"
        )
    return clean, corrupted, check_mask(padding_mask, clean.shape)


def _sweep(
    model, clean_ids, corrupted_ids, metric, answer, counterfactual, sites, padding_mask, batch_size, memory_budget=None
) -> _Sweep:
    check_site(sites)
    pipeline.check_budget(memory_budget)
    clean, corrupted, padding = check_pair(model, clean_ids, corrupted_ids, padding_mask)
    if not is_int(batch_size) or batch_size < 1:
        raise bad_argument("batch_size", batch_size, "a positive int (patched runs per compiled call)")
    resolved = resolve_metric(model, metric, answer, counterfactual, padding)
    return _Sweep(model, sites, clean, corrupted, padding, resolved, batch_size, memory_budget)


def patching_result(
    model, sites, raw, clean_metric, corrupted_metric, clean_ids, corrupted_ids, normalize
) -> PatchingResult:
    """A `PatchingResult` of raw metric values `[L, *units]`, normalized so the
    clean metric is 1 and the corrupted 0 when `normalize`."""
    scaled = raw
    if normalize:
        span = clean_metric - corrupted_metric
        if span == 0.0:
            warnings.warn("The clean and corrupted metrics are equal; normalized values are NaN.", stacklevel=3)
            scaled = np.full_like(raw, np.nan)
        else:
            scaled = (raw - corrupted_metric) / span
    return PatchingResult(
        values=scaled,
        raw=raw,
        clean_metric=float(clean_metric),
        corrupted_metric=float(corrupted_metric),
        site=sites,
        hook=block_name("*", SITES[sites][0]),
        axes=("layer", *SITES[sites][2]),
        clean_ids=clean_ids,
        corrupted_ids=corrupted_ids,
    )


@keyword_only_since("answer", "counterfactual", "sites", "progress", "padding_mask", "normalize", "batch_size")
def activation_patching(
    model,
    clean_ids,
    corrupted_ids,
    metric: Callable | None = None,
    *,
    answer=None,
    counterfactual=None,
    sites: str = "resid_pre",
    progress: bool = True,
    padding_mask=None,
    normalize: bool = True,
    batch_size: int = 32,
    memory_budget: int | None = None,
) -> PatchingResult:
    """Patch each unit of the clean run into the corrupted run, one at a time.

    For every layer and every unit of `sites`, the corrupted input runs with
    that unit's activation taken from the clean run, and `metric` is read.
    All runs share one compiled program (the unit is a one-hot mask given
    as an input) and go `batch_size` at a time through `jax.vmap`; the same
    model, site, metric and shapes never recompile.

    Sites and units: `"resid_pre"`, `"attn_out"`, `"mlp_out"` patch one
    position (`[layer, position]`); `"head_z"`, `"head_q"`, `"head_pattern"`
    patch one query head at every position (`[layer, head]`);
    `"head_z_position"` patches one query head at one position
    (`[layer, position, head]`, `layers x positions x heads` runs). `"head_k"` and
    `"head_v"` patch one key/value head (`[layer, kv_head]`): under
    grouped-query attention that changes every query head of its group
    (see `phi3lab.analysis.group_heads`).

    Args:
        model: a `Phi3Backbone`.
        clean_ids, corrupted_ids: token ids `[T]` or `[B, T]`, same shape.
        metric: None, or `metric(logits)` / `metric(logits, batch)` on the
            logits `[B, T, V]` (`batch = {"token_ids", "padding_mask"}`),
            returning a scalar or one value per row (averaged), written
            with `jax.numpy` (it runs compiled; define it once to reuse the
            compilation).
        answer: token id (or one per row) for the default metric.
        counterfactual: token id (or one per row), or None.
        sites: which activations to patch, one of the names above.
        progress: show a tqdm bar when the sweep takes several chunks.
        padding_mask: `[B, T]` mask shared by both inputs, or None.
        normalize: scale so the clean metric is 1, the corrupted 0.
        batch_size: patched runs per compiled call.
        memory_budget: bytes each compiled step may use (default the free
            memory); a step over it is refused before it runs
            (`CaptureTooLarge`, with the estimate).

    The inputs run padded to their length bucket (`phi3lab.tracing.pipeline`):
    padded positions are never patched and the metric reads real ones.

    The default metric is the logit of `answer` minus that of
    `counterfactual` (or the logit alone) at each row's last real token,
    averaged over rows.

    Returns:
        A `PatchingResult` (`values [layers, units]`, `.to_pandas()`).

    Example:
    ```python
    result = phi3lab.analysis.activation_patching(
        model, clean_ids, corrupted_ids, answer=17, counterfactual=4, sites="resid_pre")
    result.values.shape          # (num_layers, T)
    result.to_pandas().sort_values("value").tail()
    ```
    """
    sweep = _sweep(
        model, clean_ids, corrupted_ids, metric, answer, counterfactual, sites, padding_mask, batch_size, memory_budget
    )
    shape = (model.num_layers, *sweep.units())
    count = int(np.prod(shape))
    masks = np.zeros((count + 2, count), bool)
    masks[np.arange(count) + 2, np.arange(count)] = True  # one unit of one layer per run
    ids = np.repeat(sweep.corrupted_ids[None], count + 2, axis=0)
    ids[0] = sweep.clean_ids  # first two runs: unpatched clean and corrupted
    values = sweep.run(ids, masks.reshape(count + 2, *shape), progress=progress)
    raw = values[2:].reshape(shape)
    return patching_result(model, sites, raw, values[0], values[1], sweep.clean_ids, sweep.corrupted_ids, normalize)
