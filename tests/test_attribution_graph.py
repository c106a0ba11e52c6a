"""Feature attribution graphs (`phi3lab.circuits.attribution_graph`) on the
shipped model and its shipped transcoders.

The oracles: the model's own logits and the transcoders' own pre-activations
(exact sums), a NumPy propagation through the frozen linear model written
from the formulas (single edges), `jax.jvp` of the model's forward with the
patterns and norm scales frozen by hooks written here (one edge),
circuit-tracer's influence, scores and pruning (`compute_node_influence`,
`compute_graph_scores`, `prune_graph`) and its pydantic schema of the
viewer's JSON.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
import phi3lab.circuits as C
import phi3lab.features as F
from conftest import require
from phi3lab import tasks
from phi3lab.circuits import influence
from phi3lab.model.attention import key_value_heads
from phi3lab.tracing.hook_types import Hook, Hooks

PRESET = "phi3lab_tiny_en"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def transcoders():
    return [F.from_preset(PRESET, f"transcoder_{layer}") for layer in range(4)]


@pytest.fixture(scope="module")
def prompt(shipped_tokenizer):
    """A held-out name-mover prompt and its two names' token ids."""
    p = tasks.name_mover_prompts(1, seed=3000, orders=("BABA",))[0]
    return p.text, tasks.name_token(shipped_tokenizer, p.answer), tasks.name_token(shipped_tokenizer, p.counterfactual)


@pytest.fixture(scope="module")
def clean(shipped_model, shipped_tokenizer, prompt):
    """An independent trace of the prompt: every site the oracles read."""
    return phi3lab.trace(shipped_model, prompt[0], tokenizer=shipped_tokenizer)


@pytest.fixture(scope="module")
def graph(shipped_model, shipped_tokenizer, prompt):
    """The whole graph (unpruned) of the logit difference answer - repeated name."""
    text, answer, repeated = prompt
    return C.attribution_graph(
        shipped_model, text, PRESET, tokenizer=shipped_tokenizer, target=(answer, repeated), node_threshold=None
    )


def test_logit_is_the_sum_of_its_direct_effects_and_biases(graph, clean, prompt):
    _, answer, repeated = prompt
    logits = np.asarray(clean.logits[0, -1], np.float64)
    expected = logits[answer] - logits[repeated]
    assert graph.node_table["kind"].iloc[-1] == "logits"
    assert abs(graph.values()[-1] - expected) <= TOLERANCE
    assert abs(graph.node_table["activation"].iloc[-1] - expected) <= TOLERANCE
    # the transcoders' decoder biases reach the logit, but carry little of it
    assert abs(graph.bias[-1]) < 0.5 * abs(expected)


def test_every_feature_is_the_sum_of_its_direct_effects_and_bias(graph, clean, transcoders):
    features = graph.node_table[graph.node_table["kind"] == "feature"]
    assert len(features) > 100  # every active feature is a node (no max_feature_nodes)
    expected = []
    active = 0
    for layer, transcoder in enumerate(transcoders):
        x = jnp.asarray(clean[f"blocks.{layer}.ln2.hook_normalized"][0])
        pre = np.asarray(transcoder.pre_activations(x))
        acts = np.asarray(transcoder.encode(x))
        active += np.count_nonzero(acts)
        rows = features[features["layer"] == layer]
        expected.append(pre[rows["position"], rows["feature"]])
        np.testing.assert_allclose(rows["activation"], acts[rows["position"], rows["feature"]], atol=1e-5)
    assert active == len(features)
    values = graph.values()[: len(features)]
    order = np.argsort(features["layer"].to_numpy(), kind="stable")
    np.testing.assert_allclose(values[order], np.concatenate(expected), atol=TOLERANCE, rtol=0)


