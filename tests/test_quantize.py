"""`model.quantize("int8")`: weight-only int8 projection kernels with
per-output-channel scales, dequantized inside the compiled forward.

Oracles: the quantization formula written out in NumPy, and the exact
identity that a quantized model computes what a float model holding the
dequantized kernels computes."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import phi3lab
from conftest import LENGTHS, backbone_kwargs, forward, random_backbone, token_batch
from phi3lab import Phi3Backbone
from phi3lab import hooks as H
from phi3lab.presets import save_hf_checkpoint, save_preset

KERNELS = {  # name -> (layer, axes reduced for the per-output-channel scale, stacked shape)
    "query_kernel": ("attention", (1,)),
    "key_kernel": ("attention", (1,)),
    "value_kernel": ("attention", (1,)),
    "output_kernel": ("attention", (1, 2)),
    "gate_kernel": ("mlp", (1,)),
    "up_kernel": ("mlp", (1,)),
    "down_kernel": ("mlp", (1,)),
}


def reference_int8(kernel, axes):
    """int8 = round(w / s), s = max|w| / 127 over the input axes, per layer."""
    scale = np.max(np.abs(kernel), axis=axes, keepdims=True) / 127.0
    return np.clip(np.round(kernel / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    """A float model and the same weights quantized (GQA, partial rotary)."""
    float_model = random_backbone(seed=7, rope=None, partial_rotary_factor=0.75)
    quantized = Phi3Backbone.from_config(float_model.get_config())
    quantized.set_weights(float_model.get_weights())
    quantized.quantize("int8")
    return float_model, quantized


def test_kernels_are_int8_with_per_output_channel_scales(pair):
    float_model, quantized = pair
    assert quantized.quantization == "int8" and quantized.get_config()["quantization"] == "int8"
    for name, (part, axes) in KERNELS.items():
        original = np.asarray(getattr(getattr(float_model.decoder, part), name).value)
        layer = getattr(quantized.decoder, part)
        kernel, scale = getattr(layer, name), getattr(layer, name + "_scale")
        assert kernel.dtype == "int8" and scale.dtype == "float32" and not kernel.trainable
        expected_kernel, expected_scale = reference_int8(original, axes)
        np.testing.assert_allclose(np.asarray(scale.value), expected_scale, rtol=1e-6)
        assert np.abs(np.asarray(kernel.value).astype(int) - expected_kernel).max() <= 1  # rounding at .5 ties
        error = np.abs(np.asarray(kernel.value) * np.asarray(scale.value) - original)
        assert (error <= np.asarray(scale.value) / 2 + 1e-7).all()


def test_forward_equals_float_model_with_dequantized_kernels(pair):
    """Exact identity: the compiled int8 forward is the float forward of
    `int8 * scale` kernels (the dequantization is all that changed)."""
    float_model, quantized = pair
    dequantized = Phi3Backbone.from_config({**float_model.get_config()})
    dequantized.set_weights(float_model.get_weights())
    for name, (part, _) in KERNELS.items():
        layer = getattr(quantized.decoder, part)
        value = np.asarray(getattr(layer, name).value, np.float32) * np.asarray(getattr(layer, name + "_scale").value)
        getattr(getattr(dequantized.decoder, part), name).assign(value)
    ids, mask = token_batch(LENGTHS["above"])
    np.testing.assert_allclose(forward(quantized, ids, mask)[1], forward(dequantized, ids, mask)[1], atol=2e-5)
    # ... and it is not the float model: int8 rounding shows, but stays small on average.
    float_logits = forward(float_model, ids, mask)[1]
    error = np.abs(forward(quantized, ids, mask)[1] - float_logits)
    assert error.max() > 0 and error.mean() < 0.05 * np.abs(float_logits).mean()


def test_trace_hooks_and_estimate_on_int8(pair):
    float_model, quantized = pair
    ids, mask = token_batch(LENGTHS["below"])
    tr = phi3lab.trace(quantized, ids, padding_mask=mask, names=["blocks.1.attn.hook_z", "hook_logits"])
    # The trace runs a bucket-padded length (64), the forward the input's own:
    # float32 sums in another order. Logits up to ~8 differ by up to 1.4e-5
    # (jax 0.10.2 on CPU), as the dequantized forward above does (2e-5).
    np.testing.assert_allclose(tr["hook_logits"], forward(quantized, ids, mask)[1], rtol=1e-5, atol=2e-5)
    ablated = phi3lab.trace(
        quantized, ids, padding_mask=mask, names=["blocks.1.attn.hook_z"], hooks=H.ablate_heads(1, [2])
    )
    assert np.all(ablated["blocks.1.attn.hook_z"][:, :, 2] == 0)
    assert not np.allclose(ablated["blocks.1.attn.hook_z"][:, :, 0], 0)
    kernel_bytes = lambda model, itemsize: sum(
        int(np.prod(getattr(getattr(model.decoder, part), name).shape)) * itemsize
        for name, (part, _) in KERNELS.items()
    )
    saved = phi3lab.estimate(float_model, 8).weights - phi3lab.estimate(quantized, 8).weights
    scales = sum(int(np.prod(v.shape)) * 4 for v in quantized.weights if v.path.endswith("_scale"))
    assert saved == kernel_bytes(float_model, 4) - kernel_bytes(float_model, 1) - scales


def test_keras_file_round_trip(pair, tmp_path):
    _, quantized = pair
    quantized.save(tmp_path / "int8.keras")
    loaded = keras.saving.load_model(tmp_path / "int8.keras")
    assert loaded.get_config() == quantized.get_config()
    assert [(v.path, v.dtype) for v in loaded.weights] == [(v.path, v.dtype) for v in quantized.weights]
    ids, mask = token_batch(LENGTHS["below"])
    np.testing.assert_array_equal(forward(loaded, ids, mask)[1], forward(quantized, ids, mask)[1])
    rebuilt = Phi3Backbone.from_config(quantized.get_config())
    assert [(v.path, v.dtype, v.shape) for v in rebuilt.weights] == [
        (v.path, v.dtype, v.shape) for v in quantized.weights
    ]


def test_from_preset_quantizes_after_loading(pair, tmp_path):
    float_model, quantized = pair
    directory = save_hf_checkpoint(float_model, tmp_path)
    loaded = Phi3Backbone.from_preset(str(directory), quantization="int8")
    ids, mask = token_batch(LENGTHS["below"])
    np.testing.assert_allclose(forward(loaded, ids, mask)[1], forward(quantized, ids, mask)[1], atol=1e-6)


def test_clear_errors(pair, tmp_path):
    _, quantized = pair
    model = random_backbone(seed=8, rope=None)
    for mode in ("int4", "float8", None, "INT8"):
        with pytest.raises(ValueError, match='"int8"'):
            model.quantize(mode)
    with pytest.raises(ValueError, match="float8 mode is a training scheme"):
        model.quantize("float8")
    assert model.quantization is None and model.decoder.attention.query_kernel.dtype == "float32"
    with pytest.raises(ValueError, match="already quantized"):
        quantized.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized .* model.save\('name.keras'\)"):
        save_hf_checkpoint(quantized, tmp_path)


def test_quantized_layers_report_keras_int8_policies(pair):
    """The quantized layers say so the keras way, and the config's dtype is a
    DTypePolicyMap that keras itself reads back (keras is the oracle)."""
    float_model, quantized = pair
    layers = quantized.weight_layers()
    assert {path for path, layer in layers.items() if layer.quantization_mode == "int8"} == {
        "decoder/attention",
        "decoder/mlp",
    }
    assert layers["decoder/mlp"].dtype_policy.name == "int8_from_float32"
    assert layers["decoder/mlp"].compute_dtype == "float32" and quantized.dtype_policy.name == "float32"
    policy_map = keras.dtype_policies.deserialize(quantized.get_config()["dtype"])
    assert isinstance(policy_map, keras.dtype_policies.DTypePolicyMap)
    assert policy_map.default_policy.name == "float32"
    assert {path: policy_map[path].name for path in layers} == {
        path: ("int8_from_float32" if path in ("decoder/attention", "decoder/mlp") else "float32") for path in layers
    }
    assert float_model.get_config()["dtype"]["class_name"] == "DTypePolicy"


def int8_map(default="float32", keys=("decoder/attention", "decoder/mlp"), mode="int8"):
    policies = keras.dtype_policies
    return policies.DTypePolicyMap(default, {key: policies.get(f"{mode}_from_{default}") for key in keys})


@pytest.mark.parametrize("serialized", [False, True])
def test_dtype_policy_map_builds_the_quantized_model(pair, serialized):
    """A DTypePolicyMap with int8 entries for the kernel layers (as an object,
    as a regex, or serialized as keras writes it) builds the model that
    `quantize("int8")` makes: same config, same variables, same outputs."""
    _, quantized = pair
    config = quantized.get_config()
    arguments = {key: value for key, value in config.items() if key not in ("name", "quantization")}
    for dtype in (int8_map(), int8_map(keys=["decoder/(attention|mlp)"])):
        dtype = keras.dtype_policies.serialize(dtype) if serialized else dtype
        model = Phi3Backbone(**{**arguments, "dtype": dtype})
        assert model.quantization == "int8"
        assert [(v.path, v.dtype, v.shape) for v in model.weights] == [
            (v.path, v.dtype, v.shape) for v in quantized.weights
        ]
        model.set_weights(quantized.get_weights())
        assert {**model.get_config(), "name": None} == {**config, "name": None}
        ids, mask = token_batch(LENGTHS["below"])
        np.testing.assert_array_equal(forward(model, ids, mask)[1], forward(quantized, ids, mask)[1])


@pytest.mark.parametrize(
    "dtype, message",
    [
        ("int8_from_float32", "single layers"),
        (int8_map(mode="float8"), "float8 mode is a training scheme"),
        (int8_map(keys=["phi3_backbone/phi3_decoder/attention/query_dense"]), "matches none of them"),
        (int8_map(keys=["token_embedding", "decoder/attention", "decoder/mlp"]), "'token_embedding' has"),
        (int8_map(keys=["decoder/mlp"]), r"quantizes only \['decoder/mlp'\]"),
        (int8_map(keys=["decoder/.*"]), "'decoder/attention_norm' has"),
        (
            keras.dtype_policies.DTypePolicyMap("float32", {"final_norm": keras.dtype_policies.get("bfloat16")}),
            "share one float policy",
        ),
        (
            keras.dtype_policies.DTypePolicyMap(
                "float32", {"decoder/(attention|mlp)": keras.dtype_policies.get("int8_from_bfloat16")}
            ),
            "int8_from_float32",
        ),
        ({"class_name": "DTypePolicyMap", "module": "mymodule", "config": {}}, "serialized"),
    ],
)
def test_dtype_policy_maps_phi3lab_cannot_honour_are_refused(dtype, message):
    with pytest.raises(ValueError, match="`dtype` must") as error:
        Phi3Backbone(**backbone_kwargs(None), dtype=dtype)
    assert error.match(message)


def test_quantization_argument_contradicting_the_dtype_map_is_refused():
    with pytest.raises(ValueError, match="`quantization` must be 'int8' or left out"):
        Phi3Backbone(**backbone_kwargs(None), dtype=int8_map(), quantization=None)


def test_direct_logit_attribution_on_a_tied_int8_model():
    """The decomposition reads the dequantized output kernel and the tied
    head: head rows sum to their block's attention row, everything to the
    model's own logit difference."""
    model = random_backbone(seed=9, rope=None, tie_word_embeddings=True)
    model.quantize("int8")
    ids, mask = token_batch(LENGTHS["below"])
    tr = phi3lab.trace(model, ids, padding_mask=mask)
    table = phi3lab.analysis.direct_logit_attribution(model, tr, answer=5, counterfactual=7)
    blocks = phi3lab.analysis.direct_logit_attribution(model, tr, answer=5, counterfactual=7, level="layers")
    assert table.attrs["total"] == pytest.approx(table.attrs["logit_diff"], abs=1e-3)
    heads = table[table.kind == "head"].groupby("layer")["attribution"].sum()
    attn = blocks[blocks.kind == "attn"].set_index("layer")["attribution"]
    np.testing.assert_allclose(heads.values, attn.loc[heads.index].values, atol=1e-4)


