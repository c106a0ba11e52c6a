"""Views for real-size traces: HeadGrid, TokenView, windowed and long
AttentionExplorer, generation marks, and the bytes each view sends."""

import base64
import re
import types

import numpy as np
import pandas as pd
import pytest

import phi3lab
from conftest import keras_initialized_backbone
from phi3lab.widgets import AttentionExplorer, HeadGrid, TokenView, payload_bytes
from phi3lab.widgets.common import Scale, unpacked
from phi3lab.widgets.head_grid import score_table

PNG = b"\x89PNG\r\n\x1a\n"
BUDGET = 2_000_000  # bytes of widget state per view


@pytest.fixture(scope="module")
def model():
    return keras_initialized_backbone(3)


@pytest.fixture(scope="module")
def ids():
    ids = np.random.RandomState(5).randint(1, 64, (1, 24)).astype(np.int32)
    ids[:, 0] = 0
    return ids


@pytest.fixture(scope="module")
def tr(model, ids):
    return phi3lab.trace(model, ids)


def block_max(matrix, size):
    """Block maxima by plain loops (the oracle for the thumbnails)."""
    rows, cols = matrix.shape
    fr, fc = -(-rows // size), -(-cols // size)
    return np.array([[matrix[i : i + fr, j : j + fc].max() for j in range(0, cols, fc)] for i in range(0, rows, fr)])


def check_static(view):
    png = view.static()
    assert png.startswith(PNG) and len(png) > 3_000
    assert base64.b64decode(view._repr_mimebundle_()["image/png"]).startswith(PNG)


# === HeadGrid ===
def test_head_grid_thumbnails_are_the_patterns(tr):
    grid = HeadGrid(tr, cell=12)
    image = grid.mosaic()
    assert image.shape == (grid._pixels()[1], grid._pixels()[0], 3)
    for layer, head in [(0, 0), (1, 3), (1, 2)]:
        pooled = block_max(tr.attention(layer, head)[0], 12)  # 24 positions -> 12 x 12
        x, y = grid.cell_origin(layer, head)
        np.testing.assert_array_equal(image[y : y + 12, x : x + 12], Scale.probability().rgb(pooled))
    # kv groups of 2 stand apart: the gap between heads 1 and 2 is wider than between 0 and 1.
    assert grid.cell_origin(0, 2)[0] - grid.cell_origin(0, 1)[0] > grid.cell_origin(0, 1)[0] - grid.cell_origin(0, 0)[0]
    heat = grid.figure.data[0]
    assert heat.text[1][3].startswith("layer 1 · head 3 (kv 1)")
    assert list(grid.figure.layout.yaxis.ticktext) == ["L0", "L1"]
    assert list(grid.figure.layout.xaxis.ticktext) == ["h0", "h1", "h2", "h3"]


def test_head_grid_click_opens_the_head_in_the_explorer(tr):
    grid = HeadGrid(tr)
    grid._on_click(None, types.SimpleNamespace(point_inds=[[1, 2]]), None)  # row 1, column 2
    assert grid.selected == (1, 2)
    assert grid.explorer.title().startswith("Layer 1 · head 2 (kv head 1)")
    assert grid.explorer.heatmap.layout.title.text.startswith("Layer 1 · head 2")
    np.testing.assert_array_equal(unpacked(grid.explorer.heatmap.data[0].z), tr.attention(1, 2)[0])
    x, y = grid.cell_origin(1, 2)
    shape = grid.figure.layout.shapes[0]
    assert shape.x0 < x < shape.x1 and shape.y0 < y < shape.y1
    grid.explorer.head_select.value = 0  # and back: the outline follows
    assert grid.selected == (1, 0) and "layer 1 · head 0" in grid.readout.value
    grid.explorer.head_select.value = 3
    assert grid.explorer.thumbnail_buttons == []  # the grid shows every head
    assert grid.selected == (1, 3)
    with pytest.raises(ValueError, match="`head` must be one of the captured query heads"):
        grid.select(0, 7)
    check_static(grid)


def test_head_grid_sorts_and_annotates_by_score(tr, model):
    values = np.array([[0.1, 0.9, 0.4, 0.2], [0.5, -0.3, 0.0, 0.8]])
    grid = HeadGrid(tr, {"made up": values}, explorer=False)
    np.testing.assert_array_equal(grid.order(), [[0, 1, 2, 3]] * 2)
    grid.sort_toggle.value = True  # descending, within each kv group of 2
    np.testing.assert_array_equal(grid.order(), [[1, 0, 2, 3], [0, 1, 3, 2]])
    assert list(grid.figure.layout.xaxis.ticktext) == ["#1", "#2", "#1", "#2"]
    # The bar under each thumbnail is the score's colour (diverging: there are negative scores).
    image, scale = grid.mosaic(), Scale.signed(values)
    x, y = grid.cell_origin(1, 0)  # row 1, column 0 holds head 0 (0.5)
    np.testing.assert_array_equal(image[y + grid.cell + 2, x], scale.rgb(0.5))
    assert "made up: 0.8" in grid.figure.data[0].text[1][2]  # column 2 is head 3 now
    grid._on_click(None, types.SimpleNamespace(point_inds=[[1, 2]]), None)
    assert grid.selected == (1, 3) and "made up = 0.8" in grid.readout.value
    scores = phi3lab.analysis.head_scores(model, tr)
    grid = HeadGrid(tr, scores, score="induction", sort=True, explorer=False)
    assert list(grid.score_select.options) == ["previous_token", "duplicate_token", "induction"]
    expected = scores.set_index(["layer", "head"])["induction"]
    assert grid.head_score(1, 2) == expected.loc[(1, 2)]
    check_static(grid)


def test_score_tables_from_analysis_results(model, tr):
    from phi3lab.analysis.patching import PatchingResult

    kv = PatchingResult(
        values=np.array([[1.0, 2.0], [3.0, 4.0]]),
        raw=np.zeros((2, 2)),
        clean_metric=1.0,
        corrupted_metric=0.0,
        site="head_v",
        hook="blocks.*.attn.hook_v",
        axes=("layer", "kv_head"),
        clean_ids=np.zeros((1, 3), int),
        corrupted_ids=np.zeros((1, 3), int),
    )
    table = score_table(kv, 2, 4, 2)
    np.testing.assert_array_equal(table["patching head_v"].to_numpy().reshape(2, 4), [[1, 1, 2, 2], [3, 3, 4, 4]])
    attribution = pd.DataFrame(
        {
            "component": ["embed", "L0H0", "L0H1", "L0_mlp"],
            "layer": [None, 0, 0, 0],
            "head": [None, 0, 1, None],
            "kind": ["embed", "head", "head", "mlp"],
            "attribution": [5.0, 0.25, -0.5, 1.0],
        }
    ).astype({"layer": "Int64", "head": "Int64"})
    table = score_table(attribution, 2, 4, 2)
    assert table.loc[(0, 1), "attribution"] == -0.5 and np.isnan(table.loc[(1, 0), "attribution"])
    with pytest.raises(ValueError, match=r"`scores` must be one score per \(layer, head\): shape \(2, 4\)"):
        score_table(np.zeros((4, 2)), 2, 4, 2)
    with pytest.raises(ValueError, match="`scores` must be a PatchingResult over heads"):
        score_table(
            types.SimpleNamespace(values=np.zeros((2, 5)), axes=("layer", "position"), site="resid_pre"), 2, 4, 2
        )
    with pytest.raises(ValueError, match="`score` must be one of the score columns"):
        HeadGrid(tr, np.zeros((2, 4)), score="nope")


# === Windowed traces and generation ===
def test_explorer_on_a_windowed_trace_shows_what_it_holds(model, ids):
    windowed = phi3lab.trace(
        model,
        ids,
        names=["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"],
        queries=slice(10, 20),
        heads=[1, 3],
    )
    full = phi3lab.trace(model, ids, names=["blocks.1.attn.hook_pattern"])
    view = AttentionExplorer(windowed, zoom=16)
    assert view.layers == [1] and [h for _, h in view.head_select.options] == [1, 3]
    assert len(view.thumbnail_buttons) == 2 and view.query_window == range(10, 20)
    assert view.key_window == range(8, 24)  # keys start on the diagonal (clamped at the end)
    np.testing.assert_array_equal(unpacked(view.heatmap.data[0].z), windowed.attention(1, 1)[0, :, 8:24])
    np.testing.assert_allclose(windowed.attention(1, 1)[0], full.attention(1, 1)[0, 10:20], atol=1e-6)  # rows 10-19
    assert heat_labels(view)[0] == "10 "
    assert "only queries 10–19 were captured" in view.status.value
    assert "only heads [1, 3] of 4" in view.status.value
    view.head_select.value = 3
    np.testing.assert_array_equal(unpacked(view.heatmap.data[0].z), windowed.attention(1, 3)[0, :, 8:24])
    view.select_token(3)  # a key outside the held rows: only its column is shown
    weights = [float(w) for w in re.findall(r'data-weight="([^"]+)"', view.token_strips.value)]
    np.testing.assert_allclose(weights, windowed.attention(1, 3)[0, :, 3], rtol=1e-5)  # column 3, rows 10-19
    assert "its row was not captured" in view.token_strips.value
    view.values_select.value = "scores"
    scores = windowed["blocks.1.attn.hook_attn_scores"][0, 1]
    z = unpacked(view.heatmap.data[0].z)
    np.testing.assert_array_equal(np.isnan(z), np.isneginf(scores[:, 8:24]))
    with pytest.raises(ValueError, match=r"`head` must be one of the captured query heads \[1, 3\]"):
        AttentionExplorer(windowed, head=0)
    check_static(view)
    grid = HeadGrid(windowed, explorer=False)  # missing heads are blank, marked on hover
    assert np.isnan(grid.thumbnails[0, 0]).all() and not np.isnan(grid.thumbnails[0, 1]).any()
    assert grid.figure.data[0].text[0][0].endswith("not captured")


def heat_labels(view):
    return [label[:3] for label in view.heatmap.data[0].y]


def test_generated_tokens_are_marked(tr):
    view = AttentionExplorer(_with_prompt_length(tr, 20))
    dashed = [s for s in view.heatmap.layout.shapes if s.line.dash == "dash"]
    assert [(s.x0, s.y0) for s in dashed] == [(19.5, 0), (0, 19.5)]
    assert ["phi3lab-generated" in b._dom_classes for b in view.token_buttons[:24]] == [False] * 20 + [True] * 4
    assert "prompt 0–19, generated from 20" in view.status.value
    tokens = TokenView.loss(_with_prompt_length(tr, 20))
    classes = re.findall(r'<span class="(phi3lab-tok[^"]*)"', tokens.text.value)
    assert ["generated" in c for c in classes] == [False] * 20 + [True] * 4
    assert tokens.text.value.count("phi3lab-boundary") == 1
    assert AttentionExplorer(tr).prompt_length is None


def _with_prompt_length(tr, length):
    """The same trace with a generation's `prompt_length` attribute."""
    copy = phi3lab.tracing.result.Trace(
        dict(tr),
        token_ids=tr.token_ids,
        padding_mask=tr.padding_mask,
        tokens=tr.tokens,
        output=tr.output,
        rope=tr.rope,
        model=types.SimpleNamespace(
            num_layers=tr.num_layers, num_query_heads=tr.num_query_heads, num_key_value_heads=tr.num_key_value_heads
        ),
    )
    copy.prompt_length = length
    return copy


# === TokenView ===
def test_token_view_shows_the_values_and_switches_rows():
    view = TokenView(["a", "<b>", "c"], {"first": [0.5, 2.0, np.nan], "signed": [-1.0, 0.25, 3.0]}, label="x")
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', view.text.value)]
    assert values[:2] == [0.5, 2.0] and np.isnan(values[2])
    assert view.scale() == Scale("Blues", 0.0, 2.0)  # no negatives: sequential from 0
    assert "&lt;b&gt;" in view.text.value and "<b>" not in view.text.value.split("</style>")[1].split("</b>")[-1]
    tips = re.findall(r'<span class="phi3lab-tip">([^<]+)</span>', view.text.value)
    assert tips == ["0 a · x: 0.5", "1 &lt;b&gt; · x: 2", "2 c · x: no value"]
    assert f"background:{Scale('Blues', 0.0, 2.0).css(2.0)[0]}" in view.text.value
    view.row_select.value = "signed"
    assert view.scale() == Scale("RdBu_r", -3.0, 3.0)  # negatives: diverging around 0
    values = [float(v) for v in re.findall(r'data-value="([^"]+)"', view.text.value)]
    assert values == [-1.0, 0.25, 3.0] and "(signed)" in view.text.value
    assert TokenView(["a", "b"], np.zeros((3, 2))).row_select.options == ("row 0", "row 1", "row 2")
    assert TokenView(["a", "b"], [1, 2]).row_select.layout.display == "none"
    with pytest.raises(ValueError, match=r"`values` must be one value per token: \(3,\)"):
        TokenView(["a", "b", "c"], [1.0, 2.0])
    with pytest.raises(ValueError, match="`names` must be one name per row"):
        TokenView(["a"], [[1.0], [2.0]], names=["x"])
    check_static(view)
    assert "phi3lab-tok" in view.static("html")


def test_token_view_loss_is_the_next_token_loss(tr, ids):
    view = TokenView.loss(tr)
    logits = tr.logits[0].astype(np.float64)
    expected = [np.nan] + [
        -np.log(np.exp(logits[t - 1, ids[0, t]]) / np.exp(logits[t - 1]).sum()) for t in range(1, ids.shape[1])
    ]
    np.testing.assert_allclose(view.current, expected, rtol=1e-9)
    assert np.isnan(view.current[0]) and view.label == "loss (nats)"


def test_token_view_attention_and_neurons_are_the_trace(tr):
    view = TokenView.attention(tr, layer=1, head=2, query=-4)
    row = tr.attention(1, 2)[0, 20]
    np.testing.assert_array_equal(view.current[:21], row[:21])
    assert np.isnan(view.current[21:]).all() and view.selected == 20
    assert list(view.rows) == ["layer 1 · head 2", "layer 1 · head 0", "layer 1 · head 1", "layer 1 · head 3"]
    view.row_select.value = "layer 1 · head 3"
    np.testing.assert_array_equal(view.current[:21], tr.attention(1, 3)[0, 20, :21])
    assert 'class="phi3lab-tok selected" data-position="20"' in view.text.value
    with pytest.raises(ValueError, match="`head` must be"):
        TokenView.attention(tr, 1, 9, 3)
    neurons = TokenView.neurons(tr, 1, [3, 7], where="pre")
    np.testing.assert_array_equal(neurons.rows["layer 1 · neuron 7"], tr["blocks.1.mlp.hook_pre"][0, :, 7])
    with pytest.raises(ValueError, match="`neurons` must be an int in"):
        TokenView.neurons(tr, 1, 10_000)


def test_token_view_logit_attribution_is_the_analysis(model, tr):
    view = TokenView.logit_attribution(model, tr, heads=True)
    table = phi3lab.analysis.next_token_attribution(model, tr, heads=True)
    positions = list(range(tr.token_ids.shape[1]))
    assert list(view.rows) == ["logit of the token"] + list(table.component)
    np.testing.assert_array_equal(view.rows["logit of the token"], table.attrs["logit"])
    np.testing.assert_array_equal(view.rows["L1H2"], table.set_index("component").loc["L1H2", positions])
    view.row_select.value = "L0_mlp"
    assert view.scale().cmap == ("RdBu_r" if (np.nan_to_num(view.current) < 0).any() else "Blues")
    assert view.label == "direct logit attribution" and np.isnan(view.current[0])


# === What goes to the browser ===
@pytest.mark.slow
def test_payload_stays_under_budget_at_32_layers_by_32_heads():
    """A synthetic 32 x 32-head trace (random weights, small width) at T=512: the grid and the explorer
    each send well under 2 MB of data, whatever the zoom; the trace's patterns alone are 1 GiB. On top
    comes plotly.js, which every FigureWidget carries in its state (~5 MB each): one per view here."""
    big = keras_initialized_backbone(0, 128, 32, 64, 64, 32, 8)  # 128 tokens, 32 layers, width 64, 32 / 8 heads
    ids = np.random.RandomState(0).randint(0, 128, (1, 512))
    big_tr = phi3lab.trace(big, ids, names=["blocks.*.attn.hook_pattern"])
    grid = HeadGrid(big_tr, {"random": np.random.RandomState(1).rand(32, 32)}, explorer=False)
    assert grid.cell == 18 and grid.thumbnails.shape == (32, 32, 18, 18)
    explorer = AttentionExplorer(big_tr, layer=31, head=31)
    grid_bytes, explorer_bytes = payload_bytes(grid, code=False), payload_bytes(explorer, code=False)
    explorer.zoom_select.value = 256  # the largest window
    widest = payload_bytes(explorer, code=False)
    linked = HeadGrid(big_tr)
    code = payload_bytes(linked) - payload_bytes(linked, code=False)
    print(
        f"data bytes: HeadGrid {grid_bytes}, AttentionExplorer {explorer_bytes} (zoom 64), {widest} (zoom 256), "
        f"HeadGrid + linked explorer {payload_bytes(linked, code=False)}; widget code {code}"
    )
    assert grid_bytes < BUDGET and explorer_bytes < BUDGET and widest < BUDGET
    assert payload_bytes(linked, code=False) < BUDGET
    # Two figures (grid and heatmap), one plotly.js: the page's shared bundle
    # plus a small loader per figure.
    plotly_js, loader = len(linked.figure._bundle.code), len(linked.figure._esm)
    assert plotly_js > 1_000_000 and loader < 5_000
    assert plotly_js + 2 * loader <= code < 1.05 * plotly_js + 2 * loader  # JSON escapes add ~2 %
    # Bounded by the window, not T: the same views over the first 256 positions send about as much.
    half = phi3lab.tracing.result.Trace(
        {k: v[:, :, :256, :256] for k, v in big_tr.items()},
        token_ids=ids[:, :256],
        padding_mask=big_tr.padding_mask[:, :256],
        tokens=None,
        output=None,
        rope=None,
        model=big,
    )
    assert explorer_bytes < 1.2 * payload_bytes(AttentionExplorer(half, layer=31, head=31), code=False)
    assert grid_bytes < 1.5 * payload_bytes(HeadGrid(half, {"random": np.zeros((32, 32))}, explorer=False), code=False)