def test_token_error_and_feature_edges_match_a_numpy_frozen_model(shipped_model, graph, clean, transcoders, prompt):
    """Single edges against the frozen linear model propagated in NumPy:
    attention patterns and RMS scales read from the clean trace, values
    through each later layer's value and output kernels, MLPs cut."""
    _, answer, repeated = prompt
    params = shipped_model.params()
    attention = params["decoder"]["attention"]
    value, output = (np.asarray(attention[k], np.float64) for k in ("value_kernel", "output_kernel"))
    norms = {k: np.asarray(params["decoder"][k]["scale"], np.float64) for k in ("attention_norm", "mlp_norm")}
    final_weight = np.asarray(params["final_norm"]["scale"], np.float64)
    heads = key_value_heads(shipped_model.num_query_heads, shipped_model.num_key_value_heads)
    epsilon = shipped_model.decoder.attention_norm.epsilon
    inverse_rms = lambda x: 1.0 / np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, -1, keepdims=True) + epsilon)
    site = lambda layer, name: np.asarray(clean[f"blocks.{layer}.{name}"][0], np.float64)

    def propagate(delta, first_layer, receiver_layer=None):
        """The change `delta [T, D]` of the residual stream entering block
        `first_layer` makes at `receiver_layer`'s transcoder input (or at the
        final normalised stream)."""
        for layer in range(first_layer, shipped_model.num_layers):
            normalized = delta * inverse_rms(site(layer, "hook_resid_pre")) * norms["attention_norm"][layer]
            v = np.einsum("td,dkh->tkh", normalized, value[layer])[:, heads]
            pattern = np.asarray(clean[f"blocks.{layer}.attn.hook_pattern"][0], np.float64)
            delta = delta + np.einsum("nts,snh,nhd->td", pattern, v, output[layer])
            if layer == receiver_layer:
                return delta * inverse_rms(site(layer, "hook_resid_mid")) * norms["mlp_norm"][layer]
        final = np.asarray(clean[f"blocks.{shipped_model.num_layers - 1}.hook_resid_post"][0], np.float64)
        return delta * inverse_rms(final) * final_weight

    def on_logit(normalized):
        logits = np.asarray(shipped_model.unembed(params, jnp.asarray(normalized[-1], jnp.float32)), np.float64)
        return logits[answer] - logits[repeated]

    table = graph.node_table
    index = {node: i for i, node in enumerate(table["node"])}
    length = len(graph.token_ids)

    def source(node):
        """`(delta [T, D] written into the stream, first block that reads it)`."""
        row = table.iloc[index[node]]
        delta = np.zeros((length, shipped_model.hidden_dim))
        if row.kind == "token":
            delta[row.position] = clean["hook_embed"][0][row.position]
            return delta, 0
        transcoder = transcoders[row.layer]
        if row.kind == "feature":
            assert not transcoder.config.rescale_acts_by_decoder_norm
            delta[row.position] = row.activation * np.asarray(transcoder.W_dec[row.feature], np.float64)
        else:
            x = jnp.asarray(clean[f"blocks.{row.layer}.ln2.hook_normalized"][0][row.position])
            delta[row.position] = site(row.layer, "hook_mlp_out")[row.position] - np.asarray(transcoder(x))
        return delta, row.layer + 1

    answer_position = int(np.flatnonzero(graph.token_ids == answer)[0])
    logit_row = graph.adjacency[-1]
    strongest_feature = table["node"][int(np.argmax(np.where(table["kind"] == "feature", np.abs(logit_row), 0)))]
    for node in (f"T@{answer_position}", f"E2@{length - 1}", f"E0@{answer_position}", strongest_feature):
        expected = on_logit(propagate(*source(node)))
        assert abs(logit_row[index[node]] - expected) <= TOLERANCE * max(1.0, abs(expected)), node
    # a feature -> feature edge: the strongest edge into a layer-3 feature from a layer-1 feature
    layers = table["layer"].to_numpy()
    kinds = table["kind"].to_numpy()
    receivers = np.flatnonzero((kinds == "feature") & (layers == 3))
    senders = (kinds == "feature") & (layers == 1)
    block = np.abs(graph.adjacency[receivers][:, senders])
    r, s = np.unravel_index(np.argmax(block), block.shape)
    receiver, sender = table.iloc[receivers[r]], table.iloc[np.flatnonzero(senders)[s]]
    at_input = propagate(*source(sender["node"]), receiver_layer=3)[receiver.position]
    expected = at_input @ np.asarray(transcoders[3].W_enc[:, receiver.feature], np.float64)
    assert abs(block[r, s]) > 0.01
    assert abs(graph.adjacency[receivers[r], np.flatnonzero(senders)[s]] - expected) <= TOLERANCE


