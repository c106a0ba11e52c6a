"""GenerationView: the token strip of one generated token's attention."""

from __future__ import annotations

import re

import numpy as np
import pytest

import phi3lab
from conftest import random_backbone
from phi3lab.widgets import GenerationView


@pytest.fixture(scope="module")
def generation():
    model = random_backbone(seed=4, rope=None)
    g = phi3lab.generate(model, [3, 9, 27, 81 % 96], max_new_tokens=4, stop=[], names="blocks.*.attn.hook_pattern")
    return model, g


def test_strip_shows_the_selected_rows_attention(generation):
    model, g = generation
    reference = phi3lab.trace(model, g.token_ids[None], names="blocks.*.attn.hook_pattern")
    view = GenerationView(g.trace, position=6, layer=1, head=2)
    expected = reference.attention(1, head=2)[0, 6, :7]
    np.testing.assert_allclose(view.weights(), expected, atol=1e-5)
    spans = re.findall(
        r'class="phi3lab-weight phi3lab-(\w+)" data-position="(\d+)" data-weight="([^"]+)"', view.strip.value
    )
    assert [int(p) for _, p, _ in spans] == list(range(7))
    assert [kind for kind, _, _ in spans] == ["prompt"] * 4 + ["generated"] * 3
    np.testing.assert_allclose([float(w) for _, _, w in spans], expected, rtol=1e-4, atol=1e-6)

    view.layer_select.value, view.head_select.value = "mean", "mean"  # means over layers and heads
    mean = np.mean([reference.attention(layer)[0, :, 6, :7] for layer in range(model.num_layers)], axis=(0, 1))
    np.testing.assert_allclose(view.weights(), mean, atol=1e-5)
    assert view.weights().sum() == pytest.approx(1.0, abs=1e-5)
    view.position_select.value = 4
    assert len(view.weights()) == 5 and "generated token 4" in view.strip.value
    assert view.static("png").startswith(b"\x89PNG")


def test_needs_a_prompt_length_and_patterns(generation):
    model, g = generation
    plain = phi3lab.trace(model, g.token_ids[None], names="blocks.*.attn.hook_pattern")
    with pytest.raises(ValueError, match="prompt_length"):
        GenerationView(plain)
    assert GenerationView(plain, prompt_length=4).position == 4
    with pytest.raises(ValueError, match="position"):
        GenerationView(g.trace, position=1)
    for argument in ("layer", "head"):  # the mean is "mean", not a number
        with pytest.raises(ValueError, match=f'`{argument}`.*"mean"'):
            GenerationView(g.trace, **{argument: -1})
    assert GenerationView(g.trace, layer="mean", head="mean").title().endswith("(mean over layers, mean over heads)")
    no_patterns = phi3lab.generate(model, [3, 9], max_new_tokens=2, stop=[], names="hook_logits")
    with pytest.raises(KeyError, match="hook_pattern"):
        GenerationView(no_patterns.trace)


def test_the_generation_itself_and_its_static_html(generation):
    """A view takes what `generate` returns, and its HTML form is the strip."""
    model, g = generation
    view = GenerationView(g, position=5, layer=0, head=1)
    np.testing.assert_allclose(view.weights(), GenerationView(g.trace, position=5, layer=0, head=1).weights())
    html = view.static("html")
    assert html.count("phi3lab-weight phi3lab-") == 6 and "generated token 5" in html
    no_trace = phi3lab.generate(model, [3, 9], max_new_tokens=2, stop=[])
    with pytest.raises(ValueError, match=r"`trace`.*names="):
        GenerationView(no_trace)
    with pytest.raises(ValueError, match=r"`trace`.*one Generation"):
        GenerationView([g, g])


def test_every_trace_view_accepts_a_generation(generation):
    from phi3lab.widgets import AttentionExplorer, HeadGrid, ResidualStreamView, RopeView, TokenView

    model, _ = generation
    g = phi3lab.generate(model, [3, 9, 27], max_new_tokens=2, stop=[], names="*")
    for view in (AttentionExplorer, HeadGrid, ResidualStreamView, RopeView):
        assert repr(view(g)) == repr(view(g.trace))
    for make in (TokenView.loss, lambda tr: TokenView.attention(tr, 1, 0, -1), lambda tr: TokenView.neurons(tr, 0, 1)):
        np.testing.assert_equal(make(g).rows, make(g.trace).rows)
