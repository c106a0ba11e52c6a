"""Circuits core: the opt-in split hook points, `Graph`, edge attribution
(EAP / EAP-IG), edge patching, faithfulness and pruning.

Oracles: NumPy recomputations from the weights, `phi3lab.gradients` and
`phi3lab.trace` with hand-written hooks (independent of the circuits code),
and exact identities (a receiver's input is the sum of its senders').
"""

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
import phi3lab.circuits as C
from conftest import random_backbone
from phi3lab import tasks
from phi3lab.circuits.edge_patching import EdgePatcher
from phi3lab.circuits.inputs import prepare
from phi3lab.model import projections
from phi3lab.model.decoder import Phi3DecoderStack
from phi3lab.tracing import forward_fn
from phi3lab.tracing.names import all_names, select

LAYERS, HQ, HKV, D = 2, 4, 2, 64
SPLIT = ["blocks.*.attn.hook_q_input", "blocks.*.attn.hook_k_input", "blocks.*.attn.hook_v_input"]


@pytest.fixture(scope="module")
def model():
    return random_backbone(0, num_layers=LAYERS)


@pytest.fixture(scope="module")
def pair():
    """Clean and corrupted ids `[3, 7]` differing at two positions, and a
    logit-difference answer pair."""
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 96, (3, 7)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 2] = rng.integers(0, 96, 3)
    corrupted[:, 4] = rng.integers(0, 96, 3)
    return clean, corrupted, np.array([5, 7, 9]), np.array([11, 13, 15])


def logit_diff(logits, answer, counter):
    last = np.asarray(logits, np.float64)[:, -1]
    rows = np.arange(len(last))
    return float(np.mean(last[rows, answer] - last[rows, counter]))


def rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * np.asarray(scale, np.float64)


# === 1. Split input hook points ===


def test_split_sites_are_identity_and_have_their_shapes(model, pair):
    clean = pair[0]
    plain = phi3lab.trace(model, clean, names="hook_logits")
    names = [*SPLIT, "blocks.*.attn.hook_result", "blocks.*.hook_mlp_in", "blocks.*.hook_resid_pre"]
    split = phi3lab.trace(
        model, clean, names=[*names, "blocks.*.hook_attn_out", "blocks.*.hook_resid_mid", "hook_logits"]
    )
    # Equal up to XLA's order of sums (each head's output is summed after its projection).
    scale = np.abs(plain["hook_logits"]).max()
    np.testing.assert_allclose(split["hook_logits"], plain["hook_logits"], atol=1e-5 * scale)
    for layer in range(LAYERS):
        resid = split[f"blocks.{layer}.hook_resid_pre"]
        assert split[f"blocks.{layer}.attn.hook_q_input"].shape == (3, 7, HQ, D)
        for kind, heads in (("q", HQ), ("k", HKV), ("v", HKV)):
            copies = split[f"blocks.{layer}.attn.hook_{kind}_input"]
            np.testing.assert_array_equal(copies, np.repeat(resid[:, :, None], heads, axis=2))
        np.testing.assert_allclose(
            split[f"blocks.{layer}.attn.hook_result"].sum(2), split[f"blocks.{layer}.hook_attn_out"], atol=1e-5
        )
        np.testing.assert_array_equal(split[f"blocks.{layer}.hook_mlp_in"], split[f"blocks.{layer}.hook_resid_mid"])


def test_split_sites_stay_out_of_everything_and_of_broad_globs(model, pair):
    names = all_names(model)
    opt_in = ("_input", "hook_result", "hook_mlp_in")
    assert not any(name.endswith(opt_in) for name in names + select(None, names) + select(lambda n: True, names))
    broad = select("blocks.0.*", names)
    assert "blocks.0.attn.hook_q_input" not in broad and "blocks.0.hook_mlp_in" not in broad
    assert select("blocks.*.attn.hook_k_input", names) == [f"blocks.{i}.attn.hook_k_input" for i in range(LAYERS)]
    named = phi3lab.trace(model, pair[0][:1], names=["blocks.0.attn.hook_q_input", "blocks.0.hook_mlp_in"]).names
    assert named == ["blocks.0.attn.hook_q_input", "blocks.0.hook_mlp_in"]