def _scaled(x, ctx):
    """`ln*.hook_normalized` as its input times the clean run's ratio (data):
    the norm with its scale frozen, written apart from the library's hooks."""
    source, last = ctx.static
    resid = ctx.seen[last if ctx.layer is None else f"blocks.{ctx.layer}.{source}"]
    return resid * (ctx.data if ctx.layer is None else ctx.data[ctx.layer])


def test_one_edge_equals_a_jvp_of_the_model_with_frozen_patterns_and_scales(shipped_model, graph, clean, prompt):
    """`jax.jvp` of the model (its own `forward_fn`) with every attention
    pattern replaced by the clean one, every norm by its input times the
    clean ratio, every MLP output by its clean value plus `t` x a feature's
    output at its layer and position: d logit / d t at 0 is that feature's
    edge into the logit."""
    _, answer, repeated = prompt
    layers = range(shipped_model.num_layers)
    last = f"blocks.{shipped_model.num_layers - 1}.hook_resid_post"
    stack = lambda name: jnp.asarray(np.stack([clean[f"blocks.{l}.{name}"] for l in layers]))
    ratio = lambda normalized, resid: stack(normalized) / stack(resid)
    table, row = graph.node_table, graph.adjacency[-1]
    strongest = int(np.argmax(np.where(table["kind"] == "feature", np.abs(row), 0)))
    layer, position, feature = (int(table[c][strongest]) for c in ("layer", "position", "feature"))
    transcoder = F.from_preset(PRESET, f"transcoder_{layer}")
    direction = np.zeros(stack("hook_mlp_out").shape, np.float32)
    direction[layer, 0, position] = table["activation"][strongest] * np.asarray(transcoder.W_dec[feature])
    hooks = [
        ("blocks.*.hook_resid_pre", lambda x, ctx: None),
        ("blocks.*.hook_resid_mid", lambda x, ctx: None),
        (last, lambda x, ctx: None),
        ("blocks.*.attn.hook_pattern", lambda x, ctx: ctx.data[ctx.layer]),
        ("blocks.*.ln1.hook_normalized", Hook(_scaled, static=("hook_resid_pre", last))),
        ("blocks.*.ln2.hook_normalized", Hook(_scaled, static=("hook_resid_mid", last))),
        ("ln_final.hook_normalized", Hook(_scaled, static=(None, last))),
        ("blocks.*.hook_mlp_out", lambda x, ctx: ctx.data[0][ctx.layer] + ctx.data[1] * ctx.data[2][ctx.layer]),
    ]
    fn = phi3lab.tracing.forward_fn(shipped_model, hooks=Hooks(hooks))
    final_ratio = jnp.asarray(clean["ln_final.hook_normalized"] / clean[last])
    fixed = (
        None,
        None,
        None,
        stack("attn.hook_pattern"),
        ratio("ln1.hook_normalized", "hook_resid_pre"),
        ratio("ln2.hook_normalized", "hook_resid_mid"),
        final_ratio,
    )

    def logit_difference(t):
        data = fixed + ((stack("hook_mlp_out"), t, jnp.asarray(direction)),)
        logits = shipped_model.unembed(
            shipped_model.params(), fn(shipped_model.params(), jnp.asarray(clean.token_ids), None, data).hidden
        )
        return logits[0, -1, answer] - logits[0, -1, repeated]

    value, effect = jax.jvp(logit_difference, (jnp.float32(0.0),), (jnp.float32(1.0),))
    assert abs(float(value) - graph.values()[-1]) <= 1e-3  # the frozen run is the clean run
    assert abs(float(effect) - row[strongest]) <= TOLERANCE * max(1.0, abs(row[strongest]))


