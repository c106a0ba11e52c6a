"""Path patching: a component's effect through chosen receivers only.

Wang et al. 2022 (IOI), in the orientation of `activation_patching` (the
corrupted run is the base, clean values are patched in):

1. Run the corrupted input with the senders' outputs (a head's `z`, an
   MLP's output) set to their clean values and every other head and MLP
   frozen at its corrupted value; record the receivers' inputs: a head's
   query / key / value, an MLP's input (`ln2.hook_normalized`) or the final
   residual stream.
2. Run the corrupted input again with only the receivers' inputs replaced
   by the recorded ones, and read the metric (clean = 1, corrupted = 0).

The effect then flows from the senders to the metric only through the
receivers. With `freeze=False` step 1 freezes nothing, so every path from
the senders to the receivers counts (with the final residual stream as the
receiver, that is activation patching of the senders).

Both steps run as one compiled program; the senders travel as masks, so a
sweep over every head is `jax.vmap`ped in chunks like `activation_patching`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax import numpy as jnp

from phi3lab.analysis.patching import (
    SITES,
    SWEEP_ADVICE,
    PatchingResult,
    _patch_units,
    check_pair,
    layer_units,
    mean_metric,
    metric_of,
    patching_result,
    stacked_site,
)
from phi3lab.checks import check_index, is_int
from phi3lab.errors import bad_argument
from phi3lab.tracing import pipeline
from phi3lab.tracing.forward import forward_fn
from phi3lab.tracing.hook_types import Hook
from phi3lab.tracing.metrics import finite_metric, resolve_metric
from phi3lab.tracing.names import block_name

# receiver kind -> (hook name of the input, axis of the units, units)
RECEIVER_SITES = {
    "q": ("attn.hook_q", 2, "query head"),
    "k": ("attn.hook_k", 2, "key/value head"),
    "v": ("attn.hook_v", 2, "key/value head"),
    "mlp": ("ln2.hook_normalized", 1, None),
    "final": ("hook_resid_post", 1, None),
}
FINAL = "resid_final"


@dataclasses.dataclass(frozen=True)
class PathPatchingResult:
    """The effect of `senders` on the metric through `receivers`.

    Attributes:
        value: normalized (clean = 1, corrupted = 0; raw when
            `normalize=False`).
        raw: the metric of the path-patched run.
        clean_metric, corrupted_metric: the metric of the unpatched runs.
        senders, receivers: as checked (tuples).
    """

    value: float
    raw: float
    clean_metric: float
    corrupted_metric: float
    senders: tuple
    receivers: tuple


def _freeze_units(x, ctx):
    """Hook: every unit fixed, to its clean value where this layer's mask
    row is set and to its corrupted value elsewhere."""
    clean, corrupted, mask = ctx.data
    return jnp.where(layer_units(mask, ctx, x.ndim), clean[ctx.layer], corrupted[ctx.layer]).astype(x.dtype)


def _check_senders(model, senders) -> tuple:
    """Senders as `((layer, head), ...)` and `((layer, "mlp"), ...)`."""
    if isinstance(senders, (str, bytes)) or not isinstance(senders, Iterable):
        raise bad_argument("senders", senders, 'a set of (layer, head) and (layer, "mlp") pairs, or "heads"')
    checked = []
    for sender in senders:
        if not (
            isinstance(sender, tuple)
            and len(sender) == 2
            and is_int(sender[0])
            and (is_int(sender[1]) or sender[1] == "mlp")
        ):
            raise bad_argument("senders", sender, 'a (layer, head) or (layer, "mlp") pair')
        layer = check_index("senders", sender[0], model.num_layers, "layer")
        unit = (
            sender[1] if sender[1] == "mlp" else check_index("senders", sender[1], model.num_query_heads, "query head")
        )
        checked.append((layer, unit))
    return tuple(sorted(set(checked), key=str))


def _check_receivers(model, receivers) -> tuple:
    """Receivers as `(layer, head, "q" | "k" | "v")`, `(layer, "mlp")` or `"resid_final"`."""
    if isinstance(receivers, str):
        receivers = [receivers]
    if isinstance(receivers, bytes) or not isinstance(receivers, Iterable):
        raise bad_argument("receivers", receivers, f'a list of (layer, head, "q"|"k"|"v"), (layer, "mlp") or {FINAL!r}')
    checked = []
    for receiver in receivers:
        if receiver == FINAL:
            checked.append(FINAL)
        elif isinstance(receiver, tuple) and len(receiver) == 2 and is_int(receiver[0]) and receiver[1] == "mlp":
            checked.append((check_index("receivers", receiver[0], model.num_layers, "layer"), "mlp"))
        elif (
            isinstance(receiver, tuple)
            and len(receiver) == 3
            and is_int(receiver[0])
            and is_int(receiver[1])
            and receiver[2] in ("q", "k", "v")
        ):
            heads = model.num_query_heads if receiver[2] == "q" else model.num_key_value_heads
            checked.append(
                (
                    check_index("receivers", receiver[0], model.num_layers, "layer"),
                    check_index("receivers", receiver[1], heads, RECEIVER_SITES[receiver[2]][2]),
                    receiver[2],
                )
            )
        else:
            raise bad_argument("receivers", receiver, f'(layer, head, "q"|"k"|"v"), (layer, "mlp") or {FINAL!r}')
    if not checked:
        raise bad_argument("receivers", receivers, "a non-empty list of receivers")
    return tuple(sorted(set(checked), key=str))


def _reaches(sender, receiver) -> bool:
    """Whether a sender's output is upstream of a receiver's input."""
    if receiver == FINAL:
        return True
    layer, unit = sender
    target = receiver[0]
    if receiver[-1] == "mlp":  # an MLP reads the attention of its own block
        return layer < target or (layer == target and unit != "mlp")
    return layer < target


def _sender_masks(model, senders) -> tuple[np.ndarray, np.ndarray]:
    heads = np.zeros((model.num_layers, model.num_query_heads), bool)
    mlps = np.zeros((model.num_layers, 1), bool)
    for layer, unit in senders:
        if unit == "mlp":
            mlps[layer, 0] = True
        else:
            heads[layer, unit] = True
    return heads, mlps


def _receiver_masks(model, receivers) -> dict:
    """kind -> bool `[L, units]` of the receivers' inputs to patch in step 2."""
    sizes = {"q": model.num_query_heads, "k": model.num_key_value_heads, "v": model.num_key_value_heads}
    masks = {}
    for receiver in receivers:
        kind = "final" if receiver == FINAL else receiver[-1]
        mask = masks.setdefault(kind, np.zeros((model.num_layers, sizes.get(kind, 1)), bool))
        if kind == "final":
            mask[-1, 0] = True
        elif kind == "mlp":
            mask[receiver[0], 0] = True
        else:
            mask[receiver[0], receiver[1]] = True
    return masks