def test_patching_one_heads_query_input_changes_only_that_heads_queries(model, pair):
    clean = pair[0]
    vector = np.random.default_rng(2).standard_normal(D).astype(np.float32)

    def shift_head_2(x, ctx):
        return x.at[:, :, 2].add(ctx.data)

    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v"]
    base = phi3lab.trace(model, clean, names=names)
    hooked = phi3lab.trace(
        model, clean, names=names, hooks={"blocks.1.attn.hook_q_input": phi3lab.hooks.Hook(shift_head_2, vector)}
    )
    for name in ("blocks.1.attn.hook_k", "blocks.1.attn.hook_v"):
        np.testing.assert_array_equal(hooked[name], base[name])
    q, q0 = hooked["blocks.1.attn.hook_q"], base["blocks.1.attn.hook_q"]
    np.testing.assert_array_equal(np.delete(q, 2, axis=2), np.delete(q0, 2, axis=2))
    # NumPy: head 2 projects ln1(resid + vector) through its query kernel slice.
    weights = {variable.path: np.asarray(variable.value) for variable in model.weights}
    norm, query = weights["attention_norm/scale"][1], weights["attention/query_kernel"][1]
    normalized = rms_norm(base["blocks.1.hook_resid_pre"] + vector, norm, model.layer_norm_epsilon)
    expected = np.einsum("btd,dh->bth", normalized, query[:, 2])
    np.testing.assert_allclose(q[:, :, 2], expected, atol=1e-4)


def test_mlp_input_site_changes_the_mlp_only(model, pair):
    vector = np.random.default_rng(3).standard_normal(D).astype(np.float32)
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    base = phi3lab.trace(model, pair[0], names=names)
    hooked = phi3lab.trace(model, pair[0], names=names, hooks=phi3lab.hooks.add("blocks.1.hook_mlp_in", vector))
    assert np.abs(hooked["blocks.1.hook_mlp_out"] - base["blocks.1.hook_mlp_out"]).max() > 1e-2
    np.testing.assert_allclose(
        hooked["blocks.1.hook_resid_post"] - hooked["blocks.1.hook_mlp_out"], base["blocks.1.hook_resid_mid"], atol=1e-5
    )


def _lowered(model, names, ids):
    fn = forward_fn(model, names=names)
    return jax.jit(fn).lower(model.params(), jnp.asarray(ids), jnp.ones(ids.shape, bool)).as_text()


def test_split_machinery_costs_nothing_when_unused(model, pair, monkeypatch):
    """The programs of a plain forward and of traces without the opt-in
    names equal those built with the split machinery switched off; naming a
    split site changes the program (so the comparison can fail)."""
    ids = pair[0]
    cases = [(), ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]]
    with_machinery = [_lowered(model, names, ids) for names in cases]
    split = _lowered(model, ["blocks.1.attn.hook_q_input"], ids)
    result = _lowered(model, ["blocks.1.attn.hook_result"], ids)
    with monkeypatch.context() as patch:
        patch.setattr(Phi3DecoderStack, "_head_inputs", lambda self, norm_params, x, sites: {})
        patch.setattr(projections, "output", lambda z, kernel, sites: projections.merged_output(z, kernel))
        without = [_lowered(model, names, ids) for names in cases]
        split_off = _lowered(model, ["blocks.1.attn.hook_q_input"], ids)
        result_off = _lowered(model, ["blocks.1.attn.hook_result"], ids)
    assert with_machinery == without
    assert split != split_off and result != result_off


# === 2. Graph ===


