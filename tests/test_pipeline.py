"""The one run pipeline (`phi3lab.tracing.pipeline`) behind every entry.

Every entry that runs the model pads its inputs to a length bucket, compiles
ahead of time, checks the memory estimate against `memory_budget=` and cuts
the results back. Three properties, each checked through every entry:

* padding changes nothing: each entry at a padded length equals a reference
  computed by hand from the pure forward (`forward_fn`) jitted at the real
  length, with no padding (hooks written here, metrics read at the last real
  position), to 1e-5;
* ten prompt lengths from 20 to 300 compile at most four programs of each
  kind (counted in the compile cache: without buckets, ten);
* `memory_budget=1` is refused with the estimate before any program runs.
"""

from __future__ import annotations

from collections import Counter

import jax
import numpy as np
import pandas as pd
import pytest
from jax import numpy as jnp

import phi3lab
import phi3lab.circuits as C
from conftest import HIDDEN, PRETRAINING, random_backbone
from phi3lab import analysis
from phi3lab.analysis.heads import detector_scores
from phi3lab.features import SparseDictionary
from phi3lab.runtime import compile_cache
from phi3lab.tasks import repeated_tokens
from phi3lab.tracing import CaptureTooLarge, forward_fn
from phi3lab.tracing.hook_types import Hook

ANSWER, COUNTER = 7, 11
LENGTHS = [20, 33, 40, 57, 64, 97, 150, 201, 256, 300]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    # Weights at 0.1 N(0, 1) keep activations O(1), so float32 rounding of
    # programs of other shapes stays far below the tolerance.
    return random_backbone(seed=5, scale=0.1, max_sequence_length=512)


def pair(length: int, seed: int = 0):
    """Clean and corrupted ids `[2, length]` (positions 1 and length - 2 differ)."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(3, 90, (2, length)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, [1, length - 2]] = (clean[:, [1, length - 2]] + 17) % 90
    return clean, corrupted


# === The reference: the pure forward at the real length, unpadded ===


def reference(model, ids, names=(), hooks=None, mask=None):
    """`(hidden, captures)` of `forward_fn` jitted at the ids' own length."""
    fn = forward_fn(model, names, hooks)
    out = jax.jit(fn)(model.params(), jnp.asarray(ids), None if mask is None else jnp.asarray(mask), fn.hook_data)
    return np.asarray(out.hidden, np.float64), {k: np.asarray(v, np.float64) for k, v in out.captures.items()}


def last_logit_diff(model, hidden, mask=None):
    """Logit of ANSWER minus COUNTER at each row's last real position, by hand."""
    last = hidden.shape[1] - 1 if mask is None else np.asarray(mask).shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    rows = np.arange(hidden.shape[0])
    logits = np.asarray(model.unembed(model.params(), jnp.asarray(hidden[rows, last], jnp.float32)), np.float64)
    return logits[:, ANSWER] - logits[:, COUNTER]


def put(layer_site: str, value, index):
    """A hook setting `x[index]` to `value[index]` at `layer_site`."""

    def fn(x, ctx):
        return x.at[index].set(ctx.data[index].astype(x.dtype))

    return {layer_site: Hook(fn, data=jnp.asarray(value, jnp.float32))}


def probe_gradient(model, ids, site: str, metric, mask=None):
    """`(metric, d metric / d activation at site)` through a zero probe hook, unpadded."""
    _, captures = reference(model, ids, names=site, mask=mask)
    zeros = jnp.zeros(captures[site].shape, jnp.float32)
    fn = forward_fn(model, hooks={site: Hook(lambda x, ctx: x + ctx.data.astype(x.dtype), data=zeros)})
    m = jnp.asarray(mask) if mask is not None else None

    def value(data):
        return metric(fn(model.params(), jnp.asarray(ids), m, (data,)).hidden)

    total, grad = jax.jit(jax.value_and_grad(value))(zeros)
    return float(total), np.asarray(grad, np.float64)


