"""The Phi-3 family beyond Phi-3-mini: partial rotary (Phi-4-mini), tied
embeddings, the built-in Phi-3.5 / Phi-3-medium / Phi-4-mini / Phi-4
architectures, and parity with transformers' Phi-3 on each shape."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from conftest import (
    HEADS,
    HIDDEN,
    LENGTHS,
    assert_matches_transformers,
    backbone_kwargs,
    forward,
    hf_config,
    hf_forward,
    hf_model,
    max_diff,
    random_backbone,
    require,
    rope_factors,
    token_batch,
)
from phi3lab import Phi3Backbone
from phi3lab.model.rotary import apply_rotary
from phi3lab.presets import save_hf_checkpoint, save_preset
from phi3lab.presets.preflight import declared_model

TOLERANCE = 1e-4
HEAD_DIM = HIDDEN // HEADS  # 16
PARTIAL = 0.75  # Phi-4-mini's factor: 12 of 16 dims rotate, 6 pairs

# Published parameter counts (Hugging Face safetensors metadata of each
# checkpoint; keras-hub's preset metadata gives 3,821,079,552 for Phi-3-mini).
PUBLISHED = {
    "phi3_mini_4k_instruct_en": 3_821_079_552,
    "phi3_5_mini_instruct_en": 3_821_079_552,
    "phi3_medium_4k_instruct_en": 13_960_238_080,
    "phi4_mini_instruct_en": 3_836_021_760,
    "phi4_en": 14_659_507_200,
}


def build_unallocated(preset: str, **kwargs) -> Phi3Backbone:
    """The architecture of `preset` with its variables declared but never
    initialized: no weight memory is allocated (a 14B model in a test), and
    none is left pending in keras for a later symbolic call to allocate."""
    model = declared_model(lambda: Phi3Backbone.from_preset(preset, load_weights=False, **kwargs))
    assert all(variable._value is None for variable in model.weights)
    return model


# --- built-in architectures ---------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_count_params_equals_published(preset, no_network):
    assert build_unallocated(preset).count_params() == PUBLISHED[preset]


def test_family_architectures_offline(no_network):
    mini = build_unallocated("phi4_mini_instruct_en")
    assert (mini.partial_rotary_factor, mini.rotary_dim, mini.head_dim) == (0.75, 96, 128)
    assert mini.tie_word_embeddings and "reverse_embeddings" not in [v.name for v in mini.weights]
    assert len(mini.rope_scaling_long_factor) == 48 and mini.num_key_value_heads == 8
    phi4 = build_unallocated("phi4_en")
    assert (phi4.rope_max_wavelength, phi4.rope_scaling_type, phi4.rotary_dim) == (250000, None, 128)
    phi35 = build_unallocated("phi3_5_mini_instruct_en")
    assert phi35.rope_scaling_type == "su" and phi35.rope_scaling_long_factor[-1] == pytest.approx(64.84, abs=1e-2)
    assert phi35.rotary.attention_factor == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    for name in PUBLISHED:
        assert name in Phi3Backbone.presets


@pytest.mark.parametrize("preset", ["phi4_mini_instruct_en", "phi4_en", "phi3_5_mini_instruct_en"])
def test_family_weights_need_the_download(preset, no_network):
    with pytest.raises((RuntimeError, ImportError)) as info:
        Phi3Backbone.from_preset(preset)
    assert "hf://microsoft/" in str(info.value) and "from_preset('/path/to/dir')" in str(info.value)


# --- partial rotary -----------------------------------------------------------


def rotate_reference(x, positions, rotary_dim, base=10000.0):
    """NumPy from the formula: pairs (i, i + rotary_dim/2) of the first
    rotary_dim dims turn by position / base**(2i/rotary_dim); the rest stay."""
    half = rotary_dim // 2
    angle = positions[:, None] / base ** (2 * np.arange(half) / rotary_dim)
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    a, b = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin, x[..., rotary_dim:]], axis=-1)


def test_partial_rotary_rotates_only_the_leading_dims():
    model = random_backbone(seed=1, rope=None, partial_rotary_factor=PARTIAL)
    assert model.rotary_dim == 12 and model.rotary.num_pairs == 6
    x = np.random.default_rng(0).standard_normal((2, 7, 3, HEAD_DIM)).astype(np.float32)
    cos, sin = model.rotary.tables(7)
    assert cos.shape == (7, 12)
    rotated = np.asarray(apply_rotary(x, cos, sin))
    np.testing.assert_array_equal(rotated[..., 12:], x[..., 12:])
    np.testing.assert_allclose(rotated, rotate_reference(x, np.arange(7.0), 12), atol=1e-5)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"partial_rotary_factor": 0.0}, ["partial_rotary_factor=0.0", "(0, 1]"]),
        ({"partial_rotary_factor": 1.5}, ["partial_rotary_factor=1.5", "(0, 1]"]),
        ({"partial_rotary_factor": 0.1}, ["even", "partial_rotary_factor=0.1", "1"]),
        ({"partial_rotary_factor": 0.75}, ["rotary_dim // 2 = 6", "length 8"]),  # factor lists for full rotary
        ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings='yes'", "True or False"]),
        ({"quantization": "int4"}, ["quantization='int4'", '"int8"']),
    ],
)
def test_bad_family_arguments(overrides, fragments):
    with pytest.raises(ValueError) as info:
        Phi3Backbone(**backbone_kwargs("su", **overrides))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_rotary_descriptions_separate_pass_through_dims():
    import phi3lab

    model = random_backbone(
        seed=2,
        rope="su",
        partial_rotary_factor=PARTIAL,
        rope_scaling_short_factor=rope_factors(6)[0],
        rope_scaling_long_factor=rope_factors(6)[1],
    )
    view = phi3lab.widgets.RopeView(model, seq_len=LENGTHS["above"])
    assert "pass-through dims (not rotated)</b></td><td>12–15" in view.summary.value
    assert "rotary dims 0–11 of head_dim 16" in view.summary.value
    table = phi3lab.analysis.rotary_table(model, seq_len=LENGTHS["above"])
    assert len(table) == 6 and table["dims"].iloc[0] == "0,6"
    assert table.attrs["pass_through_dims"] == list(range(12, 16)) and table.attrs["rotary_dim"] == 12
    ids, mask = token_batch(LENGTHS["above"])
    tr = phi3lab.trace(
        model,
        ids,
        padding_mask=mask,
        names=["blocks.1.attn.hook_q", "blocks.1.attn.hook_rot_*", "blocks.1.attn.hook_attn_scores"],
    )
    assert tr.rope.rotary_dim == 12 and tr.rope.cos.shape == (LENGTHS["above"], 12)
    rot_q, q = tr["blocks.1.attn.hook_rot_q"], tr["blocks.1.attn.hook_q"]
    np.testing.assert_array_equal(rot_q[..., 12:], q[..., 12:])  # pass-through dims untouched
    assert not np.allclose(rot_q[:, 1:, :, :12], q[:, 1:, :, :12])
    parts = phi3lab.analysis.rotary_band_scores(model, tr, layer=1, head=3, batch=1)
    assert parts.shape[0] == 7  # 6 rotary pairs + the pass-through block
    scores = tr["blocks.1.attn.hook_attn_scores"][1, 3]
    allowed = np.isfinite(parts[0])
    np.testing.assert_allclose(parts.sum(0)[allowed], scores[allowed], atol=1e-4)
    q, k = tr["blocks.1.attn.hook_rot_q"][1, :, 3], tr["blocks.1.attn.hook_rot_k"][1, :, 1]
    passed = (q[:, 12:] @ k[:, 12:].T) / np.sqrt(HEAD_DIM)
    np.testing.assert_allclose(parts[6][allowed], passed[allowed], atol=1e-5)


# --- tied embeddings ----------------------------------------------------------


def test_tied_head_is_the_embedding_transpose():
    model = random_backbone(seed=3, rope=None, tie_word_embeddings=True)
    assert "token_embedding/reverse_embeddings" not in [v.path for v in model.weights]
    hidden, logits = forward(model, *token_batch(LENGTHS["below"]))
    embeddings = np.asarray(model.token_embedding.embeddings.value, np.float64)
    np.testing.assert_allclose(logits, hidden.astype(np.float64) @ embeddings.T, atol=1e-4)


def test_tied_model_saves_and_loads_in_both_formats(tmp_path):
    model = random_backbone(seed=4, rope=None, tie_word_embeddings=True, partial_rotary_factor=PARTIAL)
    ids, mask = token_batch(LENGTHS["below"])
    expected = forward(model, ids, mask)[1]
    hf_dir = save_hf_checkpoint(model, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["partial_rotary_factor"] == PARTIAL
    from phi3lab.presets.safetensors_io import SafetensorsFile

    assert "lm_head.weight" not in SafetensorsFile(hf_dir / "model.safetensors").keys()  # noqa: SIM118 (a method, not a dict)
    hub_dir = save_preset(model, tmp_path / "keras_hub")
    saved = json.loads((hub_dir / "config.json").read_text())["config"]
    assert saved["tie_word_embeddings"] is True and "quantization" not in saved and "sliding_window" not in saved
    for directory in (hf_dir, hub_dir):
        loaded = Phi3Backbone.from_preset(str(directory))
        assert loaded.tie_word_embeddings and loaded.rotary_dim == 12
        np.testing.assert_array_equal(forward(loaded, ids, mask)[1], expected)


def test_default_model_writes_keras_hub_config_unchanged(tmp_path):
    saved = json.loads((save_preset(random_backbone(seed=5, rope=None), tmp_path) / "config.json").read_text())
    assert not set(saved["config"]) & {"sliding_window", "partial_rotary_factor", "tie_word_embeddings", "quantization"}


# --- parity with transformers on family-shaped small configs ------------------

SHAPES = {
    # Phi-3.5-mini: LongRoPE with 128k-style factors, full rotary, untied, MHA.
    "phi3_5_mini": {"rope": "longrope", "num_key_value_heads": HEADS},
    # Phi-4-mini: partial rotary 0.75 (6 factor pairs), tied, GQA, LongRoPE.
    "phi4_mini": {
        "num_key_value_heads": 2,
        "partial_rotary_factor": PARTIAL,
        "tie_word_embeddings": True,
        "rope_scaling": {"type": "longrope", "short_factor": rope_factors(6)[0], "long_factor": rope_factors(6)[1]},
    },
    # Phi-4: full rotary, rope_theta 250000, no scaling, GQA, untied.
    "phi4": {"rope": None, "num_key_value_heads": 2, "rope_theta": 250000.0},
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def family_pair(request, tmp_path_factory):
    require("transformers")
    reference = hf_model(hf_config(**SHAPES[request.param]), seed=20)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return request.param, reference, directory, Phi3Backbone.from_preset(str(directory))


@pytest.mark.parametrize("where", sorted(LENGTHS))
def test_family_matches_transformers(family_pair, where):
    name, reference, _, model = family_pair
    if name == "phi4_mini":
        assert model.tie_word_embeddings and model.rotary_dim == 12 and model.num_key_value_heads == 2
    if name == "phi4":
        assert model.rope_max_wavelength == 250000.0 and model.rope_scaling_type is None
    assert_matches_transformers(model, reference, [LENGTHS[where]], TOLERANCE)


def test_rotating_all_dims_breaks_the_match(tmp_path):
    """Negative control: the same Phi-4-mini-shaped checkpoint (no scaling
    here, so the factor lists need no resizing) read with full rotary."""
    require("transformers")
    reference = hf_model(hf_config(num_key_value_heads=2, partial_rotary_factor=PARTIAL), seed=21)
    reference.save_pretrained(tmp_path)
    ids, mask = token_batch(LENGTHS["above"])
    expected = hf_forward(reference, ids, mask)[1]
    right = Phi3Backbone.from_preset(str(tmp_path))
    wrong = Phi3Backbone.from_preset(str(tmp_path), partial_rotary_factor=1.0)
    assert max_diff(forward(right, ids, mask)[1], expected, mask) < TOLERANCE
    assert max_diff(forward(wrong, ids, mask)[1], expected, mask) > 100 * TOLERANCE


def test_untying_breaks_the_match(tmp_path):
    """Negative control: a tied checkpoint has no lm_head.weight, so reading
    it untied is refused; an untied head (here a random one) differs, and
    setting it to the embedding's transpose restores the match."""
    require("transformers")
    reference = hf_model(hf_config(**SHAPES["phi4_mini"]), seed=22)
    reference.save_pretrained(tmp_path)
    directory, model = tmp_path, Phi3Backbone.from_preset(str(tmp_path))
    with pytest.raises(ValueError, match="lm_head.weight"):
        Phi3Backbone.from_preset(str(directory), tie_word_embeddings=False)
    untied = Phi3Backbone.from_preset(str(directory), tie_word_embeddings=False, load_weights=False)
    weights = {variable.path: variable.value for variable in model.weights}
    for variable in untied.weights:
        if variable.path in weights:
            variable.assign(weights[variable.path])
    ids, mask = token_batch(LENGTHS["below"])
    expected = hf_forward(reference, ids, mask)[1]
    assert max_diff(forward(untied, ids, mask)[1], expected, mask) > 100 * TOLERANCE
    untied.token_embedding.reverse_embeddings.assign(np.asarray(model.token_embedding.embeddings.value).T)
    assert max_diff(forward(untied, ids, mask)[1], expected, mask) < TOLERANCE


def test_an_unallocated_architecture_leaves_nothing_for_keras_to_allocate(no_network):
    """Leaving a stateless scope (as every symbolic keras call does)
    initializes the variables pending in keras' global state: a declared
    Phi-4 (14B) must not be among them, or a later keras-hub model build
    allocates its 59 GB."""
    build_unallocated("phi4_en")
    with keras.StatelessScope():
        pass
