"""The backbone against independent oracles, and its Keras behaviour.

Oracles: keras-hub's `Phi3Backbone` (weights copied through a preset written
by keras-hub) and transformers' `Phi3ForCausalLM` on torch CPU (weights
copied through `save_pretrained`). All weights are random, norm scales
included, so a mix-up of any tensor shows. Tolerances are absolute on outputs
of order 1-10 (hidden states after the final norm, logits).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from conftest import (
    LENGTHS,
    PRETRAINING,
    assert_matches_transformers,
    backbone_kwargs,
    forward,
    hf_config,
    hf_forward,
    hf_model,
    keras_hub_forward,
    max_diff,
    random_backbone,
    randomize_keras,
    require,
    token_batch,
)
from phi3lab import Phi3Backbone

# Absolute, float32. Measured (transformers 5.24, keras-hub 0.32, CPU): at most
# 7e-6 against keras-hub (outputs up to ~6), 1.2e-5 (hidden) and 3.1e-5
# (logits, up to ~13) against transformers.
KERAS_HUB_TOLERANCE = 1e-5
HF_TOLERANCE = 1e-4

ROPES = [None, "su"]
HEADS = {"gqa": 2, "mha": 4}


# --- keras-hub ---------------------------------------------------------------


@pytest.fixture(scope="module", params=[(r, h) for r in ROPES for h in HEADS], ids=lambda p: f"{p[0]}-{p[1]}")
def keras_hub_pair(request, tmp_path_factory):
    """(keras-hub model, phi3lab model loaded from keras-hub's own preset)."""
    keras_hub = require("keras_hub")
    rope, heads = request.param
    reference = keras_hub.models.Phi3Backbone(**backbone_kwargs(rope, HEADS[heads]))
    randomize_keras(reference, seed=1)
    directory = tmp_path_factory.mktemp("keras_hub_preset")
    reference.save_to_preset(str(directory))
    return rope, reference, Phi3Backbone.from_preset(str(directory))


def test_matches_keras_hub(keras_hub_pair):
    rope, reference, model = keras_hub_pair
    # With "su" the length picks the short factors (below, at) or the long
    # ones (above the pretraining length).
    for length in LENGTHS.values():
        ids, mask = token_batch(length, seed=length)
        expected = keras_hub_forward(reference, ids, mask)
        hidden, _ = forward(model, ids, mask)
        assert np.abs(expected[mask.astype(bool)]).max() > 0.5  # a real signal
        assert max_diff(hidden, expected, mask) < KERAS_HUB_TOLERANCE, (rope, length)


# --- transformers --------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """Cache of `(rope, heads, sliding_window) -> (hf model, checkpoint dir)`."""
    require("transformers")
    cache = {}

    def get(rope, heads="gqa", sliding_window=None):
        key = (rope, heads, sliding_window)
        if key not in cache:
            reference = hf_model(hf_config(rope, HEADS[heads], sliding_window), seed=2)
            directory = tmp_path_factory.mktemp("hf_checkpoint")
            reference.save_pretrained(directory)
            cache[key] = reference, directory
        return cache[key]

    return get


def test_hf_last_hidden_state_is_after_final_norm(hf_checkpoints):
    """The oracle's own contract: transformers 5 reports the final-normed
    state as the last `hidden_states` element."""
    import torch

    reference, _ = hf_checkpoints("longrope")
    ids, mask = token_batch(LENGTHS["above"])
    hidden, _ = hf_forward(reference, ids, mask)
    with torch.no_grad():
        base = reference.model(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long())
    # `Phi3Model.forward` returns `self.norm(hidden_states)` as last_hidden_state.
    np.testing.assert_array_equal(hidden, base.last_hidden_state.numpy())


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("rope", [None, "longrope", "su"])
def test_matches_transformers(hf_checkpoints, rope, heads):
    reference, directory = hf_checkpoints(rope, heads)
    model = Phi3Backbone.from_preset(str(directory))
    assert model.rope_scaling_type == (None if rope is None else "su")
    assert model.pretraining_sequence_length == PRETRAINING
    # "su" is the legacy name of "longrope": the same model (checked below),
    # so one length suffices.
    lengths = {"above": LENGTHS["above"]} if rope == "su" else LENGTHS
    if rope == "su":
        longrope = Phi3Backbone.from_preset(str(hf_checkpoints("longrope", heads)[1]), load_weights=False)
        assert {**model.get_config(), "name": None} == {**longrope.get_config(), "name": None}
    assert_matches_transformers(model, reference, lengths.values(), HF_TOLERANCE)


def test_sliding_window_matches_transformers(hf_checkpoints):
    window = 4
    reference, directory = hf_checkpoints("longrope", "gqa", window)
    model = Phi3Backbone.from_preset(str(directory))
    assert model.sliding_window == window
    without_window = Phi3Backbone.from_preset(str(directory), sliding_window=None)
    assert_matches_transformers(model, reference, (LENGTHS["at"], LENGTHS["above"]), HF_TOLERANCE)
    for length in (LENGTHS["at"], LENGTHS["above"]):  # control: the window really changes the result
        ids, mask = token_batch(length, seed=length)
        assert max_diff(forward(without_window, ids, mask)[1], hf_forward(reference, ids, mask)[1], mask) > 0.1


def test_swapped_rope_factors_break_the_match(hf_checkpoints):
    """Negative control: the same weights with short and long factors swapped
    must disagree with transformers above the pretraining length, so the
    parity tests above can see a wrong factor choice."""
    reference, directory = hf_checkpoints("longrope")
    model = Phi3Backbone.from_preset(str(directory))
    swapped = Phi3Backbone.from_preset(
        str(directory),
        rope_scaling_short_factor=model.rope_scaling_long_factor,
        rope_scaling_long_factor=model.rope_scaling_short_factor,
    )
    ids, mask = token_batch(LENGTHS["above"], seed=5)
    _, expected = hf_forward(reference, ids, mask)
    assert max_diff(forward(model, ids, mask)[1], expected, mask) < HF_TOLERANCE
    assert max_diff(forward(swapped, ids, mask)[1], expected, mask) > 0.1


# --- Keras behaviour --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model():
    return random_backbone(seed=4, rope="su", max_sequence_length=64)


def test_call_equals_pure_forward(small_model):
    """`model(inputs)` (eager, with its input checks) is the jitted `apply`;
    the padding mask defaults to all ones."""
    ids, mask = token_batch(LENGTHS["above"], seed=3)
    hidden, _ = forward(small_model, ids, mask)
    called = np.asarray(small_model({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(called, hidden, atol=1e-6)
    unpadded, _ = forward(small_model, ids, np.ones_like(mask))
    np.testing.assert_allclose(np.asarray(small_model({"token_ids": ids})), unpadded, atol=1e-6)


def test_keras_file_round_trip(small_model, tmp_path):
    path = tmp_path / "model.keras"
    small_model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, Phi3Backbone)
    assert loaded.get_config() == small_model.get_config()
    ids, mask = token_batch(LENGTHS["above"])
    np.testing.assert_array_equal(forward(loaded, ids, mask)[1], forward(small_model, ids, mask)[1])


def test_config_round_trip(small_model):
    config = small_model.get_config()
    json.dumps(config)  # plain data
    rebuilt = Phi3Backbone.from_config(config)
    assert rebuilt.get_config() == config
    rebuilt.set_weights(small_model.get_weights())
    ids, mask = token_batch(LENGTHS["below"])
    np.testing.assert_array_equal(forward(rebuilt, ids, mask)[0], forward(small_model, ids, mask)[0])


def test_longrope_is_stored_as_su():
    kwargs = backbone_kwargs("longrope")
    model = random_backbone(seed=0, config=kwargs)
    assert model.get_config()["rope_scaling_type"] == "su"
    assert model.get_config()["rope_scaling_long_factor"] == kwargs["rope_scaling_long_factor"]


@pytest.mark.parametrize(
    "dtype, variable_dtype",
    [("bfloat16", "bfloat16"), ("mixed_bfloat16", "float32")],
)
def test_bfloat16_variants(dtype, variable_dtype):
    # Weights of scale 0.1: with 0.3 two random layers amplify bfloat16's
    # rounding (8-bit mantissa) to ~10% of the output.
    reference = random_backbone(seed=6, scale=0.1, rope="su")
    model = random_backbone(seed=0, config={**reference.get_config(), "dtype": dtype})
    model.set_weights(reference.get_weights())
    assert all(v.dtype == variable_dtype for v in model.weights)
    assert random_backbone(seed=0, config=model.get_config()).dtype_policy.name == dtype
    ids, mask = token_batch(LENGTHS["above"])
    hidden, logits = forward(model, ids, mask)
    assert hidden.dtype == logits.dtype == "bfloat16"
    expected, _ = forward(reference, ids, mask)
    error = max_diff(np.asarray(hidden, np.float32), expected, mask)
    assert error < 0.05 * np.abs(expected).max(), error  # measured ~1.5%


def test_dropout_only_in_training(small_model):
    with_dropout = Phi3Backbone.from_config({**small_model.get_config(), "dropout": 0.3})
    with_dropout.set_weights(small_model.get_weights())
    ids, mask = token_batch(LENGTHS["below"])
    inputs = {"token_ids": ids, "padding_mask": mask}
    first = np.asarray(with_dropout(inputs, training=True))
    second = np.asarray(with_dropout(inputs, training=True))
    assert max_diff(first, second, mask) > 1e-2
    inference = np.asarray(with_dropout(inputs, training=False))
    np.testing.assert_allclose(inference, forward(small_model, ids, mask)[0], atol=1e-6)
    assert max_diff(first, inference, mask) > 1e-2