def logit_diff_jax(model, mask):
    last = jnp.asarray(mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1))

    def metric(hidden):
        logits = model.unembed(model.params(), hidden[jnp.arange(hidden.shape[0]), last]).astype(jnp.float32)
        return jnp.sum(logits[:, ANSWER] - logits[:, COUNTER])

    return metric


# === Padding changes nothing ===


@pytest.mark.parametrize("length", [PRETRAINING - 2, 13])  # below the rotary switch (kept short factors), above
def test_gradients_equal_the_unpadded_reference(model, length):
    ids, _ = pair(length)
    mask = np.ones(ids.shape, bool)
    mask[1, -3:] = False  # row 1 right-padded by the user: its last real position is length - 4
    site = "blocks.1.hook_resid_pre"
    g = phi3lab.gradients(model, ids, answer=ANSWER, counterfactual=COUNTER, names=site, padding_mask=mask)
    assert compile_cache.bucket_length(length, 512) == 64 and g.grad(site).shape == (2, length, HIDDEN)
    total, grad = probe_gradient(model, ids, site, logit_diff_jax(model, mask), mask)
    np.testing.assert_allclose(g.metric.sum(), total, atol=TOLERANCE)
    np.testing.assert_allclose(g.grad(site), grad, atol=TOLERANCE)
    _, captures = reference(model, ids, names=site, mask=mask)
    np.testing.assert_allclose(g[site], captures[site], atol=TOLERANCE)


def test_a_metric_function_reads_the_last_real_position(model):
    # `logits[:, -1]` must be the input's last token, not the bucket's last (padded) slot.
    ids, _ = pair(13)
    site = "blocks.0.hook_resid_post"
    g = phi3lab.gradients(model, ids, lambda logits: logits[:, -1, ANSWER], names=site)
    metric = lambda hidden: jnp.sum(model.unembed(model.params(), hidden[:, -1])[:, ANSWER].astype(jnp.float32))
    total, grad = probe_gradient(model, ids, site, metric)
    np.testing.assert_allclose(g.metric.sum(), total, atol=TOLERANCE)
    np.testing.assert_allclose(g.grad(site), grad, atol=TOLERANCE)


def mean_metric(model, ids, hooks=None):
    hidden, _ = reference(model, ids, hooks=hooks)
    return float(np.mean(last_logit_diff(model, hidden)))


@pytest.mark.parametrize("sites, unit", [("resid_pre", (1, 11)), ("head_z", (1, 2))])
def test_activation_patching_equals_the_unpadded_reference(model, sites, unit):
    clean, corrupted = pair(13)
    result = analysis.activation_patching(
        model, clean, corrupted, answer=ANSWER, counterfactual=COUNTER, sites=sites, progress=False
    )
    assert result.values.shape[1] == (13 if sites == "resid_pre" else 4)  # real positions only
    np.testing.assert_allclose(result.clean_metric, mean_metric(model, clean), atol=TOLERANCE)
    np.testing.assert_allclose(result.corrupted_metric, mean_metric(model, corrupted), atol=TOLERANCE)
    layer, index = unit
    site = f"blocks.{layer}.{'hook_resid_pre' if sites == 'resid_pre' else 'attn.hook_z'}"
    _, captures = reference(model, clean, names=site)
    where = (slice(None), index) if sites == "resid_pre" else (slice(None), slice(None), index)
    expected = mean_metric(model, corrupted, put(site, captures[site], where))
    np.testing.assert_allclose(result.raw[layer, index], expected, atol=TOLERANCE)


def test_attribution_patching_equals_the_unpadded_reference(model):
    clean, corrupted = pair(13)
    result = analysis.attribution_patching(model, clean, corrupted, answer=ANSWER, counterfactual=COUNTER)
    mask = np.ones(clean.shape, bool)
    metric = lambda hidden: logit_diff_jax(model, mask)(hidden) / clean.shape[0]  # the rows' mean
    layer, site = 1, "blocks.1.hook_resid_pre"
    bad_metric, grad = probe_gradient(model, corrupted, site, metric)
    delta = reference(model, clean, names=site)[1][site] - reference(model, corrupted, names=site)[1][site]
    expected = bad_metric + (delta * grad).sum(axis=(0, 2))  # per position
    np.testing.assert_allclose(result.raw[layer], expected, atol=TOLERANCE)