@pytest.mark.parametrize("level", C.LEVELS)
def test_graph_edges_run_forward_through_the_residual_stream(model, level):
    graph = C.Graph(model, level)
    nodes, edges = graph.nodes, graph.edges
    assert list(nodes.columns[:6]) == ["node", "kind", "layer", "position", "label", "score"]
    assert list(edges.columns) == ["sender", "receiver", "score"]
    assert set(edges.sender) | set(edges.receiver) <= set(nodes.node)
    layer = dict(zip(nodes.node, nodes.layer))
    kind = dict(zip(nodes.node, nodes.kind))
    mlps = level != "heads"
    expected = 0
    for receiver in graph.receivers:
        lr, kr = layer[receiver], kind[receiver]
        reach = 1  # the embedding
        for sender in graph.senders[1:]:
            ls, ks = layer[sender], kind[sender]
            ok = ls < lr or (ls == lr and kr == "mlp" and ks in ("head", "attention"))
            reach += ok
            assert ((edges.sender == sender) & (edges.receiver == receiver)).any() == ok, (sender, receiver)
        expected += reach
    assert len(edges) == len(graph) == expected
    heads = {"heads": HQ, "heads+mlps": HQ, "layers": 1}[level]
    assert len(graph.senders) == 1 + LAYERS * (heads + mlps)
    receivers_per_layer = (HQ + 2 * HKV if level != "layers" else 1) + mlps
    assert len(graph.receivers) == LAYERS * receivers_per_layer + 1
    if level != "layers":  # grouped-query: key/value receivers per key/value head
        assert sorted(nodes.query("kind == 'head_k' and layer == 0").node) == ["a0.kv0.k", "a0.kv1.k"]


# === 3. Edge attribution ===


def _receiver_attribution(graph, clean_acts, corrupted_acts, grads):
    """Node attribution (x_v(corrupted) - x_v(clean)) . grad, per receiver,
    written out site by site from traces."""
    out = {}
    for site in graph.sites:
        delta = (corrupted_acts[site.site] - clean_acts[site.site]).astype(np.float64) * grads[site.site]
        if site.heads and len(site.receivers) > 1:
            values = delta.sum(axis=(0, 1, 3))
        else:
            values = [delta.sum()]
        for receiver, value in zip(site.receivers, values):
            name = graph.receivers[receiver]
            out[name] = out.get(name, 0.0) + value
    return out


@pytest.mark.parametrize("level", ["heads+mlps", "layers"])
def test_eap_summed_into_a_receiver_is_its_node_attribution(model, pair, level):
    clean, corrupted, answer, counter = pair
    scores = C.edge_attribution(
        model, clean, corrupted, answer=answer, counterfactual=counter, level=level, method="eap"
    )
    graph = scores.graph
    names = list(graph.site_names)
    g = phi3lab.gradients(model, clean, answer=answer, counterfactual=counter, names=names)
    bad = phi3lab.trace(model, corrupted, names=names)
    expected = _receiver_attribution(graph, g, bad, {n: g.grad(n) / len(clean) for n in names})
    summed = scores.edges.groupby("receiver").score.sum()
    for receiver, value in expected.items():
        assert abs(summed[receiver] - value) <= 1e-4 * max(1.0, abs(value)), receiver
    assert scores.clean_metric == pytest.approx(float(np.mean(g.metric)), abs=1e-4)


