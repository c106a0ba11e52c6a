"""`phi3lab.analysis.attribution_patching` against `activation_patching`.

Oracles: activation patching itself (the quantity attribution estimates),
measured on the shipped model's name-mover task, and an exact property of
integrated gradients (completeness: a layer's units add up to patching the
whole layer's site) checked against `phi3lab.hooks.patch` runs.
"""

from __future__ import annotations

import numpy as np
import pytest

import phi3lab
from conftest import corrupted_pair, random_backbone
from phi3lab import analysis, tasks

ANSWER, COUNTER = 7, 11


@pytest.fixture(scope="module")
def random_model():
    return random_backbone(5, scale=0.2)


@pytest.fixture(scope="module")
def random_pair():
    return corrupted_pair(0, (2, 7), {2: 7})


@pytest.fixture(scope="module")
def name_movers(shipped_model, shipped_tokenizer):
    """Held-out name-mover prompts of one token length (both orders) and
    their subject-flipped corruptions: S2 becomes the answer's name, so the
    answer flips and the two runs differ at one position."""
    model, tokenizer = shipped_model, shipped_tokenizer
    rows = {}
    for prompt in tasks.name_mover_prompts(40, seed=3):
        clean, corrupted = tokenizer.encode(prompt.text), tokenizer.encode(prompt.subject_flipped())
        if len(clean) == len(corrupted):
            rows.setdefault(len(clean), []).append(
                (
                    clean,
                    corrupted,
                    tasks.name_token(tokenizer, prompt.answer),
                    tasks.name_token(tokenizer, prompt.counterfactual),
                )
            )
    chosen = max(rows.values(), key=len)[:8]
    clean, corrupted, answer, counter = (np.array(column) for column in zip(*chosen))
    return model, clean, corrupted, answer, counter


def pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def name_mover_correlations(name_movers):
    """Pearson(attribution, activation patching) per site and method on the
    shipped model, after checking both agree on shapes and end metrics."""
    model, clean, corrupted, answer, counter = name_movers
    assert (np.sum(clean != corrupted, axis=1) == 1).all()
    report = {}
    for site in ("resid_pre", "head_z", "head_pattern"):
        kwargs = {"answer": answer, "counterfactual": counter, "sites": site}
        exact = analysis.activation_patching(model, clean, corrupted, progress=False, **kwargs)
        for method in ("linear", "integrated"):
            fast = analysis.attribution_patching(model, clean, corrupted, method=method, **kwargs)
            assert fast.values.shape == exact.values.shape and fast.axes == exact.axes and fast.hook == exact.hook
            assert fast.clean_metric == pytest.approx(exact.clean_metric, abs=1e-3)
            assert fast.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=1e-3)
            report[site, method] = pearson(fast.values, exact.values)
    assert exact.clean_metric - exact.corrupted_metric > 1.0  # the flip flips the answer
    print("Pearson(attribution, activation patching):", {k: round(v, 3) for k, v in report.items()})
    return report


@pytest.mark.slow
def test_integrated_attribution_tracks_activation_patching_on_the_name_mover_task(name_mover_correlations):
    """Issue 12's bar: Pearson >= 0.9 on the residual stream (layer x
    position) and per-head outputs, and integrated gradients follow
    activation patching better than the first-order estimate at every site
    (patterns included)."""
    report = name_mover_correlations
    assert report["resid_pre", "integrated"] >= 0.9, report
    assert report["head_z", "integrated"] >= 0.9, report
    for site in ("resid_pre", "head_z", "head_pattern"):
        assert report[site, "integrated"] > report[site, "linear"], report


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="first-order attribution misses the saturated name movers (their attention flips from one name to "
    "the other, where the softmax gradient is ~0): Pearson 0.48 on resid_pre, 0.71 on head_z, 0.36 on "
    "patterns (issue 12's bar is 0.9; the integrated estimate meets it)",
)
def test_linear_attribution_tracks_activation_patching_on_the_name_mover_task(name_mover_correlations):
    report = name_mover_correlations
    assert report["resid_pre", "linear"] >= 0.9, report
    assert report["head_z", "linear"] >= 0.9, report