def _program(model, kinds: tuple, freeze: bool, metric, bucket: pipeline.Bucket):
    """`(key, run)`: `run(params, ids, padding, senders_data, receiver_masks,
    data) -> [N]` for `N` sender sets (vmapped, uncompiled), over ids padded
    to `bucket`."""
    freeze_fn = _freeze_units if freeze else _patch_units
    step1_hooks = {
        block_name("*", SITES["head_z"][0]): Hook(freeze_fn, static=(SITES["head_z"][1],)),
        block_name("*", "hook_mlp_out"): Hook(freeze_fn, static=((1,),)),
    }
    inputs = [RECEIVER_SITES[kind] for kind in kinds]
    step1 = forward_fn(model, names=[block_name("*", name) for name, _, _ in inputs], hooks=step1_hooks)
    step2 = forward_fn(
        model, hooks={block_name("*", name): Hook(_patch_units, static=((axis,),)) for name, axis, _ in inputs}
    )
    layers, num_positions, length = model.num_layers, bucket.num_positions, metric.length(bucket)

    def one(params, ids, padding, senders, receiver_masks, data):
        _, captures = step1.run(params, ids, padding, senders, num_positions=num_positions)
        recorded = [jnp.stack([captures[block_name(layer, name)] for layer in range(layers)]) for name, _, _ in inputs]
        hook_data = tuple(zip(recorded, receiver_masks))
        hidden, _ = step2.run(params, ids, padding, hook_data, num_positions=num_positions)
        return mean_metric(model, metric, params, hidden, ids, padding, data, length)

    z_axes = (None, None, 0) if freeze else (None, 0)
    key = ("path_patching", kinds, freeze, metric.key, num_positions, length)
    return key, jax.vmap(one, in_axes=(None, None, None, (z_axes, z_axes), None, None))


def _run(
    model, clean, corrupted, padding, metric, senders_masks, receivers, freeze, batch_size, memory_budget
) -> np.ndarray:
    """The path-patched metric for each sender set `(heads [N,L,H], mlps [N,L,1])`."""
    masks = _receiver_masks(model, receivers)
    kinds = tuple(sorted(masks))
    bucket = pipeline.bucket(model, clean.shape[1])
    key, run = _program(model, kinds, freeze, metric, bucket)

    def stacked(ids, site):
        array = stacked_site(model, ids, padding, site, memory_budget)
        return jnp.asarray(bucket.pad_site(SITES[site][0], array, leading=1))

    z_clean, z_bad = stacked(clean, "head_z"), stacked(corrupted, "head_z")
    mlp_clean, mlp_bad = stacked(clean, "mlp_out"), stacked(corrupted, "mlp_out")
    heads, mlps = senders_masks
    params, ids, mask = model.params(), jnp.asarray(bucket.pad(corrupted)), jnp.asarray(bucket.pad(padding))
    receiver_masks = tuple(jnp.asarray(masks[kind]) for kind in kinds)
    out, program = [], None
    for start in range(0, len(heads), batch_size):
        stop = min(start + batch_size, len(heads))
        chunk_heads = np.zeros((batch_size,) + heads.shape[1:], bool)
        chunk_mlps = np.zeros((batch_size,) + mlps.shape[1:], bool)
        chunk_heads[: stop - start], chunk_mlps[: stop - start] = heads[start:stop], mlps[start:stop]
        if freeze:
            data = ((z_clean, z_bad, jnp.asarray(chunk_heads)), (mlp_clean, mlp_bad, jnp.asarray(chunk_mlps)))
        else:
            data = ((z_clean, jnp.asarray(chunk_heads)), (mlp_clean, jnp.asarray(chunk_mlps)))
        args = (params, ids, mask, data, receiver_masks, metric.data)
        if program is None:
            program = pipeline.compiled(model, key, run, args, memory_budget, "This sweep", SWEEP_ADVICE)
        out.append(np.asarray(program(*args))[: stop - start])
    return finite_metric(np.concatenate(out), "the path-patched runs")


