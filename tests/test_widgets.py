"""phi3lab.widgets: every view shows exactly the traced numbers, follows its
controls, stays bounded on long inputs and renders a static picture."""

import base64
import re
import types

import numpy as np
import plotly.io as pio
import pytest

import phi3lab
from conftest import keras_initialized_backbone
from phi3lab.widgets import AttentionExplorer, LogitLensView, PatchingView, ResidualStreamView, RopeView
from phi3lab.widgets.common import Scale, pool_max, unpacked

PNG = b"\x89PNG\r\n\x1a\n"
LENGTH = 9


class ToyTokenizer:
    """Display strings for a 64-token toy vocabulary (id 0 is `<s>`)."""

    vocabulary = ["<s>"] + [f"w{i}" for i in range(1, 64)]

    def display_tokens(self, ids):
        return [self.vocabulary[int(i)] for i in ids]


@pytest.fixture(scope="module")
def model():
    return keras_initialized_backbone(0)


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(1, 64, (2, LENGTH)).astype(np.int32)


@pytest.fixture(scope="module")
def tr(model, ids):
    ids = ids.copy()
    ids[:, 0] = 0
    return phi3lab.trace(model, ids, tokenizer=ToyTokenizer())


@pytest.fixture(scope="module")
def long_tr(model):
    return phi3lab.trace(
        model,
        np.random.RandomState(1).randint(0, 64, (1, 600)),
        names=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores"],
    )


def heat(figure, index=0):
    return figure.data[index]


def z_of(figure, index=0):
    """The heatmap values a figure sends (packed typed arrays read back)."""
    return unpacked(figure.data[index].z)


def check_static(view):
    png = view.static()
    assert png.startswith(PNG) and len(png) > 5_000
    bundle = view._repr_mimebundle_()
    assert base64.b64decode(bundle["image/png"]).startswith(PNG)
    assert "model_id" in bundle["application/vnd.jupyter.widget-view+json"]
    assert bundle["text/plain"] == repr(view)


# === AttentionExplorer ===
def test_attention_heatmap_is_the_trace(tr):
    view = AttentionExplorer(tr)
    np.testing.assert_array_equal(z_of(view.heatmap), tr.attention(0, 0)[0])
    assert list(heat(view.heatmap).x) == [f"{p} {t}" for p, t in enumerate(["&lt;s&gt;"] + tr.tokens[0][1:])]
    assert list(heat(view.heatmap).y) == list(heat(view.heatmap).x)
    assert view.heatmap.layout.yaxis.autorange == "reversed"
    assert "Layer 0 · head 0 (kv head 0)" in view.heatmap.layout.title.text
    assert (heat(view.heatmap).zmin, heat(view.heatmap).zmax) == (0.0, 1.0)
    assert heat(view.heatmap).colorbar.title.text == "probability"


def test_attention_selectors_update_the_figure(tr):
    view = AttentionExplorer(tr, batch=1)
    view.layer_select.value = 1
    view.head_select.value = 3
    np.testing.assert_array_equal(z_of(view.heatmap), tr.attention(1, 3)[1])
    assert "Layer 1 · head 3 (kv head 1)" in view.heatmap.layout.title.text
    view.thumbnail_buttons[2].click()  # a thumbnail selects its head
    assert view.head == 2
    np.testing.assert_array_equal(z_of(view.heatmap), tr.attention(1, 2)[1])
    assert [b.button_style for b in view.thumbnail_buttons] == ["", "", "primary", ""]


def test_attention_scores_blank_the_masked_entries(tr):
    view = AttentionExplorer(tr, layer=1, head=1, values="scores")
    scores = tr["blocks.1.attn.hook_attn_scores"][0, 1]
    z = z_of(view.heatmap)
    assert np.isneginf(scores).sum() == LENGTH * (LENGTH - 1) // 2
    np.testing.assert_array_equal(np.isnan(z), np.isneginf(scores))
    np.testing.assert_array_equal(z[np.isfinite(scores)], scores[np.isfinite(scores)])
    assert heat(view.heatmap).zmin == -heat(view.heatmap).zmax  # diverging, centred at 0
    view.values_select.value = "pattern"
    np.testing.assert_array_equal(z_of(view.heatmap), tr.attention(1, 1)[0])