def test_eap_ig_is_eap_at_one_step_and_averages_the_embedding_path(model, pair):
    clean, corrupted, answer, counter = pair
    kwargs = dict(answer=answer, counterfactual=counter, level="heads+mlps")
    eap = C.edge_attribution(model, clean, corrupted, method="eap", **kwargs)
    one = C.edge_attribution(model, clean, corrupted, method="eap-ig", steps=1, **kwargs)
    np.testing.assert_allclose(one.edges.score, eap.edges.score, rtol=1e-6, atol=1e-6)
    two = C.edge_attribution(model, clean, corrupted, method="eap-ig", steps=2, **kwargs)
    # Oracle: gradients at the logits' input with the embedding at alpha = 1/2 and 1.
    site = "blocks.1.hook_resid_post"
    bad_embed = phi3lab.trace(model, corrupted, names="hook_embed")["hook_embed"]

    def toward(x, ctx):
        return x + (1.0 - ctx.data[1]) * (ctx.data[0] - x)

    grads = [
        phi3lab.gradients(
            model, clean, answer=answer, counterfactual=counter, names=site,
            hooks={"hook_embed": phi3lab.hooks.Hook(toward, (bad_embed, np.float32(alpha)))},
        ).grad(site)
        for alpha in (0.5, 1.0)
    ]  # fmt: skip
    grad = (grads[0] + grads[1]) / 2 / len(clean)
    senders = phi3lab.trace(model, clean, names="blocks.0.hook_mlp_out")["blocks.0.hook_mlp_out"]
    bad_senders = phi3lab.trace(model, corrupted, names="blocks.0.hook_mlp_out")["blocks.0.hook_mlp_out"]
    expected = float(np.sum((bad_senders - senders).astype(np.float64) * grad))
    got = two.edges.query("sender == 'm0' and receiver == 'logits'").score.item()
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_scores_per_position_sum_to_the_summed_scores(model, pair):
    clean, corrupted, answer, counter = pair
    kwargs = dict(answer=answer, counterfactual=counter, method="eap", level="heads+mlps")
    summed = C.edge_attribution(model, clean, corrupted, **kwargs)
    each = C.edge_attribution(model, clean, corrupted, positions="each", **kwargs)
    assert len(each.edges) == len(summed.edges) * clean.shape[1]
    regrouped = each.edges.groupby(["sender", "receiver"], sort=False).score.sum().to_numpy()
    np.testing.assert_allclose(regrouped, summed.edges.score, atol=1e-5)
    assert set(each.nodes.node) == set(summed.graph.nodes.node)
    # Per-position circuits patch per position: every (edge, position) kept is the clean run.
    faithful = dict(answer=answer, counterfactual=counter)
    assert C.faithfulness(model, each.top(len(each)), clean, corrupted, **faithful) == pytest.approx(1.0)
    but_one = each.edges[~((each.edges.sender == "a0.h1") & (each.edges.receiver == "m1") & (each.edges.position == 2))]
    keep = C.Circuit(each.graph, but_one).keep_mask(clean.shape[1])
    assert (~keep).sum() == (~each.graph.allowed).sum() * clean.shape[1] + 1
    assert not keep[each.graph.senders.index("a0.h1"), each.graph.receivers.index("m1"), 2]


def test_circuits_is_a_lazy_attribute_of_phi3lab():
    assert phi3lab.circuits is C and "circuits" in dir(phi3lab)


# === 4. Edge patching and faithfulness ===


@pytest.mark.parametrize("position", [None, 2])
def test_patching_one_edge_is_a_hook_on_that_receivers_input_only(model, pair, position):
    clean, corrupted, answer, counter = pair
    graph = C.Graph(model, "heads+mlps")
    ids, bad, mask, metric = prepare(model, clean, corrupted, None, None, answer, counter)
    patcher = EdgePatcher(model, graph, ids, bad, mask, metric, "corrupted")
    keep = patcher.keep_all()  # [S, R, 1]: the same at every position
    if position is not None:
        keep = np.repeat(keep, clean.shape[1], axis=2)
    where = slice(None) if position is None else position
    keep[graph.senders.index("a0.h1"), graph.receivers.index("a1.kv0.v"), where] = False
    patched = patcher(keep)

    site = "blocks.0.attn.hook_result"
    delta = np.zeros((3, 7, D), np.float32)
    delta[:, where] = (
        phi3lab.trace(model, corrupted, names=site)[site][:, :, 1]
        - phi3lab.trace(model, clean, names=site)[site][:, :, 1]
    )[:, where]

    def patch_kv_head_0(x, ctx):
        return x.at[:, :, 0].add(ctx.data)

    hooked = phi3lab.trace(
        model,
        clean,
        names="hook_logits",
        hooks={"blocks.1.attn.hook_v_input": phi3lab.hooks.Hook(patch_kv_head_0, delta)},
    )
    expected = logit_diff(hooked["hook_logits"], answer, counter)
    assert abs(patched - expected) <= 1e-5 * max(1.0, abs(expected))
    assert (
        abs(expected - logit_diff(phi3lab.trace(model, clean, names="hook_logits")["hook_logits"], answer, counter))
        > 1e-4  # the edge matters (20x the tolerance above at position 2 alone)
    )