def test_path_patching_equals_the_unpadded_reference(model):
    # Unfrozen, through the final residual stream: patching the head's z.
    clean, corrupted = pair(13)
    result = analysis.path_patching(
        model, clean, corrupted, {(1, 2)}, "resid_final", answer=ANSWER, counterfactual=COUNTER, freeze=False
    )
    site = "blocks.1.attn.hook_z"
    _, captures = reference(model, clean, names=site)
    expected = mean_metric(model, corrupted, put(site, captures[site], (slice(None), slice(None), 2)))
    np.testing.assert_allclose(result.raw, expected, atol=TOLERANCE)
    np.testing.assert_allclose(result.corrupted_metric, mean_metric(model, corrupted), atol=TOLERANCE)


def test_logit_lens_equals_the_unpadded_reference(model):
    ids, _ = pair(13)
    tr = phi3lab.trace(model, ids, names="blocks.*.hook_resid_*")
    logits = analysis.logit_lens_logits(model, tr, where=("pre", "post"), batch=1)
    _, captures = reference(model, ids, names="blocks.*.hook_resid_*")
    readout = jax.jit(model.readout)
    for layer in range(2):
        for w, where in enumerate(("pre", "post")):
            x = jnp.asarray(captures[f"blocks.{layer}.hook_resid_{where}"][1], jnp.float32)
            np.testing.assert_allclose(logits[layer, w], np.asarray(readout(model.params(), x)), atol=TOLERANCE)
    table = analysis.logit_lens(model, tr, k=2, where="post", batch=1, positions=[12])
    last = np.asarray(readout(model.params(), jnp.asarray(captures["blocks.1.hook_resid_post"][1, 12], jnp.float32)))
    assert table["top_tokens"].iloc[-1] == np.argsort(-last)[:2].tolist()


def test_head_scores_equal_the_unpadded_reference(model):
    scores = analysis.head_scores(model, seq_len=6, num_sequences=2)
    ids = repeated_tokens(model.vocabulary_size, 6, 2, 0, 1)
    _, captures = reference(model, ids, names="blocks.*.attn.hook_pattern")
    for layer in range(2):
        expected = detector_scores(captures[f"blocks.{layer}.attn.hook_pattern"], ids, np.ones(ids.shape, bool))
        for column, values in expected.items():
            np.testing.assert_allclose(scores[scores.layer == layer][column], values, atol=TOLERANCE)


def test_generation_equals_the_unpadded_reference(model):
    ids, _ = pair(13)
    g = phi3lab.generate(model, ids[0], max_new_tokens=2, stop=[])
    _, captures = reference(model, ids[:1], names="hook_logits")
    log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(captures["hook_logits"][0, -1])), np.float64)
    assert g.new_token_ids[0] == np.argmax(log_probs)
    np.testing.assert_allclose(g.logprobs[0], log_probs.max(), atol=TOLERANCE)
    _, longer = reference(model, g.token_ids[None, :14], names="hook_logits")
    assert g.new_token_ids[1] == np.argmax(longer["hook_logits"][0, -1])


# --- The circuits entries: edges of level "layers" (senders hook_embed,
# blocks.l.hook_attn_out / hook_mlp_out; receivers the q/k/v inputs, the MLP
# inputs and blocks.1.hook_resid_post for the logits) ---


def edge_delta(model, clean, corrupted, sender: str, mask):
    """Sender's output on corrupted minus on clean `[B, T, D]`, unpadded."""
    return (
        reference(model, corrupted, names=sender, mask=mask)[1][sender]
        - reference(model, clean, names=sender, mask=mask)[1][sender]
    )