def test_transcoders_that_write_nothing_leave_tokens_and_errors(shipped_model, shipped_tokenizer, prompt, clean):
    text, answer, _ = prompt
    nothing = [
        dataclasses.replace(
            F.from_preset(PRESET, f"transcoder_{layer}"),
            W_enc=jnp.zeros((128, 1024)),
            b_enc=jnp.zeros(1024),
            W_dec=jnp.zeros((1024, 128)),
            b_dec=jnp.zeros(128),
        )
        for layer in range(4)
    ]
    graph = C.attribution_graph(
        shipped_model, text, nothing, tokenizer=shipped_tokenizer, target=answer, node_threshold=None
    )
    assert set(graph.node_table["kind"]) == {"token", "error", "logits"}
    assert abs(graph.values()[-1] - float(clean.logits[0, -1, answer])) <= TOLERANCE
    assert graph.bias[-1] == 0.0
    # each error node is the whole MLP output at its position
    assert graph.node_table["layer"].max() == 4
    pruned = graph.prune(0.8, 0.98)
    assert set(pruned.node_table["kind"]) <= {"token", "error", "logits"}


def test_pruning_matches_circuit_tracer(graph):
    """The same node influence, replacement and completeness scores, and the
    same kept nodes and edges, as circuit-tracer (`compute_node_influence`,
    `compute_graph_scores`, `prune_graph`) on the same adjacency matrix."""
    torch = require("torch")
    tracer_graph = require("circuit_tracer.graph")
    kinds = graph.node_table["kind"].to_numpy()
    duck = types.SimpleNamespace(
        adjacency_matrix=torch.tensor(graph.adjacency),
        input_tokens=list(graph.token_ids),
        logit_targets=[graph.target[0]],
        selected_features=list(range(int(np.sum(kinds == "feature")))),
        logit_probabilities=torch.tensor([1.0]),
    )
    weights = torch.tensor(graph.logit_weights(), dtype=torch.float32)
    theirs = tracer_graph.compute_node_influence(duck.adjacency_matrix, weights).numpy()
    np.testing.assert_allclose(graph.influence(), theirs, rtol=1e-4, atol=1e-7)
    duck.cfg = types.SimpleNamespace(n_layers=4)
    replacement, completeness = tracer_graph.compute_graph_scores(duck)
    ours = graph.scores()
    np.testing.assert_allclose([ours["replacement"], ours["completeness"]], [replacement, completeness], rtol=1e-4)
    assert 0 < ours["replacement"] < ours["completeness"] < 1
    always = np.isin(kinds, ("token", "logits"))
    for node_threshold, edge_threshold in ((0.8, 0.98), (0.5, 0.9), (0.95, 0.99)):
        theirs = tracer_graph.prune_graph(duck, node_threshold=node_threshold, edge_threshold=edge_threshold)
        nodes, edges, _ = influence.prune_masks(
            graph.adjacency, graph.logit_weights(), always, kinds == "feature", node_threshold, edge_threshold
        )
        np.testing.assert_array_equal(nodes, theirs.node_mask.numpy())
        np.testing.assert_array_equal(edges, theirs.edge_mask.numpy())


def test_pruning_keeps_the_asked_fraction_of_influence(graph):
    scores = graph.influence()
    for fraction in (0.5, 0.8, 0.95):
        kept = scores >= influence.threshold_for(scores, fraction)
        assert scores[kept].sum() >= fraction * scores.sum()
        # and not more nodes than needed: without the least influential kept node it falls short
        weakest = np.flatnonzero(kept)[np.argmin(scores[kept])]
        assert scores[kept].sum() - scores[weakest] < fraction * scores.sum() + 1e-12
    pruned = graph.prune(0.8, 0.98)
    full_ids = list(graph.node_table["node"])
    assert len(pruned.node_table) < len(full_ids) / 4
    assert set(pruned.node_table["kind"]) >= {"token", "logits", "feature"}
    # kept edges keep their weights, and every receiver still sums to its value
    index = [full_ids.index(node) for node in pruned.node_table["node"]]
    kept = pruned.adjacency != 0
    np.testing.assert_array_equal(pruned.adjacency[kept], graph.adjacency[np.ix_(index, index)][kept])
    np.testing.assert_allclose(pruned.values()[-1], graph.values()[-1], atol=TOLERANCE)


