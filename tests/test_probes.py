"""Probes and contrast vectors (`phi3lab.analysis.probe`, `probe_sweep`, `contrast_vector`).

Oracles: directions planted in synthetic activations of very unequal feature
scales (so a direction left in the standardized basis fails), NumPy means of
`phi3lab.trace` rows, and, on the shipped model, a concept it must compute
for the name-mover task (a name said before), scored on held-out names in the
held-out template.
"""

from __future__ import annotations

import numpy as np
import pytest

import phi3lab
from conftest import random_backbone
from phi3lab import tasks
from phi3lab.activations import collect
from phi3lab.analysis import contrast_vector, probe, probe_sweep


def planted(kind: str, rows: int = 20000, width: int = 16, seed: int = 0):
    """Features of scales 0.1-10 with offsets; labels from a planted direction
    `w` (Bernoulli of a logistic, or linear plus noise)."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.1, 10.0, width)
    features = rng.standard_normal((rows, width)) * scales + rng.standard_normal(width)
    w = rng.standard_normal(width) / scales  # every feature carries signal
    signal = (features - features.mean(0)) @ w
    signal *= 4.0 / signal.std()
    if kind == "logistic":
        labels = rng.random(rows) < 1 / (1 + np.exp(-signal))
    else:
        labels = signal + 0.5 * rng.standard_normal(rows)
    return features.astype(np.float32), labels, w / np.linalg.norm(w), scales


@pytest.mark.parametrize("kind", ["logistic", "linear"])
def test_planted_direction_is_recovered_in_the_model_basis(kind):
    features, labels, w, scales = planted(kind)
    result = probe(features, labels, kind=kind)
    assert float(result.direction @ w) >= 0.99
    assert np.linalg.norm(result.direction) == pytest.approx(1.0, abs=1e-6)
    # The same direction in the standardized basis is far off: the scales must be undone.
    standardized = w * scales
    assert float(standardized @ w) / np.linalg.norm(standardized) < 0.9
    if kind == "logistic":
        assert 0.85 < result.test_score < 0.97  # near the Bayes rate of sigmoid(4 z)
        assert (
            result.estimator.predict(features[:100]).tolist()
            == (features[:100] @ result.weights + result.bias > 0).tolist()
        )
    else:
        assert result.test_score > 0.97
        np.testing.assert_allclose(
            result.estimator.predict(features[:100]),
            features[:100] @ result.weights + result.bias,
            rtol=1e-6,
            atol=1e-6,
        )
    frame = result.to_pandas()
    assert frame.loc[0, "test_size"] == 4000 and frame.loc[0, "train_size"] == 16000


def test_probe_bad_input():
    features, labels, _, _ = planted("logistic", rows=100)
    with pytest.raises(ValueError, match=r"`labels` must be one label per row, shape \(100,\)"):
        probe(features, labels[:-1])
    with pytest.raises(ValueError, match="`labels` must be exactly two classes"):
        probe(features, np.arange(100) % 3)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        probe(features, labels, kind="svm")
    with pytest.raises(ValueError, match="`test_size` must be a fraction"):
        probe(features, labels, test_size=1.5)
    with pytest.raises(ValueError, match="`store_or_arrays` must be an ActivationStore or floats"):
        probe(np.arange(100), labels)


def test_contrast_vector_is_the_difference_of_last_token_means():
    model = random_backbone(0, scale=0.1)
    rng = np.random.default_rng(0)
    positive = [rng.integers(0, 50, n) for n in (5, 9, 12)]
    negative = [rng.integers(50, 96, n) for n in (4, 7)]
    site = "blocks.1.hook_resid_post"
    vector = contrast_vector(model, positive, negative, site, batch_size=4, progress=False)
    last = lambda docs: np.mean([phi3lab.trace(model, ids, names=site)[site][0, -1] for ids in docs], axis=0)
    np.testing.assert_allclose(vector, last(positive) - last(negative), atol=1e-5)
    steered = phi3lab.trace(model, positive[0], names="hook_logits", hooks=phi3lab.hooks.add(site, vector))
    assert steered["hook_logits"].shape == (1, 5, model.vocabulary_size)
    with pytest.raises(ValueError, match="`site` must be one hook name"):
        contrast_vector(model, positive, negative, [site, site])


def name_store(model, tok, count: int, seed: int, names, templates):
    """Residual streams at every name token of name-mover prompts (half with
    a distractor sentence in front, so a repeated name is not simply a late
    one), labelled True where the name was said before in the prompt."""
    ids = np.array(sorted({tasks.name_token(tok, name) for name in tasks.TRAIN_NAMES + tasks.HELD_OUT_NAMES}))
    prompts = tasks.name_mover_prompts(count, seed=seed, names=names, templates=templates, distractor_rate=0.5)
    store = collect(
        model,
        [prompt.text for prompt in prompts],
        ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"],
        tokenizer=tok,
        positions=lambda tokens: np.isin(tokens, ids),
        progress=False,
    )
    tokens = store.tokens
    return store, (tokens.groupby(["doc", "token_id"]).cumcount() > 0).to_numpy()


def test_shipped_model_represents_a_repeated_name_on_held_out_names_and_template(shipped_model, shipped_tokenizer):
    model, tok = shipped_model, shipped_tokenizer
    train, labels = name_store(model, tok, 300, 0, tasks.TRAIN_NAMES, tasks.TEMPLATES)
    held_out, held_labels = name_store(model, tok, 150, 1, tasks.HELD_OUT_NAMES, tasks.HELD_OUT_TEMPLATES)
    sweep = probe_sweep(train, labels)
    frame = sweep.to_pandas()
    frame["held_out"] = [result.score(held_out, held_labels) for result in sweep.results.values()]
    print(frame.to_string())
    majority = max(held_labels.mean(), 1 - held_labels.mean())
    by_site = frame.set_index("site")["held_out"]
    # The embedding of a name does not say whether it was said before: chance.
    assert by_site["blocks.0.hook_resid_pre"] < majority + 0.05
    # After the duplicate-token heads (layers 0-1) it does, on names and a template never trained on.
    assert by_site["blocks.2.hook_resid_post"] > 0.9
    assert sweep.best.site in ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    figure = sweep.figure()
    assert [trace.name for trace in figure.data] == ["train_score", "test_score"]
    assert list(figure.data[1].y) == frame["test_score"].tolist()