def receiver_gradient(model, ids, sites, mask):
    """d (rows' mean logit difference) / d input at `sites`, summed over
    the sites and their heads `[B, T, D]`, unpadded."""
    metric = lambda hidden: logit_diff_jax(model, mask)(hidden) / ids.shape[0]
    grads = [probe_gradient(model, ids, site, metric, mask)[1] for site in sites]
    return sum(g.sum(axis=2) if g.ndim == 4 else g for g in grads)


def user_padded_pair(length: int):
    clean, corrupted = pair(length)
    mask = np.ones(clean.shape, bool)
    mask[1, -3:] = False  # row 1 right-padded by the user
    return clean, corrupted, mask


@pytest.mark.parametrize(
    "sender, receiver, sites",
    [
        ("m0", "logits", ["blocks.1.hook_resid_post"]),
        ("embed", "a1", [f"blocks.1.attn.hook_{kind}_input" for kind in "qkv"]),
    ],
)
def test_edge_attribution_equals_the_unpadded_formula(model, sender, receiver, sites):
    clean, corrupted, mask = user_padded_pair(13)
    kwargs = dict(answer=ANSWER, counterfactual=COUNTER, level="layers", method="eap", padding_mask=mask)
    each = C.edge_attribution(model, clean, corrupted, positions="each", **kwargs)
    summed = C.edge_attribution(model, clean, corrupted, **kwargs)
    assert len(each) == 13 * len(summed)  # real positions only
    site = {"m0": "blocks.0.hook_mlp_out", "embed": "hook_embed"}[sender]
    grad = receiver_gradient(model, clean, sites, mask)
    expected = (edge_delta(model, clean, corrupted, site, mask) * grad).sum(axis=(0, 2))  # per position
    rows = each.edges.query("sender == @sender and receiver == @receiver").sort_values("position")
    np.testing.assert_allclose(rows["score"], expected, atol=TOLERANCE)
    total = summed.edges.query("sender == @sender and receiver == @receiver")["score"]
    np.testing.assert_allclose(total, [expected.sum()], atol=TOLERANCE)
    np.testing.assert_allclose(
        [summed.clean_metric, summed.corrupted_metric],
        [last_logit_diff(model, reference(model, ids, mask=mask)[0], mask).mean() for ids in (clean, corrupted)],
        atol=TOLERANCE,
    )


def test_a_circuits_metric_function_reads_the_last_real_position(model):
    # `logits[:, -1]` is the input's last token, not the bucket's last slot:
    # the same edge scores as the default metric there (the rows' mean).
    clean, corrupted = pair(13)
    kwargs = dict(level="layers", method="eap")
    default = C.edge_attribution(model, clean, corrupted, answer=ANSWER, counterfactual=COUNTER, **kwargs)
    function = lambda logits: logits[:, -1, ANSWER] - logits[:, -1, COUNTER]
    scores = C.edge_attribution(model, clean, corrupted, function, **kwargs)
    np.testing.assert_allclose(scores.edges["score"], default.edges["score"], atol=TOLERANCE)
    assert scores.clean_metric == pytest.approx(default.clean_metric, abs=TOLERANCE)