def test_display_protocol(graph):
    nodes, edges = graph.nodes, graph.edges
    for column in ("node", "kind", "layer", "position", "label", "score", "feature", "dictionary"):
        assert column in nodes
    assert nodes["node"].is_unique
    assert set(nodes["kind"]) == {"feature", "error", "token", "logits"}
    features = nodes[nodes["kind"] == "feature"]
    assert set(features["dictionary"]) <= {f"transcoder_{layer}" for layer in range(4)}
    assert (nodes.loc[nodes["kind"] == "token", "layer"] == -1).all()
    assert (nodes.loc[nodes["kind"] == "logits", "layer"] == 4).all()
    assert list(edges.columns[:3]) == ["sender", "receiver", "score"]
    assert set(edges["sender"]) | set(edges["receiver"]) <= set(nodes["node"])
    assert len(edges) == np.count_nonzero(graph.adjacency)


def test_json_round_trip_and_circuit_tracer_schema(graph, tmp_path):
    pruned = graph.prune(0.8, 0.98)
    path = tmp_path / "name-mover.json"
    pruned.save(path)
    back = C.AttributionGraph.from_json(path)
    columns = ["node", "kind", "layer", "position", "feature", "dictionary", "token_id"]
    assert back.node_table[columns].equals(pruned.node_table[columns])
    np.testing.assert_array_equal(back.node_table["activation"], pruned.node_table["activation"])
    np.testing.assert_array_equal(back.adjacency, pruned.adjacency)
    assert back.tokens == pruned.tokens and back.dictionaries == pruned.dictionaries
    assert back.target == pruned.target[:1] and back.position == pruned.position
    data = pruned.to_json(slug="name-mover")
    assert data["metadata"]["schema_version"] == 1
    models = require("circuit_tracer.frontend.graph_models")
    validated = models.Model.model_validate(data)
    assert len(validated.nodes) == len(pruned.node_table)
    assert {node.feature_type for node in validated.nodes} == {
        "cross layer transcoder",
        "mlp reconstruction error",
        "embedding",
        "logit",
    }
    feature = next(node for node in validated.nodes if node.feature_type == "cross layer transcoder")
    layer, index, position = map(int, feature.node_id.split("_"))
    reference = models.Node.feature_node(layer, position, index)
    assert (feature.feature, feature.jsNodeId, feature.layer) == (
        reference.feature,
        reference.jsNodeId,
        reference.layer,
    )


def test_reads_a_graph_written_by_circuit_tracer():
    """A graph made with circuit-tracer's own node constructors and `Model`
    (a preset scan: empty transcoder_list; two logit nodes) reads back."""
    models = require("circuit_tracer.frontend.graph_models")
    nodes = [
        models.Node.feature_node(1, 2, 77, influence=0.5, activation=3.0),
        models.Node.error_node(0, 2, influence=0.7),
        models.Node.token_node(0, 11, influence=0.9),
        models.Node.token_node(2, 12, influence=0.8),
        models.Node.logit_node(2, 40, "x", num_layers=2, target_logit=True, token_prob=0.6),
        models.Node.logit_node(2, 41, "y", num_layers=2, token_prob=0.1),
    ]
    links = [
        {"source": nodes[2].node_id, "target": nodes[0].node_id, "weight": 1.5},
        {"source": nodes[1].node_id, "target": nodes[0].node_id, "weight": -0.25},
        {"source": nodes[0].node_id, "target": nodes[4].node_id, "weight": 2.0},
        {"source": nodes[3].node_id, "target": nodes[5].node_id, "weight": 0.5},
    ]
    metadata = models.Metadata(
        slug="s", scan="tiny-scan", transcoder_list=[], prompt_tokens=["a", "b", "c"], prompt="a b c"
    )
    q_params = models.QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    data = models.Model(metadata=metadata, qParams=q_params, nodes=nodes, links=links).model_dump()
    graph = C.AttributionGraph.from_json(data)
    table = graph.node_table
    assert list(table["kind"]) == ["feature", "error", "token", "token", "logits", "logits"]
    assert list(table["layer"]) == [1, 0, -1, -1, 2, 2] and list(table["position"]) == [2, 2, 0, 2, 2, 2]
    assert (table["feature"][0], table["dictionary"][0], table["activation"][0]) == (77, "tiny-scan_1", 3.0)
    assert graph.target == (40,) and list(table["node"][4:]) == ["logit", "logit@41"]
    assert list(graph.token_ids) == [11, -1, 12]
    edges = {(e.sender, e.receiver): e.score for e in graph.edges.itertuples()}
    assert edges == {
        ("T@0", "F1.77@2"): 1.5,
        ("E0@2", "F1.77@2"): -0.25,
        ("F1.77@2", "logit"): 2.0,
        ("T@2", "logit@41"): 0.5,
    }


