"""CircuitView on hand-built objects of the graph display protocol: drawn edges
against the top edges by |score| computed with pandas, the layout against the
node table, clicks, feature nodes opening their FeatureView, scale, errors."""

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from graph_fixtures import ToyGraph, feature_graph, head_graph
from PIL import Image
from plotly.callbacks import Points

import phi3lab
from phi3lab.widgets.circuit_view import NEGATIVE, POSITIVE, UNSCORED
from phi3lab.widgets.common import unpacked


def drawn_edges(view) -> list[tuple[str, str, str, float]]:
    """(sender, receiver, colour, width) of every segment the figure draws,
    read back from the figure's traces (coordinates -> node ids)."""
    g = view.graph
    where = {(round(float(x), 4), round(float(y), 4)): node for x, y, node in zip(g.x, g.y, g.nodes["node"])}
    found = []
    for trace in view.figure.data[:-1]:
        x, y = unpacked(trace.x).reshape(-1, 3), unpacked(trace.y).reshape(-1, 3)
        for (x0, x1, _), (y0, y1, _) in zip(x, y):
            found.append(
                (
                    where[round(float(x0), 4), round(float(y0), 4)],
                    where[round(float(x1), 4), round(float(y1), 4)],
                    trace.line.color,
                    trace.line.width,
                )
            )
    return found


@pytest.mark.parametrize("count", [1, 7, 25])
def test_drawn_edges_are_the_top_edges_by_absolute_score(count):
    graph = head_graph(layers=3, heads=2, seed=1)
    view = phi3lab.widgets.CircuitView(graph, edges=count)
    top = graph.edges.loc[graph.edges["score"].abs().nlargest(count).index]
    drawn = drawn_edges(view)
    assert {(s, r) for s, r, _, _ in drawn} == set(zip(top["sender"], top["receiver"]))
    assert len(drawn) == count
    by_edge = {(s, r): (colour, width) for s, r, colour, width in drawn}
    for row in top.itertuples():
        assert by_edge[row.sender, row.receiver][0] == (POSITIVE if row.score > 0 else NEGATIVE)
    widths = sorted((abs(row.score), by_edge[row.sender, row.receiver][1]) for row in top.itertuples())
    assert [w for _, w in widths] == sorted(w for _, w in widths)  # never thinner for a larger |score|
    assert f"data-edges='{count}'" in view.status.value


def test_slider_changes_the_drawn_edges_and_nodes():
    graph = head_graph(layers=3, heads=2, seed=1)
    view = phi3lab.widgets.CircuitView(graph, edges=5)
    touched = set(graph.edges.loc[graph.edges["score"].abs().nlargest(40).index, ["sender", "receiver"]].stack())
    view.slider.value = 40
    assert len(drawn_edges(view)) == 40 and "data-edges='40'" in view.status.value
    assert "top 40 of" in view.figure.layout.title.text
    nodes = view.figure.data[-1]
    assert set(nodes.customdata) == touched and len(unpacked(nodes.x)) == len(touched)
    assert view.slider.max == len(graph.edges)


def test_head_graph_layout_by_layer_with_receivers_under_their_head():
    graph = head_graph(layers=2, heads=3)
    view = phi3lab.widgets.CircuitView(graph)
    g = view.graph
    place = {node: (x, y) for node, x, y in zip(g.nodes["node"], g.x, g.y)}
    for row in graph.nodes.itertuples():
        x, y = place[row.node]
        if row.kind.startswith("head_"):
            head_x, head_y = place[row.node.rsplit(".", 1)[0]]
            assert row.layer - 1 < y < head_y == row.layer and abs(x - head_x) < 0.5
        elif row.kind == "mlp":  # above its layer's heads, which it reads, below the next layer's receivers
            assert row.layer < y < row.layer + 1 - 0.32
        else:
            assert y == row.layer
    heads = [place[f"a0.h{h}"][0] for h in range(3)]
    assert heads == sorted(heads) and len(set(heads)) == 3
    assert not g.per_position