@pytest.mark.parametrize("level", ["heads+mlps", "layers"])
def test_full_graph_keeps_everything_and_empty_circuit_is_the_corrupted_run(model, pair, level):
    clean, corrupted, answer, counter = pair
    graph = C.Graph(model, level)
    ids, bad, mask, metric = prepare(model, clean, corrupted, None, None, answer, counter)
    full, empty = EdgePatcher(model, graph, ids, bad, mask, metric, "corrupted").bounds()
    clean_metric = logit_diff(phi3lab.trace(model, clean, names="hook_logits")["hook_logits"], answer, counter)
    bad_metric = logit_diff(phi3lab.trace(model, corrupted, names="hook_logits")["hook_logits"], answer, counter)
    assert full == pytest.approx(clean_metric, abs=1e-4)
    assert empty == pytest.approx(bad_metric, abs=1e-4)
    kwargs = dict(answer=answer, counterfactual=counter)
    assert C.faithfulness(model, C.Circuit(graph, graph.edges), clean, corrupted, **kwargs) == pytest.approx(1.0)
    assert C.faithfulness(model, C.Circuit(graph, []), clean, corrupted, **kwargs) == pytest.approx(0.0, abs=1e-6)


def test_mean_ablation_replaces_senders_by_their_mean_over_prompts(model, pair):
    clean, corrupted, answer, counter = pair
    graph = C.Graph(model, "layers")
    ids, bad, mask, metric = prepare(model, clean, corrupted, None, None, answer, counter)
    empty = EdgePatcher(model, graph, ids, bad, mask, metric, "mean")(np.zeros((5, 5, 7), bool))
    # Every edge mean-ablated: every receiver reads the mean of the clean
    # prompts' stream, so each MLP, each attention input and the logits'
    # input are the batch mean of the clean run; the attention still mixes
    # positions of its own row, so only the logits are checked: their input
    # is the mean final residual stream.
    mean_final = phi3lab.trace(model, clean, names="blocks.1.hook_resid_post")["blocks.1.hook_resid_post"].mean(0)
    replace = phi3lab.hooks.Hook(lambda x, ctx: jnp.broadcast_to(ctx.data, x.shape), mean_final)
    hooked = phi3lab.trace(model, clean, names="hook_logits", hooks={"blocks.1.hook_resid_post": replace})
    assert empty == pytest.approx(logit_diff(hooked["hook_logits"], answer, counter), abs=1e-4)


def test_curve_and_prune(model, pair):
    clean, corrupted, answer, counter = pair
    kwargs = dict(answer=answer, counterfactual=counter)
    scores = C.edge_attribution(model, clean, corrupted, level="layers", method="eap", **kwargs)
    curve = C.faithfulness_curve(model, scores, clean, corrupted, sizes=[0, 5, len(scores)], **kwargs)
    assert list(curve.columns) == ["edges", "fraction", "metric", "faithfulness"]
    assert curve.faithfulness.iloc[0] == pytest.approx(0.0, abs=1e-6) and curve.faithfulness.iloc[-1] == pytest.approx(
        1.0
    )
    assert curve.metric.iloc[-1] == pytest.approx(scores.clean_metric, abs=1e-4)
    assert list(curve.figure().data[0].y) == list(curve.faithfulness)
    start = scores.top(20)
    pruned = C.prune(model, start, clean, corrupted, tolerance=0.05, **kwargs)
    assert len(pruned) < len(start) and set(zip(pruned.edges.sender, pruned.edges.receiver)) <= set(
        zip(start.edges.sender, start.edges.receiver)
    )
    before = C.faithfulness(model, start, clean, corrupted, **kwargs)
    assert C.faithfulness(model, pruned, clean, corrupted, **kwargs) >= before - 0.05 - 1e-9