def test_one_compiled_program_per_prompt_shape(shipped_model, shipped_tokenizer, prompt, clean):
    # compiled ahead of time per input shape (the run pipeline): other
    # targets and feature limits on the same prompt reuse the program
    from phi3lab.runtime import compile_cache

    text, answer, _ = prompt
    before = compile_cache.size(shipped_model, "attribution_graph.effects")
    C.attribution_graph(shipped_model, text, PRESET, tokenizer=shipped_tokenizer, target=answer, max_feature_nodes=64)
    after = compile_cache.size(shipped_model, "attribution_graph.effects")
    assert after - before <= 1
    graph = C.attribution_graph(
        shipped_model, text, PRESET, tokenizer=shipped_tokenizer, max_feature_nodes=64, node_threshold=None
    )
    assert compile_cache.size(shipped_model, "attribution_graph.effects") == after
    assert (graph.node_table["kind"] == "feature").sum() == 64
    # the features left out move into the biases: the logit still sums exactly
    assert abs(graph.values()[-1] - float(clean.logits[0, -1].max())) <= TOLERANCE
    assert graph.target == (int(np.argmax(clean.logits[0, -1])),)  # target=None: the top token


def test_max_feature_nodes_keeps_the_most_influential_features(shipped_model, shipped_tokenizer, prompt, graph):
    """Visited by influence a batch at a time, 128 features are nearly the
    top 128 by influence in the whole graph (measured: 96% on a 32-token
    prompt at 256 of 2,033), and the logit still sums exactly."""
    text, answer, repeated = prompt
    limited = C.attribution_graph(
        shipped_model,
        text,
        PRESET,
        tokenizer=shipped_tokenizer,
        target=(answer, repeated),
        max_feature_nodes=128,
        batch_size=32,
        node_threshold=None,
    )
    features = graph.node_table[graph.node_table["kind"] == "feature"]
    top = set(features.sort_values("score", ascending=False)["node"][:128])
    chosen = set(limited.node_table.loc[limited.node_table["kind"] == "feature", "node"])
    assert len(chosen) == 128
    assert len(top & chosen) >= 0.9 * 128
    assert abs(limited.values()[-1] - graph.values()[-1]) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settings", "tolerance"), [({"quantization": "int8"}, TOLERANCE), ({"dtype": "bfloat16"}, 0.1)]
)
def test_int8_and_bfloat16_models(shipped_tokenizer, prompt, settings, tolerance):
    """The int8 model sums exactly too; the bfloat16 model to its precision
    (the logit is ~17: bfloat16 steps of 0.0625 there)."""
    shipped_model = phi3lab.Phi3Backbone.from_preset(PRESET, **settings)
    text, answer, _ = prompt
    graph = C.attribution_graph(
        shipped_model, text, PRESET, tokenizer=shipped_tokenizer, target=answer, node_threshold=None
    )
    logit = float(
        phi3lab.trace(shipped_model, text, tokenizer=shipped_tokenizer, names="hook_logits").logits[0, -1, answer]
    )
    assert abs(graph.values()[-1] - logit) <= tolerance