def test_grouped_query_key_value_receivers_sit_under_their_query_heads():
    graph = head_graph(layers=2, heads=4, kv_heads=2)
    g = phi3lab.widgets.CircuitView(graph).graph
    place = dict(zip(g.nodes["node"], g.x))
    for layer in range(2):
        for j in range(2):
            served = [place[f"a{layer}.h{h}"] for h in (2 * j, 2 * j + 1)]
            for part in "kv":
                assert min(served) < place[f"a{layer}.kv{j}.{part}"] < max(served)


def test_per_position_graph_puts_nodes_in_their_position_column():
    graph = feature_graph()
    view = phi3lab.widgets.CircuitView(graph, edges=50)
    g = view.graph
    assert g.per_position
    assert np.all(np.abs(g.x - graph.nodes["position"].to_numpy()) < 0.5)
    assert np.array_equal(g.y, graph.nodes["layer"].to_numpy(float))
    cells = pd.DataFrame({"x": g.x, "layer": graph.nodes["layer"], "position": graph.nodes["position"]})
    assert not cells.duplicated().any()  # nodes of one (layer, position) do not overlap


def test_click_shows_the_node_row():
    graph = head_graph(layers=2, heads=2)
    view = phi3lab.widgets.CircuitView(graph, edges=10)
    nodes = view.figure.data[-1]
    index = list(nodes.customdata).index("a1.h1") if "a1.h1" in nodes.customdata else 0
    view._on_click(
        nodes, Points(point_inds=[index], xs=[], ys=[], trace_name="", trace_index=len(view.figure.data) - 1), None
    )
    name = nodes.customdata[index]
    row = graph.nodes.set_index("node").loc[name]
    assert view.selected == name and f"data-node='{name}'" in view.row.value
    assert f"<td>{row['kind']}</td>" in view.row.value and f"<td>{row['label']}</td>" in view.row.value
    with pytest.raises(ValueError, match="`node` must be a node id of the graph"):
        view.select("nope")


def test_feature_node_opens_its_feature_view(shipped_model, shipped_tokenizer):
    model, tok = shipped_model, shipped_tokenizer
    texts = [p.text for p in phi3lab.tasks.name_mover_prompts(16, seed=4)]
    graph = feature_graph()
    view = phi3lab.widgets.CircuitView(graph, model=model, data=texts, tokenizer=tok, dictionaries="phi3lab_tiny_en")
    view.select("f2.8.91")
    assert view.feature_view.feature == 91 and view.details.children == (view.feature_view.widget,)
    assert view.feature_view.summary.site == "blocks.2.hook_resid_post"
    assert "<td>resid_post_2</td>" in view.row.value and "<td>1.5</td>" in view.row.value
    view.select("tok1")
    assert view.details.children == ()
    bare = phi3lab.widgets.CircuitView(graph)
    bare.select("f2.8.91")
    assert "dictionaries=" in bare.details.children[0].value


def test_attribution_graph_feature_node_opens_its_transcoder_feature_view(tmp_path, shipped_model, shipped_tokenizer):
    """An `AttributionGraph` knows its transcoders by the name its feature
    nodes carry, so the view needs only the model and data; a graph read
    back from JSON names them only, and the view says what it needs."""
    model, tok = shipped_model, shipped_tokenizer
    prompt = phi3lab.tasks.name_mover_prompts(1, seed=5)[0].text
    graph = phi3lab.circuits.attribution_graph(model, prompt, "phi3lab_tiny_en", tokenizer=tok, max_feature_nodes=64)
    transcoders = [phi3lab.features.from_preset("phi3lab_tiny_en", f"transcoder_{layer}") for layer in range(4)]
    assert list(graph.feature_dictionaries) == [f"transcoder_{layer}" for layer in range(4)]
    assert set(graph.nodes.query("kind == 'feature'")["dictionary"]) <= set(graph.feature_dictionaries)
    feature = graph.nodes.query("kind == 'feature'").iloc[0]
    texts = [p.text for p in phi3lab.tasks.name_mover_prompts(8, seed=6)]
    view = phi3lab.widgets.CircuitView(graph, model=model, data=texts, tokenizer=tok)
    view.select(feature["node"])
    opened = view.feature_view
    assert opened.feature == feature["feature"] and view.details.children == (opened.widget,)
    layer = int(feature["layer"])
    assert opened.summary.site == f"blocks.{layer}.ln2.hook_normalized"
    np.testing.assert_array_equal(np.asarray(opened.dictionary.W_enc), np.asarray(transcoders[layer].W_enc))
    graph.save(tmp_path / "graph.json")
    back = phi3lab.circuits.AttributionGraph.from_json(tmp_path / "graph.json")
    assert back.feature_dictionaries == {}
    bare = phi3lab.widgets.CircuitView(back, model=model, data=texts, tokenizer=tok)
    bare.select(feature["node"])
    assert "dictionaries=" in bare.details.children[0].value