def test_keras_hub_format_preset_round_trip(pair, tmp_path):
    """A quantized model saved as a keras-hub-format preset loads back as the
    same quantized model: its config, int8 kernels, scales and outputs."""
    _, quantized = pair
    directory = save_preset(quantized, tmp_path / "int8")
    loaded = Phi3Backbone.from_preset(str(directory))
    assert {**loaded.get_config(), "name": None} == {**quantized.get_config(), "name": None}
    for mine, theirs in zip(loaded.weights, quantized.weights):
        assert mine.path == theirs.path and mine.dtype == theirs.dtype
        np.testing.assert_array_equal(np.asarray(mine.value), np.asarray(theirs.value))
    ids, mask = token_batch(LENGTHS["below"])
    np.testing.assert_array_equal(forward(loaded, ids, mask)[1], forward(quantized, ids, mask)[1])


def test_keras_hub_quantized_preset_is_refused_naming_the_file(tmp_path):
    """A preset quantized by keras-hub (its map names keras-hub's layers) is
    refused, never read as float weights."""
    import json

    directory = save_preset(random_backbone(seed=10, rope=None), tmp_path)
    saved = json.loads((directory / "config.json").read_text())
    saved["config"]["dtype"] = keras.dtype_policies.serialize(int8_map(keys=["phi3_decoder/attention/query_dense"]))
    (directory / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="config.json: `dtype` must .* matches none of them"):
        Phi3Backbone.from_preset(str(directory))