def test_bad_input(shipped_model, shipped_tokenizer, prompt, transcoders):
    text = prompt[0]
    with pytest.raises(ValueError, match="`transcoders` must be .*replaces every MLP"):
        C.attribution_graph(shipped_model, text, None, tokenizer=shipped_tokenizer)
    with pytest.raises(ValueError, match=r"`transcoders\[0\]` must be a transcoder reading 'blocks.0.ln2"):
        C.attribution_graph(shipped_model, text, transcoders[1:] + transcoders[:1], tokenizer=shipped_tokenizer)
    with pytest.raises(ValueError, match="a layer is missing"):
        C.attribution_graph(shipped_model, text, transcoders[:3], tokenizer=shipped_tokenizer)
    narrow = F.SparseDictionary.init(
        jax.random.key(0),
        kind="topk",
        d_in=64,
        d_sae=32,
        k=4,
        site="blocks.2.ln2.hook_normalized",
        target_site="blocks.2.hook_mlp_out",
    )
    with pytest.raises(ValueError, match="hidden_dim = 128"):
        C.attribution_graph(
            shipped_model, text, transcoders[:2] + [narrow] + transcoders[3:], tokenizer=shipped_tokenizer
        )
    sae = F.from_preset(PRESET, "resid_post_2")
    with pytest.raises(ValueError, match=r"`transcoders\[2\]`"):
        C.attribution_graph(shipped_model, text, transcoders[:2] + [sae] + transcoders[3:], tokenizer=shipped_tokenizer)
    with pytest.raises(ValueError, match="`target`"):
        C.attribution_graph(shipped_model, text, transcoders, tokenizer=shipped_tokenizer, target=10**6)
    with pytest.raises(ValueError, match="`target`"):
        C.attribution_graph(shipped_model, text, transcoders, tokenizer=shipped_tokenizer, target=(5, 5))
    with pytest.raises(ValueError, match="`position`"):
        C.attribution_graph(shipped_model, text, transcoders, tokenizer=shipped_tokenizer, position=500)
    with pytest.raises(ValueError, match="one prompt"):
        C.attribution_graph(shipped_model, np.ones((2, 5), np.int32), transcoders)
    with pytest.raises(ValueError, match="`node_threshold`"):
        C.attribution_graph(
            shipped_model, text, transcoders, tokenizer=shipped_tokenizer, max_feature_nodes=8, node_threshold=1.5
        )


@pytest.mark.slow
@pytest.mark.parametrize("order", tasks.ORDERS)
def test_name_mover_graph_runs_through_the_answer_token_and_layer_3(shipped_model, shipped_tokenizer, order):
    """Held-out names, training and held-out templates, each order: in the
    graph of the answer-minus-repeated-name logit,
    * the strongest token -> logit edge comes from the answer name's (only)
      mention, and it is positive on most prompts (the layer-3 movers' OV
      paths copy it; measured: positive on 30 of 32 prompts of seed 4000);
    * the four strongest non-token senders are layer-3 nodes (MLP 3's
      features and error) at the last position (measured: the fifth to eighth
      include layer-2 features there), and layer-3 nodes at the last position
      carry >= 45% of the logit's incoming |edges| (measured: 50-73%)."""
    positive = 0
    for template in (tasks.TEMPLATES, tasks.HELD_OUT_TEMPLATES):
        for p in tasks.name_mover_prompts(2, seed=3000, orders=(order,), templates=template):
            answer, repeated = (
                tasks.name_token(shipped_tokenizer, p.answer),
                tasks.name_token(shipped_tokenizer, p.counterfactual),
            )
            graph = C.attribution_graph(
                shipped_model,
                p.text,
                PRESET,
                tokenizer=shipped_tokenizer,
                target=(answer, repeated),
                node_threshold=None,
            )
            table, row = graph.node_table, np.abs(graph.adjacency[-1])
            kinds, last = table["kind"].to_numpy(), len(graph.token_ids) - 1
            tokens = np.flatnonzero(kinds == "token")
            strongest_token = tokens[np.argmax(row[tokens])]
            assert graph.token_ids[table["position"][strongest_token]] == answer, p.text
            positive += graph.adjacency[-1, strongest_token] > 0
            layer_3_last = (table["layer"].to_numpy() == 3) & (table["position"].to_numpy() == last)
            others = [i for i in np.argsort(-row) if kinds[i] != "token"][:4]
            assert layer_3_last[others].all(), p.text
            assert row[layer_3_last].sum() >= 0.45 * row.sum(), p.text
    assert positive >= 3