def test_integrated_gradients_are_complete_per_layer(random_model, random_pair):
    """Units of one layer add up to patching that layer's whole site (the
    midpoint rule with 32 steps is exact to ~1e-3 of the effect)."""
    clean, corrupted = random_pair
    result = analysis.attribution_patching(
        random_model,
        clean,
        corrupted,
        answer=ANSWER,
        counterfactual=COUNTER,
        sites="head_z",
        method="integrated",
        steps=32,
        normalize=False,
    )
    clean_tr = phi3lab.trace(random_model, clean, names="blocks.*.attn.hook_z")
    for layer in range(random_model.num_layers):
        name = f"blocks.{layer}.attn.hook_z"
        patched = phi3lab.trace(random_model, corrupted, names="hook_logits", hooks=phi3lab.hooks.patch(name, clean_tr))
        logits = patched.logits[:, -1].astype(np.float64)
        whole = float(np.mean(logits[:, ANSWER] - logits[:, COUNTER]))
        total = float(np.sum(result.raw[layer] - result.corrupted_metric))
        assert total == pytest.approx(whole - result.corrupted_metric, rel=2e-3, abs=1e-4), layer


def test_linear_attribution_is_the_first_order_term(random_model, random_pair):
    """Linear attribution equals delta . gradient from `phi3lab.gradients`
    at the corrupted run, and integrated with one step at alpha = 1/2 is
    the midpoint gradient (a different number)."""
    clean, corrupted = random_pair
    result = analysis.attribution_patching(
        random_model, clean, corrupted, answer=ANSWER, counterfactual=COUNTER, sites="resid_pre", normalize=False
    )
    g = phi3lab.gradients(
        random_model, corrupted, answer=ANSWER, counterfactual=COUNTER, names="blocks.*.hook_resid_pre"
    )
    clean_tr = phi3lab.trace(random_model, clean, names="blocks.*.hook_resid_pre")
    for layer in range(random_model.num_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        delta = clean_tr[name].astype(np.float64) - g[name]
        expected = (delta * g.grad(name)).sum(axis=(0, 2)) / len(clean)  # rows averaged
        np.testing.assert_allclose(result.raw[layer] - result.corrupted_metric, expected, rtol=1e-3, atol=1e-4)
    assert result.corrupted_metric == pytest.approx(float(np.mean(g.metric)), abs=1e-4)
    # Layer 0, unchanged positions: no difference, no attribution.
    np.testing.assert_allclose(result.raw[0, [0, 1, 3, 4, 5, 6]] - result.corrupted_metric, 0.0, atol=1e-6)


def test_head_by_position_attribution_sums_to_per_head(random_model, random_pair):
    """Linear attribution is a sum over units, so a head's positions add up to the head."""
    clean, corrupted = random_pair
    options = dict(answer=ANSWER, counterfactual=COUNTER, normalize=False)
    fine = analysis.attribution_patching(random_model, clean, corrupted, sites="head_z_position", **options)
    whole = analysis.attribution_patching(random_model, clean, corrupted, sites="head_z", **options)
    layers, heads = random_model.num_layers, random_model.num_query_heads
    assert fine.values.shape == (layers, clean.shape[1], heads) and fine.axes == ("layer", "position", "head")
    np.testing.assert_allclose(
        (fine.raw - fine.corrupted_metric).sum(1), whole.raw - whole.corrupted_metric, rtol=1e-9, atol=1e-9
    )


def test_attribution_result_goes_into_the_patching_view(random_model, random_pair):
    clean, corrupted = random_pair
    result = analysis.attribution_patching(random_model, clean, corrupted, answer=ANSWER, sites="head_v")
    assert result.values.shape == (random_model.num_layers, random_model.num_key_value_heads)
    assert result.axes == ("layer", "kv_head")
    view = phi3lab.widgets.PatchingView.from_result(result)
    np.testing.assert_array_equal(view.values, result.values)
    assert len(result.to_pandas()) == result.values.size


def test_attribution_errors(random_model, random_pair):
    clean, corrupted = random_pair
    with pytest.raises(ValueError, match="`sites`"):
        analysis.attribution_patching(random_model, clean, corrupted, answer=1, sites="resid")
    with pytest.raises(ValueError, match="`method`"):
        analysis.attribution_patching(random_model, clean, corrupted, answer=1, method="exact")
    with pytest.raises(ValueError, match="`steps`"):
        analysis.attribution_patching(random_model, clean, corrupted, answer=1, method="integrated", steps=0)
    with pytest.raises(ValueError, match="`corrupted_ids`"):
        analysis.attribution_patching(random_model, clean, corrupted[:, :4], answer=1)
    with pytest.raises(ValueError, match="scalar or one value per batch row"):
        analysis.attribution_patching(random_model, clean, corrupted, metric=lambda logits: logits[:, -1])
    with pytest.raises(ValueError, match="non-finite"):
        analysis.attribution_patching(random_model, clean, corrupted, metric=lambda logits: logits[0, -1, 0] / 0.0)