def test_float_weights_never_load_into_int8_kernels_a_config_declares(tmp_path):
    """A keras-hub preset whose config.json says int8 but whose kernels are
    float is refused: only a load asked to quantize quantizes."""
    import json

    directory = save_preset(random_backbone(seed=11, rope=None), tmp_path)
    saved = json.loads((directory / "config.json").read_text())
    saved["config"]["dtype"] = keras.dtype_policies.serialize(int8_map())
    (directory / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="int8-quantized tensor and a float one"):
        Phi3Backbone.from_preset(str(directory))


def _bits(model) -> list:
    """Every weight's path, dtype and raw bytes, in the model's order."""
    return [(v.path, str(v.dtype), np.asarray(v.value).tobytes()) for v in model.weights]


@pytest.mark.parametrize("layout", ["hugging_face", "keras_hub"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, layout, dtype):
    """`from_preset(..., quantization="int8")` quantizes each kernel slice as
    it is read, never holding the float stack; the model equals, bit for bit,
    the float model loaded whole and then quantized (same config, variables
    in the same order, same bytes). An int8 `dtype` map asks the same."""
    float_model = random_backbone(seed=12, rope=None, partial_rotary_factor=0.75)
    save = save_hf_checkpoint if layout == "hugging_face" else save_preset
    directory = str(save(float_model, tmp_path / layout))
    after = Phi3Backbone.from_preset(directory, dtype=dtype)
    after.quantize("int8")
    while_loading = Phi3Backbone.from_preset(directory, dtype=dtype, quantization="int8")
    assert {**while_loading.get_config(), "name": None} == {**after.get_config(), "name": None}
    assert _bits(while_loading) == _bits(after)
    mapped = Phi3Backbone.from_preset(directory, dtype=int8_map(dtype))
    assert _bits(mapped) == _bits(after)
    # ... and already-int8 files load as they are, asked for int8 or not.
    if layout == "keras_hub":
        resaved = str(save_preset(after, tmp_path / "int8"))
        for kwargs in ({}, {"quantization": "int8"}):
            assert _bits(Phi3Backbone.from_preset(resaved, **kwargs)) == _bits(after)


def test_a_quantized_model_is_built_without_float_kernels():
    """`Phi3Backbone(quantization="int8")` declares int8 kernels and their
    scales directly (random init: each layer drawn, then quantized): no float
    kernel variable is ever made, so building never holds a float stack.
    Its variables are those `quantize("int8")` leaves, in the same order."""
    made = []
    original = keras.layers.Layer.add_weight

    def recording(layer, *args, **kwargs):
        variable = original(layer, *args, **kwargs)
        made.append((variable.path, str(variable.dtype)))
        return variable

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.layers.Layer, "add_weight", recording)
        model = Phi3Backbone(**backbone_kwargs(None), dtype="bfloat16", quantization="int8")
    kernels = [(path, dtype) for path, dtype in made if path.split("/")[-1].removesuffix("_scale") in KERNELS]
    assert kernels and {dtype for path, dtype in kernels if not path.endswith("_scale")} == {"int8"}
    reference = Phi3Backbone(**backbone_kwargs(None), dtype="bfloat16")
    reference.quantize("int8")
    assert [(v.path, v.dtype, v.shape) for v in model.weights] == [
        (v.path, v.dtype, v.shape) for v in reference.weights
    ]
    # Drawn, not left at zero: each kernel is the quantization of a normal draw (peak +-127 per channel).
    for name, (part, _) in KERNELS.items():
        kernel = np.asarray(getattr(getattr(model.decoder, part), name).value)
        assert np.abs(kernel).max() == 127 and np.abs(kernel).mean() > 10


def test_generation_runs_on_int8(shipped_model, shipped_tokenizer):
    """Greedy generation on the shipped model, quantized, continues the
    task prompt as the float32 model does."""
    tokenizer = shipped_tokenizer
    prompt = "Mary and John went to the store. John gave a drink to"
    expected = phi3lab.generate(shipped_model, prompt, tokenizer=tokenizer, max_new_tokens=4)
    model = Phi3Backbone.from_preset("phi3lab_tiny_en", quantization="int8")
    quantized = phi3lab.generate(model, prompt, tokenizer=tokenizer, max_new_tokens=4)
    assert expected.text and quantized.text == expected.text
    assert quantized.new_token_ids.tolist() == expected.new_token_ids.tolist()
