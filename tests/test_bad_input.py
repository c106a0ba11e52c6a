"""Bad input fails early with a message naming the argument and the value."""

from __future__ import annotations

import inspect
import json
import re

import h5py
import numpy as np
import pytest

from conftest import HIDDEN, SIZE_ARGUMENTS, VOCAB, backbone_kwargs, random_backbone
from phi3lab import Phi3Backbone
from phi3lab.presets import save_hf_checkpoint, save_preset
from phi3lab.presets.safetensors_io import SafetensorsFile, write_safetensors

PAIRS = HIDDEN // 4 // 2  # rotary pairs with 4 query heads


def raises(error, *fragments, call):
    """Run `call`, expect `error`, and check each fragment is in the message."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in: {message}"
    return message


# --- constructor -----------------------------------------------------------


@pytest.mark.parametrize("which", ["rope_scaling_short_factor", "rope_scaling_long_factor"])
@pytest.mark.parametrize("length", [PAIRS - 1, PAIRS + 1, 0])
def test_factor_list_of_wrong_length(which, length):
    kwargs = backbone_kwargs("su", **{which: [1.0] * length})
    raises(ValueError, which, f"length {length}", PAIRS, call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize("which", ["rope_scaling_short_factor", "rope_scaling_long_factor"])
def test_factor_list_missing_under_su(which):
    kwargs = backbone_kwargs("su", **{which: None})
    raises(ValueError, which, f"{which}=None", '"su"', call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "1.0"])
def test_factor_list_with_a_bad_entry(bad):
    factors = [1.0] * (PAIRS - 1) + [bad]
    kwargs = backbone_kwargs("su", rope_scaling_long_factor=factors)
    raises(ValueError, "rope_scaling_long_factor", repr(bad), call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize("which", ["rope_scaling_short_factor", "rope_scaling_long_factor"])
def test_factors_without_scaling_type(which):
    kwargs = backbone_kwargs(None, **{which: [1.5] * PAIRS})
    raises(ValueError, which, "[1.5, 1.5", "rope_scaling_type", call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize("value", ["yarn", "SU", "linear", 1])
def test_unknown_rope_scaling_type(value):
    kwargs = backbone_kwargs("su", rope_scaling_type=value)
    raises(ValueError, f"rope_scaling_type={value!r}", '"su"', call=lambda: Phi3Backbone(**kwargs))


def test_query_heads_not_a_multiple_of_key_value_heads():
    kwargs = backbone_kwargs(None, num_key_value_heads=3)
    raises(
        ValueError,
        "num_query_heads=4",
        "num_key_value_heads=3",
        "[1, 2, 4]",
        call=lambda: Phi3Backbone(**kwargs),
    )


def test_hidden_dim_not_divisible_by_query_heads():
    kwargs = backbone_kwargs(None, hidden_dim=62)
    raises(ValueError, "hidden_dim=62", "num_query_heads=4", call=lambda: Phi3Backbone(**kwargs))


def test_odd_head_size():
    kwargs = backbone_kwargs(None, hidden_dim=60)  # head size 15
    raises(ValueError, "hidden_dim=60", "even", call=lambda: Phi3Backbone(**kwargs))


SIZES = [*SIZE_ARGUMENTS, "sliding_window"]


def test_the_size_table_names_every_integer_argument():
    """`SIZE_ARGUMENTS` is the tests' own table (conftest); it must name every
    constructor argument that is required or defaults to an int, so that a new
    size argument cannot go unchecked. `rope_max_wavelength` (default 10000)
    is a positive real (`test_bad_numbers`)."""
    parameters = inspect.signature(Phi3Backbone).parameters.values()
    integers = {
        p.name
        for p in parameters
        if p.kind is p.POSITIONAL_OR_KEYWORD and (p.default is p.empty or type(p.default) is int)
    }
    assert integers - {"rope_max_wavelength"} == set(SIZE_ARGUMENTS)


@pytest.mark.parametrize("value", [0, -2])
@pytest.mark.parametrize("name", SIZES)
def test_non_positive_sizes(name, value):
    kwargs = backbone_kwargs(None, **{name: value})
    raises(ValueError, f"{name}={value}", "positive", call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize("value", [2.0, "64", True])
@pytest.mark.parametrize("name", ["hidden_dim", "num_layers"])
def test_non_integer_sizes(name, value):
    kwargs = backbone_kwargs(None, **{name: value})
    raises(TypeError, f"{name}={value!r}", call=lambda: Phi3Backbone(**kwargs))


@pytest.mark.parametrize(
    "name, value", [("dropout", 1.0), ("dropout", -0.1), ("layer_norm_epsilon", 0.0), ("rope_max_wavelength", -1)]
)
def test_bad_numbers(name, value):
    kwargs = backbone_kwargs(None, **{name: value})
    raises(ValueError, f"{name}={value!r}", call=lambda: Phi3Backbone(**kwargs))


# --- call ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return random_backbone(seed=21, rope="su")


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1])
def test_token_ids_out_of_range(model, bad):
    ids = np.array([[1, 2, bad, 3]])
    raises(
        ValueError,
        "token_ids",
        f"[0, {VOCAB})",
        f"[{bad}]",
        call=lambda: model({"token_ids": ids, "padding_mask": np.ones_like(ids)}),
    )


def test_float_token_ids(model):
    ids = np.array([[1.0, 2.5]])
    # Keras hands `call` the ids as float32.
    raises(TypeError, "token_ids", "integer", "dtype float", call=lambda: model({"token_ids": ids}))


# --- preset files --------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    save_hf_checkpoint(model, directory)
    Phi3Backbone.from_preset(str(directory))  # the unmodified files load
    return directory


def rewrite(directory, change):
    """Rewrite `model.safetensors` with `change(dict of tensors)` applied."""
    path = directory / "model.safetensors"
    source = SafetensorsFile(path)
    tensors = {name: np.array(source.tensor(name)) for name in source.keys()}
    del source
    change(tensors)
    write_safetensors(path, tensors, {"format": "pt"})


def copy_of(directory, tmp_path):
    import shutil

    return shutil.copytree(directory, tmp_path / "copy")


@pytest.mark.parametrize(
    "name",
    ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"],
)
def test_missing_tensor(hf_dir, tmp_path, name):
    directory = copy_of(hf_dir, tmp_path)
    rewrite(directory, lambda tensors: tensors.pop(name))
    raises(ValueError, repr(name), str(directory), call=lambda: Phi3Backbone.from_preset(str(directory)))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.norm.weight", (HIDDEN + 1,)),
        ("model.layers.0.self_attn.qkv_proj.weight", (HIDDEN * 3, HIDDEN)),
        ("model.layers.0.mlp.gate_up_proj.weight", (256, HIDDEN + 1)),
        ("model.layers.1.self_attn.o_proj.weight", (HIDDEN, HIDDEN // 2)),
        ("model.layers.1.mlp.down_proj.weight", (HIDDEN, 100)),
        ("lm_head.weight", (VOCAB - 1, HIDDEN)),
    ],
)
def test_wrong_shaped_tensor(hf_dir, tmp_path, name, shape):
    directory = copy_of(hf_dir, tmp_path)
    expected = {}

    def change(tensors):
        expected["shape"] = tensors[name].shape
        tensors[name] = np.zeros(shape, np.float32)

    rewrite(directory, change)
    message = raises(ValueError, repr(name), str(shape), call=lambda: Phi3Backbone.from_preset(str(directory)))
    # ... and the shape it should have had, both in the checkpoint's layout.
    assert str(expected["shape"]) in message, message


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_truncated_safetensors(hf_dir, tmp_path, keep):
    directory = copy_of(hf_dir, tmp_path)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    message = raises(ValueError, str(path), call=lambda: Phi3Backbone.from_preset(str(directory)))
    assert re.search("truncated|not a safetensors file|corrupt", message)


def test_missing_shard_listed_in_index(hf_dir, tmp_path, model):
    directory = tmp_path / "sharded"
    save_hf_checkpoint(model, directory, max_shard_bytes=40_000)
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    raises(OSError, shards[-1].name, call=lambda: Phi3Backbone.from_preset(str(directory)))


def test_unknown_preset_name():
    message = raises(ValueError, "preset='phi3_mini_4k'", call=lambda: Phi3Backbone.from_preset("phi3_mini_4k"))
    for name in Phi3Backbone.presets:
        assert name in message


def test_unknown_override(hf_dir):
    raises(
        ValueError,
        "num_heads",
        "num_query_heads",
        call=lambda: Phi3Backbone.from_preset(str(hf_dir), num_heads=8),
    )


def test_override_is_checked_like_the_constructor(hf_dir):
    raises(
        ValueError, "num_key_value_heads=3", call=lambda: Phi3Backbone.from_preset(str(hf_dir), num_key_value_heads=3)
    )


@pytest.fixture(scope="module")
def keras_hub_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("keras_hub")
    save_preset(model, directory)
    return directory


@pytest.mark.parametrize("class_name", ["Phi3CausalLM", "Lambda", "GemmaBackbone"])
def test_keras_hub_config_with_unknown_class(keras_hub_dir, tmp_path, class_name):
    directory = copy_of(keras_hub_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["class_name"] = class_name
    config["registered_name"] = f"keras_hub>{class_name}"
    (directory / "config.json").write_text(json.dumps(config))
    raises(ValueError, repr(class_name), "Phi3Backbone", call=lambda: Phi3Backbone.from_preset(str(directory)))


def test_keras_hub_weights_missing_a_tensor(keras_hub_dir, tmp_path):
    directory = copy_of(keras_hub_dir, tmp_path)
    with h5py.File(directory / "model.weights.h5", "r+") as handle:
        del handle["layers/phi3_decoder_1/attention/value_dense/vars/0"]
    raises(
        ValueError,
        "phi3_decoder_1/attention/value_dense/vars/0",
        call=lambda: Phi3Backbone.from_preset(str(directory)),
    )


def test_keras_hub_weights_wrong_shape(keras_hub_dir, tmp_path):
    directory = copy_of(keras_hub_dir, tmp_path)
    name = "layers/phi3_layer_norm/vars/0"
    with h5py.File(directory / "model.weights.h5", "r+") as handle:
        del handle[name]
        handle.create_dataset(name, data=np.ones(HIDDEN - 2, np.float32))
    raises(ValueError, name, f"({HIDDEN - 2},)", f"({HIDDEN},)", call=lambda: Phi3Backbone.from_preset(str(directory)))


def test_not_a_preset_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hello": "world"}))
    raises(ValueError, str(tmp_path), "config.json", call=lambda: Phi3Backbone.from_preset(str(tmp_path)))


def test_preset_of_wrong_type():
    raises(TypeError, "preset", "int", call=lambda: Phi3Backbone.from_preset(3))