def test_scale_stays_bounded():
    """The 12-layer, 12-head heads+mlps graph at 8 positions: 4,720 nodes
    (q/k/v receivers included), ~260k edges; what travels is the shown top."""
    graph = head_graph(layers=12, heads=12, positions=8)
    assert len(graph.nodes) > 4_500 and len(graph.edges) > 100_000
    view = phi3lab.widgets.CircuitView(graph, edges=300)
    small = phi3lab.widgets.payload_bytes(view, code=False)
    view.slider.value = view.slider.max
    assert view.slider.max == 2000 and len(drawn_edges(view)) == 2000
    assert small < 200_000 and phi3lab.widgets.payload_bytes(view, code=False) < 600_000


def test_static_pictures_are_drawn():
    view = phi3lab.widgets.CircuitView(head_graph(), edges=12)
    image = np.asarray(Image.open(io.BytesIO(view.static("png"))).convert("L"))
    assert image.std() > 5 and (image < 128).mean() > 0.005
    svg = view.static("svg")
    assert svg.lstrip().startswith("<?xml") and svg.count("<path") > 12
    assert "top 12 of" in view.static("html")


def test_bad_objects_are_refused_clearly():
    with pytest.raises(ValueError, match="`obj` must be an object with `nodes`"):
        phi3lab.widgets.CircuitView(object())
    graph = head_graph()
    with pytest.raises(ValueError, match=r"`obj.edges` must be a table with columns \('sender'"):
        phi3lab.widgets.CircuitView(ToyGraph(graph.nodes, graph.edges.drop(columns="score")))
    bad = graph.edges.copy()
    bad.loc[0, "receiver"] = "ghost"
    with pytest.raises(
        ValueError, match=r"`obj.edges.receiver` must be node ids .*received obj.edges.receiver=\['ghost'\]"
    ):
        phi3lab.widgets.CircuitView(ToyGraph(graph.nodes, bad))
    with pytest.raises(ValueError, match="unique node ids"):
        phi3lab.widgets.CircuitView(ToyGraph(pd.concat([graph.nodes, graph.nodes[:1]]), graph.edges))
    with pytest.raises(ValueError, match="`obj.nodes` must be a pandas DataFrame"):
        phi3lab.widgets.CircuitView(dataclasses.replace(graph, nodes=graph.nodes.to_dict()))
    with pytest.raises(ValueError, match="`dictionaries` must be a mapping"):
        phi3lab.widgets.CircuitView(graph, dictionaries=3)


def test_unscored_edges_are_drawn_grey_after_the_scored_ones():
    graph = head_graph(layers=2, heads=2)
    edges = graph.edges.assign(score=np.nan)
    edges.loc[3, "score"] = -2.0
    view = phi3lab.widgets.CircuitView(ToyGraph(graph.nodes, edges), edges=4)
    drawn = drawn_edges(view)
    assert (edges.loc[3, "sender"], edges.loc[3, "receiver"], NEGATIVE) in {(s, r, c) for s, r, c, _ in drawn}
    assert sorted(c for _, _, c, _ in drawn) == sorted([NEGATIVE, UNSCORED, UNSCORED, UNSCORED])