# === 5. Bad input ===


def test_bad_input_is_refused_clearly(model, pair):
    clean, corrupted, answer, counter = pair
    graph = C.Graph(model, "heads")
    with pytest.raises(ValueError, match="later receiver.*'a1.h0' -> 'a0.h0.q'"):
        C.Circuit(graph, [("a1.h0", "a0.h0.q")])
    with pytest.raises(ValueError, match="a0.h0' -> 'a0.h2.q'"):
        C.Circuit(graph, [("a0.h0", "a0.h2.q")])  # a head does not reach its own layer's heads
    with pytest.raises(ValueError, match="level.*'neurons'"):
        C.Graph(model, "neurons")
    with pytest.raises(ValueError, match="level"):
        C.edge_attribution(model, clean, corrupted, answer=answer, level="edges")
    with pytest.raises(ValueError, match="clean.*one length.*padding_mask.*lengths \\[3, 4\\]"):
        C.edge_attribution(model, [[1, 2, 3], [1, 2, 3, 4]], [[1, 2, 3], [1, 2, 3, 4]], answer=1)
    with pytest.raises(ValueError, match="corrupted.*shape.*clean"):
        C.edge_attribution(model, clean, corrupted[:, :5], answer=answer)
    with pytest.raises(ValueError, match="method"):
        C.edge_attribution(model, clean, corrupted, answer=answer, method="acdc")
    with pytest.raises(ValueError, match="ablation"):
        C.faithfulness(model, C.Circuit(graph, []), clean, corrupted, answer=answer, ablation="zero")


# === 6. The shipped model's name-mover circuit ===


@pytest.mark.slow
@pytest.mark.parametrize("template", ["training", "held-out"])
def test_shipped_name_mover_circuit_is_found_and_is_faithful(template, shipped_model, shipped_tokenizer):
    model, tokenizer = shipped_model, shipped_tokenizer
    templates = tasks.TEMPLATES if template == "training" else tasks.HELD_OUT_TEMPLATES
    prompts = tasks.name_mover_prompts(24, seed=21, templates=templates)  # held-out names, both orders
    assert {p.order for p in prompts} == {"ABBA", "BABA"}
    clean = tasks.name_mover_batch(tokenizer, prompts)
    corrupted = tasks.name_mover_batch(tokenizer, prompts, corrupted=True)
    np.testing.assert_array_equal(clean.padding_mask, corrupted.padding_mask)
    kwargs = dict(answer=clean.answer, counterfactual=clean.counterfactual, padding_mask=clean.padding_mask)
    scores = C.edge_attribution(model, clean.token_ids, corrupted.token_ids, level="heads+mlps", **kwargs)
    top = scores.top(20).edges
    movers = {"a3.h2", "a3.h3"}
    assert movers <= set(top.sender), top
    assert "a0.h1" in set(top.sender)  # the token head
    size = int(0.1 * len(scores))
    kept = C.faithfulness(model, scores.top(size), clean.token_ids, corrupted.token_ids, **kwargs)
    assert kept >= 0.9, kept  # measured 1.00 (training templates) and 1.04 (held-out template)
    # Exact check of the ranking: greedy pruning by edge patching keeps the documented chain,
    # token head 0.1 -> the movers' values -> movers -> (MLP 3 ->) logits (7 edges, 0.999, measured).
    pruned = C.prune(model, scores.top(size), clean.token_ids, corrupted.token_ids, tolerance=0.05, **kwargs)
    edges = set(zip(pruned.edges.sender, pruned.edges.receiver))
    assert len(edges) <= 12 and ("a0.h1", "a3.kv1.v") in edges and movers <= set(pruned.edges.sender), edges
    assert C.faithfulness(model, pruned, clean.token_ids, corrupted.token_ids, **kwargs) >= kept - 0.05