@pytest.mark.parametrize("per_position", [False, True])
def test_faithfulness_equals_the_unpadded_edge_patch(model, per_position):
    # Every edge kept but m0 -> logits (at every position, or at position 12
    # only): the run is the clean one with that sender's corrupted-minus-clean
    # output added to the logits' input.
    clean, corrupted, mask = user_padded_pair(13)
    graph = C.Graph(model, "layers")
    edges = graph.edges.drop(columns="score")
    dropped = (edges.sender == "m0") & (edges.receiver == "logits")
    where = (slice(None), slice(None))
    if per_position:
        edges = pd.concat([edges.assign(position=t) for t in range(13)], ignore_index=True)
        dropped = (edges.sender == "m0") & (edges.receiver == "logits") & (edges.position == 12)
        where = (slice(None), slice(12, 13))
    delta = np.zeros(clean.shape + (HIDDEN,))
    delta[where] = edge_delta(model, clean, corrupted, "blocks.0.hook_mlp_out", mask)[where]
    hook = {"blocks.1.hook_resid_post": Hook(lambda x, ctx: x + ctx.data.astype(x.dtype), data=jnp.asarray(delta))}
    metric = lambda ids, hooks=None: last_logit_diff(model, reference(model, ids, hooks=hooks, mask=mask)[0], mask)
    full, empty, patched = metric(clean).mean(), metric(corrupted).mean(), metric(clean, hook).mean()
    circuit = C.Circuit(graph, edges[~dropped])
    result = C.faithfulness(model, circuit, clean, corrupted, answer=ANSWER, counterfactual=COUNTER, padding_mask=mask)
    np.testing.assert_allclose(result * (full - empty), patched - empty, atol=TOLERANCE)


# === Ten lengths, at most four programs ===


def lens(model, ids):
    tr = phi3lab.trace(model, ids, names="blocks.*.hook_resid_post")
    analysis.logit_lens(model, tr, k=2, where="post")


