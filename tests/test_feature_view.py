"""FeatureView and `features.summarize` against independent NumPy computations:
a trace of each document alone, SAELens' top-k formula in NumPy, and the
decoder direction times the unembedding matrix."""

import io

import numpy as np
import pytest
from PIL import Image

import phi3lab
import phi3lab.features as F
from phi3lab import tasks

SITE = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def lab(shipped_model, shipped_tokenizer):
    model, tok = shipped_model, shipped_tokenizer
    sae = F.from_preset("phi3lab_tiny_en", "resid_post_2")
    texts = [p.text for p in tasks.name_mover_prompts(24, seed=7)] + [tasks.repeated_words(9, seed=3)]
    store = phi3lab.activations.collect(model, texts, SITE, tokenizer=tok, progress=False)
    return model, tok, sae, texts, store


@pytest.fixture(scope="module")
def view(lab):
    model, tok, sae, texts, _ = lab
    return phi3lab.widgets.FeatureView(sae, model, texts, tokenizer=tok, feature=91, contexts=6)


def numpy_encode(sae, x):
    """SAELens' top-k SAE in NumPy: (x - b_dec) @ W_enc + b_enc, keep the k largest, ReLU."""
    w = {name: np.asarray(value, np.float64) for name, value in sae.numpy().items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    keep = np.argsort(-pre, axis=-1, kind="stable")[..., : sae.config.k]
    acts = np.zeros_like(pre)
    np.put_along_axis(acts, keep, np.take_along_axis(pre, keep, -1), -1)
    return np.maximum(acts, 0.0)


@pytest.fixture(scope="module")
def oracle(lab):
    """Every (doc, position, activations [F]) from one trace per document."""
    model, tok, sae, texts, _ = lab
    rows = []
    for doc, text in enumerate(texts):
        tr = phi3lab.trace(model, tok.encode(text), names=SITE)
        acts = numpy_encode(sae, np.asarray(tr[SITE][0], np.float64))
        rows += [(doc, p, a) for p, a in enumerate(acts)]
    return rows


@pytest.mark.parametrize("feature", [91, 815, 740])
def test_summary_matches_a_trace_of_each_document(view, lab, oracle, feature):
    store, summary = view.store, view.summary
    acts = np.array([a[feature] for _, _, a in oracle])
    assert summary.rows == len(oracle) == len(store)
    assert summary.counts[feature] == np.count_nonzero(acts > 0)
    order = np.argsort(-acts, kind="stable")[: summary.top_values.shape[1]]
    fired = acts[order] > 0
    np.testing.assert_allclose(summary.top_values[feature][fired], acts[order][fired], rtol=1e-4, atol=1e-5)
    where = {(store.tag("doc")[r], store.tag("position")[r]) for r in summary.top_rows[feature][fired]}
    assert where == {oracle[i][:2] for i in order[fired]}
    assert (summary.top_rows[feature][~fired] == -1).all()
    positive = acts[acts > 0]
    bins = np.searchsorted(summary.edges[1:-1], positive, side="right")
    np.testing.assert_array_equal(summary.histogram[feature], np.bincount(bins, minlength=len(summary.edges) - 1))


def test_contexts_are_the_top_rows_with_their_documents_activations(view, lab, oracle):
    _, tok, _, texts, _ = lab
    by_place = {(d, p): a[view.feature] for d, p, a in oracle}
    shown = view.contexts()
    assert [c.activations[c.peak] for c in shown] == pytest.approx(
        list(view.summary.top_values[91][: len(shown)]), rel=1e-4
    )
    for c in shown:
        ids = tok.encode(texts[c.doc])
        np.testing.assert_array_equal(c.token_ids, np.asarray(ids)[c.positions])
        np.testing.assert_allclose(c.activations, [by_place[c.doc, p] for p in c.positions], rtol=1e-4, atol=1e-5)
        assert (
            c.positions[c.peak] - c.positions[0] <= view.before and c.positions[-1] - c.positions[c.peak] <= view.after
        )
    html = view.text.value
    assert html.count("phi3lab-feature-context") == len(shown) == 6
    assert html.count("phi3lab-tok selected") == len(shown)


def test_top_logit_tokens_are_the_decoder_direction_through_the_unembedding(view, lab):
    model, tok, sae, _, _ = lab
    unembedding = np.asarray(model.params()["token_embedding"]["reverse_embeddings"], np.float64)
    effects = np.asarray(sae.W_dec, np.float64)[91] @ unembedding
    effects = effects[: tok.vocabulary_size]
    raised, lowered = view.top_tokens(10)
    assert raised == list(np.argsort(-effects, kind="stable")[:10])
    assert lowered == list(np.argsort(effects, kind="stable")[:10])
    bars = view.logits.data[0]
    assert list(bars.x)[-1] == pytest.approx(effects[raised[0]], rel=1e-4)


def test_search_box_switches_feature_and_refuses_bad_ids(view):
    before = view.text.value
    view.search.value = "815"
    assert view.feature == 815 and "feature 815" in view.header.value
    assert view.text.value != before and "Activations of feature 815" in view.histogram.layout.title.text
    view.search.value = "99999"
    assert view.feature == 815 and "phi3lab-feature-error" in view.header.value
    view.search.value = "abc"
    assert view.feature == 815 and "not a feature" in view.header.value
    view.search.value = "815"  # retyped: the error goes
    assert "phi3lab-feature-error" not in view.header.value and "feature 815" in view.header.value
    view.show(91)
    assert view.search.value == "91" and view.text.value == before


def test_a_store_gives_the_same_view_as_texts(view, lab):
    model, tok, sae, _, store = lab
    from_store = phi3lab.widgets.FeatureView(sae, model, store, feature=91, contexts=6)
    np.testing.assert_array_equal(from_store.summary.top_values, view.summary.top_values)
    np.testing.assert_array_equal(from_store.summary.counts, view.summary.counts)
    assert from_store.text.value == view.text.value  # the store's own tokenizer labels the tokens


def test_summary_is_the_same_whatever_the_chunk(lab):
    _, _, sae, _, store = lab
    whole = F.summarize(sae, store, top=5)
    pieces = F.summarize(sae, store, top=5, chunk_rows=37)
    np.testing.assert_array_equal(whole.counts, pieces.counts)
    np.testing.assert_array_equal(whole.histogram, pieces.histogram)
    np.testing.assert_allclose(whole.top_values, pieces.top_values, rtol=1e-5)  # matmuls of other shapes


def test_static_pictures(view):
    png = view.static("png")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert image.shape[0] > 400 and image.std() > 20  # drawn, not blank
    html = view.static("html")
    assert "phi3lab-feature-context" in html and "plotly" in html
    assert phi3lab.widgets.payload_bytes(view, code=False) < 200_000


def test_bad_input_is_refused_clearly(view, lab):
    model, tok, sae, texts, store = lab
    with pytest.raises(ValueError, match=r"`feature` must be an int in \[0, 1024\)"):
        phi3lab.widgets.FeatureView(sae, model, store, feature=1024)
    with pytest.raises(ValueError, match="`feature` must be"):
        view.show(-1)
    other = phi3lab.activations.collect(model, texts[:2], "blocks.1.hook_resid_post", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match=r"`store` must be a store holding the dictionary's input site 'blocks.2"):
        phi3lab.widgets.FeatureView(sae, model, other)
    with pytest.raises(ValueError, match="`model` must be a Phi3Backbone to collect"):
        phi3lab.widgets.FeatureView(sae, None, texts)
    with pytest.raises(ValueError, match="`dictionary` must be a phi3lab.features.SparseDictionary"):
        phi3lab.widgets.FeatureView("resid_post_2", model, store)