def path_patching(
    model,
    clean_ids,
    corrupted_ids,
    senders,
    receivers,
    metric: Callable | None = None,
    answer=None,
    counterfactual=None,
    *,
    freeze: bool = True,
    padding_mask=None,
    normalize: bool = True,
    batch_size: int = 16,
    memory_budget: int | None = None,
) -> PathPatchingResult | PatchingResult:
    """The effect of `senders` on the metric only through `receivers`.

    Args:
        model: a `Phi3Backbone`.
        clean_ids, corrupted_ids: token ids `[T]` or `[B, T]`, same shape.
        senders: a set of `(layer, head)` (a query head's output `z`) and
            `(layer, "mlp")` pairs, patched together; or `"heads"`: score
            every head alone (a sweep; heads with no path to the receivers
            score 0).
        receivers: a list of `(layer, head, "q" | "k" | "v")` (the query
            input of a query head, the key/value input of a key/value
            head), `(layer, "mlp")` (an MLP's input) and `"resid_final"`
            (the residual stream the final norm reads).
        metric, answer, counterfactual: as in `activation_patching`.
        freeze: freeze every other head and MLP at its corrupted value in
            step 1 (Wang et al.); False lets every path from the senders to
            the receivers count.
        padding_mask: `[B, T]` mask shared by both inputs, or None.
        normalize: scale so the clean metric is 1, the corrupted 0.
        batch_size: sender sets per compiled call (the sweep).
        memory_budget: bytes each compiled step may use (default the free
            memory); a step over it is refused before it runs
            (`CaptureTooLarge`, with the estimate).

    The inputs run padded to their length bucket (`phi3lab.tracing.pipeline`);
    the metric reads real positions.

    Returns:
        A `PathPatchingResult` for a set of senders; for `senders="heads"`
        a `PatchingResult` `[layers, heads]` (`PatchingView` shows it).

    Example:
    ```python
    # Which heads write into the name movers' queries (layer 3, heads 0 and 2)?
    scores = phi3lab.analysis.path_patching(model, clean, corrupted, "heads", [(3, 0, "q"), (3, 2, "q")],
                                            answer=mary, counterfactual=john)
    # Head (3, 0) through the final residual stream only (its direct effect).
    phi3lab.analysis.path_patching(model, clean, corrupted, {(3, 0)}, "resid_final", answer=mary).value
    ```
    """
    clean, corrupted, padding = check_pair(model, clean_ids, corrupted_ids, padding_mask)
    pipeline.check_budget(memory_budget)
    sweep = isinstance(senders, str) and senders == "heads"
    checked = None if sweep else _check_senders(model, senders)
    receivers = _check_receivers(model, receivers)
    if not is_int(batch_size) or batch_size < 1:
        raise bad_argument("batch_size", batch_size, "a positive int (sender sets per compiled call)")
    resolved = resolve_metric(model, metric, answer, counterfactual, padding)
    if checked:
        blocked = [s for s in checked if not any(_reaches(s, r) for r in receivers)]
        if blocked:
            raise ValueError(
                f"`senders` {blocked} have no path to the receivers {list(receivers)}: a receiver must read a "
                "later layer (or, for an MLP receiver, its own block's attention). Choose receivers after the senders."
            )
    layers, heads = model.num_layers, model.num_query_heads
    if sweep:
        units = [(layer, head) for layer in range(layers) for head in range(heads)]
        sets = [()] + [(unit,) for unit in units]
    else:
        sets = [(), checked]
    masks = [_sender_masks(model, chosen) for chosen in sets]
    values = _run(
        model,
        clean,
        corrupted,
        padding,
        resolved,
        (np.stack([m[0] for m in masks]), np.stack([m[1] for m in masks])),
        receivers,
        freeze,
        batch_size,
        memory_budget,
    )
    corrupted_metric = values[0]
    clean_metric = metric_of(model, clean, padding, resolved, memory_budget)
    if sweep:
        raw = values[1:].reshape(layers, heads)  # heads with no path give the corrupted metric exactly
        return patching_result(model, "head_z", raw, clean_metric, corrupted_metric, clean, corrupted, normalize)
    raw = float(values[1])
    span = clean_metric - corrupted_metric
    value = (raw - corrupted_metric) / span if normalize and span != 0 else (float("nan") if normalize else raw)
    return PathPatchingResult(value, raw, float(clean_metric), float(corrupted_metric), checked, receivers)