def test_attention_thumbnails_follow_the_layer(tr):
    view = AttentionExplorer(tr)
    before = [bytes(image.value) for image in view.thumbnail_images]
    assert all(png.startswith(PNG) for png in before)
    view.layer_select.value = 1
    assert [bytes(image.value) for image in view.thumbnail_images] != before


def test_attention_groups_query_heads_by_kv_head(tr):
    view = AttentionExplorer(tr)
    assert [view.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert len(view.thumbnails.children) == 1  # 4 heads in one row of 4
    view.group_toggle.value = True
    rows = view.thumbnails.children
    assert len(rows) == tr.num_key_value_heads
    assert [b.description for b in view.thumbnail_buttons] == ["q0·kv0", "q1·kv0", "q2·kv1", "q3·kv1"]
    assert [len(row.children) - 1 for row in rows] == [2, 2]  # label + group of 2


def test_attention_token_click_highlights_row_and_column(tr):
    view = AttentionExplorer(tr, layer=1, head=2)
    view.token_buttons[3].click()
    assert view.selected == 3 and view.token_buttons[3].button_style == "warning"
    shapes = view.heatmap.layout.shapes
    assert [(s.y0, s.y1) for s in shapes][0] == (2.5, 3.5)  # row 3: what it attends to
    assert [(s.x0, s.x1) for s in shapes][1] == (2.5, 3.5)  # column 3: what attends to it
    pattern = tr.attention(1, 2)[0]
    weights = [float(w) for w in re.findall(r'data-weight="([^"]+)"', view.token_strips.value)]
    np.testing.assert_allclose(weights, np.concatenate([pattern[3], pattern[:, 3]]), rtol=1e-5)
    view.head_select.value = 0  # the strips follow the head
    weights = [float(w) for w in re.findall(r'data-weight="([^"]+)"', view.token_strips.value)]
    np.testing.assert_allclose(weights[:LENGTH], tr.attention(1, 0)[0, 3], rtol=1e-5)
    view._on_cell_click(None, types.SimpleNamespace(ys=["5 w1"]), None)  # a heatmap click selects too
    assert view.selected == 5 and "selected 5" in view.status.value
    check_static(view)


def test_attention_long_input_sends_one_window(long_tr):
    view = AttentionExplorer(long_tr, max_tokens=256, zoom=256)
    pattern = long_tr.attention(0, 0)[0]
    assert view.query_slider.max == 600 - 256 and view.zoom_select.options == (16, 32, 64, 128, 256)
    np.testing.assert_array_equal(z_of(view.heatmap), pattern[:256, :256])
    view.query_slider.value = 344
    view.key_slider.value = 100
    np.testing.assert_array_equal(z_of(view.heatmap), pattern[344:600, 100:356])
    assert heat(view.heatmap).y[0].startswith("344 ") and heat(view.heatmap).x[0].startswith("100 ")
    assert view.token_buttons[0].tooltip == "position 344"
    # What goes to the browser: one 256 x 256 window and 64 x 64 thumbnails, never 600 x 600 per head.
    assert np.size(z_of(view.heatmap)) == 256 * 256
    assert len(pio.to_json(view.heatmap)) < 600 * 600 * 4 * 4 / 3 / 2
    import io

    from PIL import Image

    sizes = [Image.open(io.BytesIO(bytes(image.value))).size for image in view.thumbnail_images]
    assert all(size == (72, 72) for size in sizes)
    assert sum(len(image.value) for image in view.thumbnail_images) < 100_000
    view.values_select.value = "scores"
    assert z_of(view.heatmap).shape == (256, 256)


def test_attention_zoom_window_and_overview(long_tr):
    view = AttentionExplorer(long_tr)  # default zoom: 64, legible labels
    pattern = long_tr.attention(0, 0)[0]
    assert view.zoom == 64 and view.windowed and not view._overview_box.layout.display
    np.testing.assert_array_equal(z_of(view.heatmap), pattern[:64, :64])
    assert sum(not b.layout.display for b in view.token_buttons) == 64
    # The overview is the head's block maxima (600 -> 86 cells of 7 positions, 3 pixels each), window boxed.
    image = view.overview_image()
    assert image.shape == (258, 258, 3)
    np.testing.assert_array_equal(image[1::3, 1::3][20:, 20:], Scale.probability().rgb(pool_max(pattern, 96))[20:, 20:])
    view.move_window(500, 300)  # centre the window there
    assert view.query_window == range(468, 532) and view.key_window == range(268, 332)
    np.testing.assert_array_equal(z_of(view.heatmap), pattern[468:532, 268:332])
    image = view.overview_image()
    orange = (image == [255, 127, 14]).all(-1)
    rows, cols = np.flatnonzero(orange.any(1)), np.flatnonzero(orange.any(0))
    box = (468 // 7 * 3, -(-532 // 7) * 3 - 1, 268 // 7 * 3, -(-332 // 7) * 3 - 1)  # cells of 7 positions
    assert (rows[0], rows[-1], cols[0], cols[-1]) == box
    view.zoom_select.value = 16  # zoom in: smaller window, same start
    assert view.query_window == range(468, 484) and z_of(view.heatmap).shape == (16, 16)
    assert sum(not b.layout.display for b in view.token_buttons) == 16
    view.query_slider.value = view.query_slider.max  # step to the end
    assert view.query_window == range(584, 600)


def test_overview_box_drags_the_zoom_window(long_tr):
    import io

    from PIL import Image

    view = AttentionExplorer(long_tr, zoom=64)
    pattern = long_tr.attention(0, 0)[0]
    box = view.overview
    # The live overview is the picture without the box; the box is four numbers over it.
    sent = np.asarray(Image.open(io.BytesIO(box.image)).convert("RGB"))
    np.testing.assert_array_equal(sent, view.overview_image(boxed=False))
    assert not (sent == [255, 127, 14]).all(-1).any()
    assert box.extent == [0, 600, 600, 602, 602]  # 86 cells of 7 positions cover 602
    assert box.window == [0, 0, 64, 64]
    # What the browser sends after a drag moves both windows (the sliders follow) ...
    box.window = [300, 120, 64, 64]
    assert view.query_window == range(300, 364) and view.key_window == range(120, 184)
    assert (view.query_slider.value, view.key_slider.value) == (300, 120)
    np.testing.assert_array_equal(z_of(view.heatmap), pattern[300:364, 120:184])
    # ... and the sliders move the box.
    view.key_slider.value = 500
    assert box.window == [300, 500, 64, 64]
    view.zoom_select.value = 32
    assert box.window == [300, 500, 32, 32]


def test_short_input_has_no_zoom_window(tr):
    view = AttentionExplorer(tr)
    assert not view.windowed and view._overview_box.layout.display == "none"
    assert view.zoom == LENGTH and view.query_window == range(LENGTH)


def test_attention_arguments_are_checked(tr, model, ids):
    with pytest.raises(ValueError, match=r"`head` must be one of the captured query heads \[0, 1, 2, 3\]"):
        AttentionExplorer(tr, head=4)
    only_pattern = phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern")
    with pytest.raises(ValueError, match="hook_attn_scores"):
        AttentionExplorer(only_pattern, values="scores")
    assert [value for _, value in AttentionExplorer(only_pattern).values_select.options] == ["pattern"]
    with pytest.raises(KeyError, match="names=\\['blocks.\\*.attn.hook_pattern'"):
        AttentionExplorer(phi3lab.trace(model, ids, names="blocks.*.hook_resid_post"))


# === ResidualStreamView ===
def test_residual_norms_are_the_trace(tr):
    view = ResidualStreamView(tr, batch=1)
    expected = np.stack([np.linalg.norm(tr.resid(l, "post")[1].astype(np.float64), axis=-1) for l in range(2)])
    np.testing.assert_array_equal(z_of(view.heatmap), expected)
    view.component_select.value = "attn_out"
    attn = np.stack([np.linalg.norm(tr[f"blocks.{l}.hook_attn_out"][1].astype(np.float64), axis=-1) for l in range(2)])
    np.testing.assert_array_equal(z_of(view.heatmap), attn)
    assert "attn_out" in view.heatmap.layout.title.text
    view.position_slider.value = 4
    lines = {scatter.name: scatter.y for scatter in view.lines.data}
    np.testing.assert_array_equal(lines["attn_out"], attn[:, 4])
    np.testing.assert_array_equal(lines["resid_post"], expected[:, 4])
    assert "position 4" in view.table.value and f"{attn[1, 4]:.4g}" in view.table.value
    assert view.norms.shape == (2 * LENGTH, 3 + 5)
    check_static(view)


# === LogitLensView ===
def reference_probs(model, hidden):
    """Final RMS norm and LM head in NumPy (the scale is all ones at init)."""
    x = hidden.astype(np.float64)
    x = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + model.layer_norm_epsilon)
    x = x * np.asarray(model.final_norm.scale.value, np.float64)
    logits = x @ np.asarray(model.token_embedding.reverse_embeddings.value, np.float64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_logit_lens_grid_is_the_lens(model, tr):
    view = LogitLensView(model, tr, ToyTokenizer.vocabulary, k=3)
    probs = np.stack([reference_probs(model, tr.resid(l, "post")[0]) for l in range(2)])
    np.testing.assert_allclose(z_of(view.grid), probs.max(-1), rtol=1e-4)
    np.testing.assert_array_equal(view.top_ids[..., 0], probs.argmax(-1))
    np.testing.assert_array_equal(view.top_ids[-1, :, 0], tr.logits[0].argmax(-1))  # last layer = the model
    assert heat(view.grid).text[1][2] == ToyTokenizer.vocabulary[probs[1, 2].argmax()]
    assert heat(view.grid).hovertext[0][0].count("<br>") == 2  # top-3 per cell
    assert list(heat(view.grid).y) == ["0 post", "1 post"]


def test_logit_lens_answer_and_position(model, tr):
    view = LogitLensView(model, tr, ToyTokenizer.vocabulary, where=("mid", "post"))
    assert view.position == LENGTH - 1 and len(view.rows) == 4
    view.position_slider.value = 2
    view.answer_box.value = "w7"
    assert view.answer == 7
    hidden = np.stack([tr[f"blocks.{l}.hook_resid_{w}"][0, 2] for l in range(2) for w in ("mid", "post")])
    probs = reference_probs(model, hidden)
    np.testing.assert_allclose(view.curve.data[0].y, probs[:, 7], rtol=1e-4)
    np.testing.assert_array_equal(view.curve.data[1].y, (probs > probs[:, 7:8]).sum(-1) + 1)
    assert "w7 #7" in view.curve.layout.title.text and "position 2" in view.curve.layout.title.text
    view.answer_box.value = "#9"
    assert view.answer == 9
    view.answer_box.value = "no such token"
    assert view.answer == 9 and "`answer` must be" in view.message.value
    assert view.grid.layout.shapes[0].x0 == 1.5
    check_static(view)


# === RopeView ===
def test_rope_view_of_a_trace_is_its_rope(tr):
    view = RopeView(tr)
    rope = tr.rope
    np.testing.assert_array_equal(view.frequencies.data[0].y, rope.inverse_frequencies)
    np.testing.assert_array_equal(view.frequencies.data[1].y, rope.wavelengths)
    np.testing.assert_array_equal(view.tables.data[0].z, rope.cos)
    np.testing.assert_array_equal(view.tables.data[1].z, rope.sin)
    assert view.length_box.disabled
    with pytest.raises(ValueError, match="`seq_len` must be None or 9"):
        RopeView(tr, seq_len=20)


def test_rope_view_of_a_model_defaults_to_the_pretraining_length(model):
    view = RopeView(model)
    assert view.rope.num_positions == model.pretraining_sequence_length and view.rope.factor_set == "none"
    assert view.tables.data[0].z.shape == (256, model.head_dim) and not view.length_box.disabled
    assert view.factors.data[0].name == "factors (no scaling: all 1)"


def test_rope_view_switches_factors_at_the_pretraining_length():
    from phi3lab.model.rotary import RotarySpec

    short, long = list(np.linspace(1.0, 1.5, 4)), list(np.geomspace(1.0, 30.0, 4))
    spec = RotarySpec(
        head_dim=8,
        max_wavelength=10000.0,
        scaling_type="su",
        short_factor=tuple(short),
        long_factor=tuple(long),
        max_sequence_length=8192,
        pretraining_sequence_length=1024,
    )
    model = types.SimpleNamespace(rotary=spec)
    view = RopeView(model, seq_len=1024, max_positions=100)
    np.testing.assert_array_equal(view.factors.data[0].y, np.float32(short))
    np.testing.assert_array_equal(view.factors.data[1].y, np.float32(long))
    assert view.factors.data[0].opacity == 1.0 and view.factors.data[1].opacity < 1.0
    assert "short" in view.summary.value and view.tables.data[0].z.shape == (100, 8)
    view.set_seq_len(3000)
    assert view.rope.factor_set == "long" and view.factors.data[1].opacity == 1.0
    np.testing.assert_array_equal(view.frequencies.data[0].y, model.rotary.inverse_frequencies(3000))
    view.window_slider.value = 2000
    cos, _ = model.rotary.tables(3000)
    np.testing.assert_array_equal(view.tables.data[0].z, np.asarray(cos)[2000:2100])
    assert view.tables.layout.coloraxis.cmin == -view.rope.attention_factor < -1
    assert list(view.factors.data[2].x) == [8192, 1024, 3000]
    check_static(view)


# === PatchingView ===
def test_patching_view_is_diverging_around_zero():
    values = np.array([[0.5, -2.0, 0.0], [1.0, 0.25, -0.5]])
    view = PatchingView(values, "layer", ["a", "b", "a"], "Patching resid_pre")
    np.testing.assert_array_equal(z_of(view.heatmap), values)
    assert (heat(view.heatmap).zmin, heat(view.heatmap).zmax) == (-2.0, 2.0)
    assert list(heat(view.heatmap).x) == ["0 a", "1 b", "2 a"]  # repeated tokens stay apart
    view._on_click(None, types.SimpleNamespace(point_inds=[[1, 2]]), None)
    assert "-0.5" in view.readout.value
    result = types.SimpleNamespace(values=values.T, raw=values.T * 3, axes=("layer", "head"), site="head_z")
    from_result = PatchingView.from_result(result, col_labels=["h0", "h1"])
    assert from_result.values.shape == (3, 2) and from_result.heatmap.layout.xaxis.title.text == "head"
    assert from_result.heatmap.layout.title.text.startswith("Activation patching of head_z")
    assert from_result.heatmap.data[0].colorbar.title.text == "normalized metric"
    assert "(1 = clean run, 0 = corrupted run)" in from_result.heatmap.layout.title.text
    import phi3lab.analysis.patching as patching  # the real result type

    real = patching.PatchingResult(
        values=values,
        raw=values,
        clean_metric=1.0,
        corrupted_metric=0.0,
        site="resid_pre",
        hook="blocks.*.hook_resid_pre",
        axes=("layer", "position"),
        clean_ids=np.zeros((1, 3), int),
        corrupted_ids=np.ones((1, 3), int),
    )
    view = PatchingView.from_result(real)
    np.testing.assert_array_equal(z_of(view.heatmap), real.values)
    assert view.heatmap.layout.xaxis.title.text == "position"
    assert view.heatmap.data[0].colorbar.title.text == "patched metric"  # raw == values
    with pytest.raises(ValueError, match="`values` must be a non-empty numeric array"):
        PatchingView(np.zeros(3))
    check_static(view)


# === Shared ===
def test_static_html_is_self_contained(tr):
    html = AttentionExplorer(tr).static("html")
    assert "<script src=" not in html and '<script type="text/javascript" src=' not in html  # nothing fetched
    assert len(html) > 1_000_000  # plotly.js inlined
    with pytest.raises(ValueError, match='`format` must be "png", "svg" or "html"'):
        AttentionExplorer(tr).static("pdf")


def test_scales_and_pooling():
    assert Scale.signed([-3.0, 1.0]) == Scale("RdBu_r", -3.0, 3.0)
    assert Scale.probability().css(0.0)[0] == "#f7fbff"  # white-ish at 0
    z = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(pool_max(z, 2), [[5, 7], [13, 15]])
    assert pool_max(np.ones((600, 600)), 64).shape == (60, 60)


def test_attention_explorer_offers_only_captured_layers():
    import phi3lab as _phi3lab
    from phi3lab.widgets import AttentionExplorer as _Explorer

    model = _phi3lab.Phi3Backbone(
        vocabulary_size=64, num_layers=3, hidden_dim=32, intermediate_dim=64, num_query_heads=4, num_key_value_heads=2
    )
    ids = np.arange(1, 13)[None]
    partial = _phi3lab.trace(model, ids, names=["blocks.2.attn.hook_pattern"])
    explorer = _Explorer(partial, layer=2)
    assert [value for _, value in explorer.layer_select.options] == [2]
    with pytest.raises(ValueError, match="layer"):
        _Explorer(partial, layer=0)