ENTRIES = {
    "trace": lambda model, ids: phi3lab.trace(model, ids, names="blocks.0.attn.hook_pattern"),
    "gradients": lambda model, ids: phi3lab.gradients(
        model, ids, answer=ANSWER, counterfactual=COUNTER, names="blocks.1.hook_resid_pre"
    ),
    "activation_patching": lambda model, ids: analysis.activation_patching(
        model, ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER, sites="head_z", progress=False
    ),
    "attribution_patching": lambda model, ids: analysis.attribution_patching(
        model, ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER
    ),
    "path_patching": lambda model, ids: analysis.path_patching(
        model, ids, (ids + 1) % 90, {(0, 1)}, "resid_final", answer=ANSWER, counterfactual=COUNTER
    ),
    "logit_lens": lens,
    "next_token_attribution": lambda model, ids: analysis.next_token_attribution(model, phi3lab.trace(model, ids)),
    "head_scores": lambda model, ids: analysis.head_scores(model, seq_len=ids.shape[1] // 2, num_sequences=1),
    "generate": lambda model, ids: phi3lab.generate(model, ids[0], max_new_tokens=2, stop=[]),
    "edge_attribution": lambda model, ids, **budget: C.edge_attribution(
        model, ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER, level="layers", method="eap", **budget
    ),
    "faithfulness": lambda model, ids, **budget: C.faithfulness(
        model, few_edges(model), ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER, **budget
    ),
    "faithfulness_curve": lambda model, ids, **budget: C.faithfulness_curve(
        model, unit_scores(model), ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER, sizes=[2], **budget
    ),
    "prune": lambda model, ids, **budget: C.prune(
        model, few_edges(model), ids, (ids + 1) % 90, answer=ANSWER, counterfactual=COUNTER, **budget
    ),
}


def few_edges(model) -> C.Circuit:
    graph = C.Graph(model, "layers")
    return C.Circuit(graph, graph.edges.head(3))


def unit_scores(model) -> C.EdgeScores:
    graph = C.Graph(model, "layers")
    ones = np.ones(graph.allowed.shape)
    return C.EdgeScores(graph, ones, clean_metric=0.0, corrupted_metric=0.0, method="eap", steps=1)


def random_transcoders(model) -> list[SparseDictionary]:
    return [
        SparseDictionary.init(
            jax.random.key(layer),
            kind="relu",
            d_in=HIDDEN,
            d_sae=16,
            site=f"blocks.{layer}.ln2.hook_normalized",
            target_site=f"blocks.{layer}.hook_mlp_out",
        )
        for layer in range(model.num_layers)
    ]


def programs_of_each_kind(model, before: set) -> Counter:
    """New cache entries by what they compile, shapes aside: a key of
    `compile_cache.ahead_of_time` is `(*what, shapes, attention_paths)`."""
    return Counter(key[:-2] + key[-1:] for key in compile_cache.entries(model) if key not in before)


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_ten_lengths_compile_at_most_four_programs_of_each_kind(entry):
    model = random_backbone(seed=6, scale=0.1, max_sequence_length=512)
    before = set(compile_cache.entries(model))
    for length in LENGTHS:
        ENTRIES[entry](model, np.random.default_rng(length).integers(3, 90, (1, length)).astype(np.int32))
    counts = programs_of_each_kind(model, before)
    assert counts, "the entry compiled nothing through the cache"
    assert max(counts.values()) <= 4, {key[0]: n for key, n in counts.items()}
    assert len({compile_cache.bucket_length(n, 512) for n in LENGTHS}) == 4


# === memory_budget=1 is refused before anything runs ===


REFUSED = {
    **ENTRIES,
    "trace": lambda model, ids, **budget: phi3lab.trace(model, ids, **budget),
    "gradients": lambda model, ids, **budget: phi3lab.gradients(model, ids, answer=ANSWER, **budget),
    "activation_patching": lambda model, ids, **budget: analysis.activation_patching(
        model, ids, ids, answer=ANSWER, progress=False, **budget
    ),
    "attribution_patching": lambda model, ids, **budget: analysis.attribution_patching(
        model, ids, ids, answer=ANSWER, **budget
    ),
    "path_patching": lambda model, ids, **budget: analysis.path_patching(
        model, ids, ids, "heads", "resid_final", answer=ANSWER, **budget
    ),
    "logit_lens": None,  # needs a trace first: below
    "next_token_attribution": None,
    "head_scores": lambda model, ids, **budget: analysis.head_scores(model, seq_len=4, **budget),
    "generate": lambda model, ids, **budget: phi3lab.generate(model, ids[0], max_new_tokens=2, **budget),
    # one prompt, not bucketed (docs/design.md, "Attribution graphs"): guarded only
    "attribution_graph": lambda model, ids, **budget: C.attribution_graph(
        model, ids[0], random_transcoders(model), **budget
    ),
}


READ_TRACE = {
    "logit_lens": lambda model, tr, **budget: analysis.logit_lens(model, tr, **budget),
    "logit_lens_logits": lambda model, tr, **budget: analysis.logit_lens_logits(model, tr, **budget),
    "answer_curve": lambda model, tr, **budget: analysis.answer_curve(model, tr, ANSWER, **budget),
    "decompose_resid": lambda model, tr, **budget: analysis.decompose_resid(model, tr, **budget),
    "direct_logit_attribution": lambda model, tr, **budget: analysis.direct_logit_attribution(
        model, tr, ANSWER, COUNTER, **budget
    ),
    "next_token_attribution": lambda model, tr, **budget: analysis.next_token_attribution(model, tr, **budget),
}


@pytest.mark.parametrize("entry", [*ENTRIES, *(e for e in READ_TRACE if e not in ENTRIES), "attribution_graph"])
def test_every_entry_refuses_an_over_budget_request_before_running(model, entry, monkeypatch):
    ids, _ = pair(9)
    if entry in READ_TRACE:
        tr = phi3lab.trace(model, ids)
        call = lambda **budget: READ_TRACE[entry](model, tr, **budget)
    else:
        call = lambda **budget: REFUSED[entry](model, ids, **budget)

    def ran(*args):
        raise AssertionError("a compiled program ran before the memory guard refused the request")

    monkeypatch.setattr(compile_cache.Program, "__call__", ran)
    with pytest.raises(CaptureTooLarge, match=r"would need .* \(memory_budget=1\)") as error:
        call(memory_budget=1)
    estimate = error.value.estimate
    assert estimate is not None and estimate.needed > 1 and estimate.available == 1
    assert estimate.weights == sum(np.asarray(w).nbytes for w in jax.tree.leaves(model.params()))
    with pytest.raises(ValueError, match="memory_budget"):
        call(memory_budget=0)
