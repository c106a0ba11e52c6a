"""Loading a preset never unpickles, imports or runs anything a file names.

phi3lab reads keras-hub presets (`config.json` + `model.weights.h5`) and
Hugging Face checkpoints (`config.json` + `*.safetensors`) as data: a config
naming another class, module or dtype object is refused; weights files are
read with h5py and a bounds-checked safetensors reader; shards must lie inside
the preset directory (symlinks resolved); damaged files fail with a
`ValueError` naming the file. `pickle`, `torch.load` and Keras' own
deserialization are never called (they raise here while valid presets of
both layouts load).

The model: 64 tokens, 2 layers, hidden 16 (the same shapes as test_fuzz.py,
so the two files share compilations).
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phi3lab  # noqa: F401  (selects the JAX backend before keras loads)
from conftest import sizes
from phi3lab import Phi3Backbone
from phi3lab.presets import save_hf_checkpoint, save_preset

pytestmark = pytest.mark.timeout(120)

KWARGS = sizes(64, 2, 16, 32, 4, 2, 32)  # 64 tokens, 2 layers, width 16, MLP 32, 4 / 2 heads, 32 positions
SHARD_BYTES = 6000  # several shards for this model (its tensors are 1-4 KiB)


def flat_params(model) -> dict:
    out = {}
    for group, values in model.params().items():
        for name, value in values.items():
            for leaf, array in value.items() if isinstance(value, dict) else [(None, value)]:
                out[f"{group}/{name}" + ("" if leaf is None else f"/{leaf}")] = np.asarray(array)
    return out


@pytest.fixture(scope="module")
def model():
    model = Phi3Backbone(**KWARGS)
    rng = np.random.default_rng(0)
    for variable in model.weights:  # every weight distinct, norms included
        variable.assign(rng.standard_normal(tuple(variable.shape)).astype("float32"))
    return model


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """Pristine presets: keras-hub (float32, and bfloat16), HF single file, HF sharded (with index)."""
    root = tmp_path_factory.mktemp("presets")
    keras_hub = save_preset(model, root / "keras_hub")
    keras_hub_bfloat16 = save_preset(Phi3Backbone.from_preset(str(keras_hub), dtype="bfloat16"), root / "bfloat16")
    single = save_hf_checkpoint(model, root / "hf_single")
    sharded = save_hf_checkpoint(model, root / "hf_sharded", max_shard_bytes=SHARD_BYTES)
    assert (single / "model.safetensors").is_file()
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    return {"keras_hub": keras_hub, "keras_hub_bfloat16": keras_hub_bfloat16, "single": single, "sharded": sharded}


@pytest.fixture
def copy(saved, tmp_path):
    """`copy(kind)`: a fresh copy of a pristine preset to damage."""
    count = [0]

    def make(kind: str) -> Path:
        count[0] += 1
        return Path(shutil.copytree(saved[kind], tmp_path / f"{kind}_{count[0]}"))

    return make


def refused(directory, *fragments, error=ValueError):
    with pytest.raises(error) as info:
        Phi3Backbone.from_preset(str(directory))
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in: {message}"
    return message


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# === Nothing is unpickled, imported or deserialized ==========================


class _Boom:
    """Unpickling this runs `_boom` (the classic pickle payload)."""

    def __reduce__(self):
        return (_boom, ("unpickled!",))


RAN: list = []


def _boom(text):
    RAN.append(text)
    return text


@pytest.fixture
def forbid_code_loading(monkeypatch):
    """pickle, torch.load and Keras' object deserialization all raise."""

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"{name} was called while loading a preset")

        return fail

    try:  # imported before pickle is patched (torch's imports subclass pickle.Unpickler)
        import torch
    except ImportError:
        torch = None
    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", forbidden("pickle.Unpickler"))
    if torch is not None:
        monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    import keras
    from keras.src.saving import serialization_lib

    monkeypatch.setattr(keras.saving, "load_model", forbidden("keras.saving.load_model"))
    monkeypatch.setattr(keras.models, "load_model", forbidden("keras.models.load_model"))
    monkeypatch.setattr(keras.saving, "deserialize_keras_object", forbidden("keras.saving.deserialize_keras_object"))
    monkeypatch.setattr(keras.dtype_policies, "deserialize", forbidden("keras.dtype_policies.deserialize"))
    # Keras builds the model's own initializers through its deserializer
    # ({"class_name": "ones"}, module keras.initializers); nothing else, and
    # nothing a preset file describes (the backbone, a dtype policy, a
    # registered or non-Keras class), may get there.
    real = serialization_lib.deserialize_keras_object

    def deserialize(config, *args, **kwargs):
        if isinstance(config, dict) and (
            config.get("registered_name") is not None
            or not str(config.get("module") or "keras").startswith("keras")
            or config.get("class_name") in ("Phi3Backbone", "DTypePolicy", "DTypePolicyMap")
        ):
            raise AssertionError(f"Keras was asked to deserialize {config!r} while loading a preset")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(serialization_lib, "deserialize_keras_object", deserialize)
    return torch


@pytest.mark.parametrize("kind", ["keras_hub", "single", "sharded"])
def test_valid_presets_load_without_pickle_or_deserialization(kind, saved, model, forbid_code_loading):
    loaded = Phi3Backbone.from_preset(str(saved[kind]))
    expected, got = flat_params(model), flat_params(loaded)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(loaded({"token_ids": ids})), np.asarray(model({"token_ids": ids})))


def test_a_pickle_named_model_weights_h5_is_not_unpickled(copy, forbid_code_loading):
    directory = copy("keras_hub")
    payload = pickle.dumps(_Boom())  # dumps is allowed: only loading is forbidden
    (directory / "model.weights.h5").write_bytes(payload)
    refused(directory, "model.weights.h5", "not a readable weights file")
    assert RAN == []


def test_a_keras_archive_named_model_weights_h5_gives_a_clear_error(copy, forbid_code_loading):
    directory = copy("keras_hub")
    archive = directory / "model.weights.h5"
    archive.unlink()
    with zipfile.ZipFile(archive, "w") as handle:  # what a `.keras` file is
        handle.writestr("config.json", json.dumps({"class_name": "Lambda", "config": {"function": "os.system"}}))
        handle.writestr("model.weights.h5", b"")
        handle.writestr("metadata.json", "{}")
    refused(directory, "model.weights.h5")


@pytest.mark.parametrize("keep", [0.0, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_h5_gives_a_clear_error(copy, keep):
    directory = copy("keras_hub")
    path = directory / "model.weights.h5"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    refused(directory, "model.weights.h5")


def test_h5_without_the_keras_hub_layout(copy):
    directory = copy("keras_hub")
    with h5py.File(directory / "model.weights.h5", "w") as handle:
        handle.create_dataset("layers", data=np.zeros(3))
    refused(directory, "model.weights.h5", "'layers'")


# === model.weights.h5 keeps its tensors in itself =============================
# (h5 links, external and virtual storage, decompression bombs: what Keras'
# own loader refuses, phi3lab refuses, naming the file and the tensor)

FINAL_NORM = "layers/phi3_layer_norm/vars/0"  # [16], as is every layer's attention norm
OTHER_NORM = "/layers/phi3_decoder/pre_attention_layernorm/vars/0"


def replace_tensor(directory: Path, name: str, make) -> None:
    """Delete the tensor `name` of the preset's h5 and call `make(handle, name, value)`."""
    with h5py.File(directory / "model.weights.h5", "r+") as handle:
        value = handle[name][()]
        del handle[name]
        make(handle, name, value)


def test_a_tensor_whose_bytes_live_in_another_file_is_refused(copy, tmp_path):
    """External storage: the right bytes, but outside the preset (it could
    name any file the process can read)."""
    directory, elsewhere = copy("keras_hub"), tmp_path / "elsewhere.bin"

    def external(handle, name, value):
        elsewhere.write_bytes(value.tobytes())
        handle.create_dataset(name, shape=value.shape, dtype=value.dtype, external=[(str(elsewhere), 0, value.nbytes)])

    replace_tensor(directory, FINAL_NORM, external)
    refused(directory, "model.weights.h5", "phi3_layer_norm/vars/0", "other files", "elsewhere.bin")


def test_a_virtual_tensor_is_refused(copy, tmp_path):
    directory, source = copy("keras_hub"), tmp_path / "source.h5"

    def virtual(handle, name, value):
        with h5py.File(source, "w") as other:
            other["x"] = value
        layout = h5py.VirtualLayout(shape=value.shape, dtype=value.dtype)
        layout[...] = h5py.VirtualSource(str(source), "x", shape=value.shape)
        handle.create_virtual_dataset(name, layout)

    replace_tensor(directory, FINAL_NORM, virtual)
    refused(directory, "model.weights.h5", "phi3_layer_norm/vars/0", "virtual")


@pytest.mark.parametrize("kind", ["soft", "external"])
def test_a_tensor_name_that_is_a_link_is_refused(copy, tmp_path, kind):
    """A soft link to another tensor of the same shape, or a link into
    another file holding the right values: each would load without error."""
    directory, other = copy("keras_hub"), tmp_path / "other.h5"

    def link(handle, name, value):
        if kind == "soft":
            handle[name] = h5py.SoftLink(OTHER_NORM)
        else:
            with h5py.File(other, "w") as target:
                target["x"] = value
            handle[name] = h5py.ExternalLink(str(other), "x")

    replace_tensor(directory, FINAL_NORM, link)
    refused(directory, "model.weights.h5", "phi3_layer_norm/vars/0", "soft link" if kind == "soft" else "other.h5")


def test_a_tensor_declaring_far_more_than_it_stores_is_refused_before_reading(copy):
    """A decompression bomb: 64 MiB of zeros in a few KiB, refused from the
    file's metadata (before the shape check, which would read nothing either)."""
    directory = copy("keras_hub")

    def bomb(handle, name, value):
        handle.create_dataset(name, shape=(4096, 4096), dtype="float32", compression="gzip", fillvalue=0.0)
        handle[name][0, :16] = value

    replace_tensor(directory, FINAL_NORM, bomb)
    refused(directory, "model.weights.h5", "phi3_layer_norm/vars/0", "declares 67,108,864 bytes", "bomb")


def test_compressed_tensors_still_load(copy, model):
    """Compression itself is allowed: random weights stored gzip-compressed
    load to the same values."""
    directory = copy("keras_hub")
    with h5py.File(directory / "model.weights.h5", "r+") as handle:
        names = []
        handle["layers"].visititems(lambda name, item: names.append(name) if isinstance(item, h5py.Dataset) else None)
        for name in names:
            value = handle["layers"][name][()]
            del handle["layers"][name]
            handle["layers"].create_dataset(name, data=value, compression="gzip")
    loaded = flat_params(Phi3Backbone.from_preset(str(directory)))
    for name, value in flat_params(model).items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)


# === keras-hub config.json ===================================================


def rewrite_config(directory: Path, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


def _set_dtype(value):
    return lambda config: config["config"].__setitem__("dtype", value)


EVIL_MODULE = "phi3lab_evil_module_that_must_never_be_imported"


@pytest.mark.parametrize(
    "change, fragment",
    [
        (_set("class_name", "Lambda"), "'Lambda'"),
        (_set("class_name", "Functional"), "'Functional'"),
        (_set("class_name", "Phi3CausalLM"), "'Phi3CausalLM'"),
        (_set("module", EVIL_MODULE), EVIL_MODULE),
        (_set("module", "os"), "'os'"),
        (_set("module", "builtins"), "'builtins'"),
        (_set("module", ["keras_hub"]), "module"),
        (_set("registered_name", "evil>Phi3Backbone"), "evil>Phi3Backbone"),
        (_set("config", ["not", "a", "dict"]), "'config'"),
        (
            _set_dtype({"module": "keras.layers", "class_name": "Lambda", "config": {}, "registered_name": None}),
            "'Lambda'",
        ),
        (
            _set_dtype(
                {
                    "module": EVIL_MODULE,
                    "class_name": "DTypePolicy",
                    "config": {"name": "float32"},
                    "registered_name": None,
                }
            ),
            EVIL_MODULE,
        ),
        (
            _set_dtype(
                {
                    "module": "keras",
                    "class_name": "DTypePolicy",
                    "config": {"name": "float32"},
                    "registered_name": "evil>Policy",
                }
            ),
            "evil>Policy",
        ),
        # a policy whose "name" is itself an object to deserialize
        (
            _set_dtype(
                {
                    "module": "keras",
                    "class_name": "DTypePolicy",
                    "config": {"name": {"module": EVIL_MODULE, "class_name": "Payload", "config": {}}},
                    "registered_name": None,
                }
            ),
            "dtype",
        ),
        (
            _set_dtype({"config": {"name": {"module": "keras.layers", "class_name": "Dense", "config": {"units": 1}}}}),
            "dtype",
        ),
        (_set_dtype(["float32"]), "dtype"),
        (_set_dtype(7), "dtype"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_keras_hub_config_naming_other_code_is_refused(copy, change, fragment, forbid_code_loading):
    directory = copy("keras_hub")
    rewrite_config(directory, change)
    refused(directory, fragment, "config.json")
    assert EVIL_MODULE not in sys.modules


def test_keras_hub_dtype_strings_are_still_read(copy, forbid_code_loading):
    directory = copy("keras_hub")
    rewrite_config(directory, _set_dtype("bfloat16"))
    assert Phi3Backbone.from_preset(str(directory)).dtype_policy.name == "bfloat16"
    rewrite_config(
        directory,
        _set_dtype(
            {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}
        ),
    )
    assert Phi3Backbone.from_preset(str(directory)).dtype_policy.name == "float32"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "3", '"Phi3Backbone"', "\xff\xfe", "[" * 100_000])
def test_config_json_that_is_not_an_object(copy, text):
    directory = copy("keras_hub")
    (directory / "config.json").write_text(text, encoding="latin-1")
    refused(directory, "config.json")


# === Hugging Face config.json ================================================


@pytest.mark.parametrize("model_type", ["llama", "phi", "Phi3", "", None, 3, ["phi3"]])
def test_hf_model_type_other_than_phi3_is_refused(copy, model_type):
    directory = copy("single")
    rewrite_config(directory, _set("model_type", model_type))
    refused(directory, "model_type", "config.json")


def test_hf_config_lacking_sizes_is_refused(copy):
    directory = copy("single")
    rewrite_config(directory, lambda c: c.pop("num_attention_heads"))
    refused(directory, "num_attention_heads", "config.json")


# === Shards must stay inside the preset directory ============================


def rewrite_index(directory: Path, change) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def _first_shard_outside(directory: Path, outside: Path) -> str:
    """Copy the first shard to `outside` (a valid file, so only the location
    can be the problem) and return the shard's name."""
    first = shard_files(directory)[0]
    shutil.copy(first, outside)
    return first.name


@pytest.mark.parametrize("how", ["parent", "absolute", "deep_parent", "sibling_dir"])
def test_weight_map_pointing_outside_is_refused(copy, tmp_path, how):
    directory = copy("sharded")
    outside = tmp_path / "outside.safetensors"
    name = _first_shard_outside(directory, outside)
    target = {
        "parent": "../outside.safetensors",
        "absolute": str(outside),
        "deep_parent": "sub/../../outside.safetensors",
        "sibling_dir": f"../{directory.name}_evil/x.safetensors",
    }[how]
    if how == "sibling_dir":
        (tmp_path / f"{directory.name}_evil").mkdir()
        shutil.copy(outside, tmp_path / f"{directory.name}_evil" / "x.safetensors")
    rewrite_index(directory, lambda m: m.update({k: target for k, v in m.items() if v == name}))
    refused(directory, "outside the preset directory", repr(target))


def test_symlinked_shard_escaping_the_directory_is_refused(copy, tmp_path):
    directory = copy("sharded")
    outside = tmp_path / "elsewhere" / "shard.safetensors"
    outside.parent.mkdir()
    first = shard_files(directory)[0]
    shutil.move(first, outside)
    first.symlink_to(outside)
    refused(directory, "outside the preset directory", first.name)


def test_symlinked_single_file_escaping_the_directory_is_refused(copy, tmp_path):
    directory = copy("single")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(directory / "model.safetensors", outside)
    (directory / "model.safetensors").symlink_to(outside)
    refused(directory, "model.safetensors", "outside the preset directory")


def test_symlinks_inside_the_directory_and_hub_caches_are_followed(copy, model, tmp_path):
    # a shard linked to a file in a subfolder of the preset
    directory = copy("sharded")
    first = shard_files(directory)[0]
    (directory / "blobs").mkdir()
    shutil.move(first, directory / "blobs" / "abc123")
    first.symlink_to(Path("blobs") / "abc123")
    np.testing.assert_array_equal(
        flat_params(Phi3Backbone.from_preset(str(directory)))["final_norm/scale"],
        flat_params(model)["final_norm/scale"],
    )
    # huggingface_hub's cache: snapshots/<revision>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--someone--tiny-phi3"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in copy("sharded").iterdir():
        blob = repo / "blobs" / f"sha-{path.name}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    loaded = Phi3Backbone.from_preset(str(snapshot))
    np.testing.assert_array_equal(
        flat_params(loaded)["decoder/mlp/down_kernel"], flat_params(model)["decoder/mlp/down_kernel"]
    )
    # ... but not to blobs of another folder
    escape = tmp_path / "other" / "blobs"
    escape.mkdir(parents=True)
    link = next(p for p in snapshot.iterdir() if p.suffix == ".safetensors")
    shutil.copy(link.resolve(), escape / "x")
    link.unlink()
    link.symlink_to(escape / "x")
    refused(snapshot, "outside the preset directory")


@pytest.mark.parametrize(
    "index", ["{broken", "[]", '{"weight_map": [1, 2]}', '{"weight_map": {"model.norm.weight": 5}}', '{"metadata": {}}']
)
def test_malformed_index_is_refused(copy, index):
    directory = copy("sharded")
    (directory / "model.safetensors.index.json").write_text(index)
    refused(directory, "model.safetensors.index.json")


# === Damaged safetensors files ===============================================


def read_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def write_with_header(path: Path, header, body: bytes, size: int | None = None) -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if size is None else size) + encoded + body)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _edit_entry(**changes):
    def edit(header):
        name = _first_tensor(header)
        header[name] = {**header[name], **changes}
        return header

    return edit


def _drop_key(key):
    def edit(header):
        name = _first_tensor(header)
        header[name] = {k: v for k, v in header[name].items() if k != key}
        return header

    return edit


HEADER_DAMAGE = {
    "offsets_past_the_end": _edit_entry(data_offsets=[0, 10**9]),
    "offsets_reversed": _edit_entry(data_offsets=[64, 0]),
    "offsets_negative": _edit_entry(data_offsets=[-8, 8]),
    "offsets_not_ints": _edit_entry(data_offsets=["0", "64"]),
    "offsets_floats": _edit_entry(data_offsets=[0.0, 64.0]),
    "offsets_three": _edit_entry(data_offsets=[0, 8, 16]),
    "offsets_missing": _drop_key("data_offsets"),
    "offsets_shape_mismatch": _edit_entry(shape=[1]),
    "shape_negative": _edit_entry(shape=[-1, 16]),
    "shape_not_a_list": _edit_entry(shape="64x16"),
    "shape_huge": _edit_entry(shape=[2**62, 2**62]),
    "dtype_unknown": _edit_entry(dtype="F8_E4M3"),
    "dtype_lowercase": _edit_entry(dtype="f32"),
    "dtype_object": _edit_entry(dtype={"class_name": "Lambda"}),
    "dtype_pickle": _edit_entry(dtype="O"),
    "entry_not_an_object": lambda h: {**h, _first_tensor(h): "tensor"},
    "header_a_list": lambda h: [h],
    "metadata_a_list": lambda h: {**h, "__metadata__": ["x"]},
}


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_corrupt_safetensors_header_names_the_file(copy, layout, damage):
    directory = copy(layout)
    path = shard_files(directory)[-1]
    header, body = read_header(path)
    write_with_header(path, HEADER_DAMAGE[damage](header), body)
    refused(directory, path.name)


@pytest.mark.parametrize(
    "damage",
    [
        "bad_json",
        "not_utf8",
        "deep_nesting",
        "length_past_the_end",
        "length_zero",
        "length_short",
        "empty",
        "seven_bytes",
    ],
)
def test_broken_safetensors_framing_names_the_file(copy, damage):
    directory = copy("single")
    path = directory / "model.safetensors"
    header, body = read_header(path)
    encoded = json.dumps(header).encode()
    if damage == "bad_json":
        write_with_header(path, b"{" + encoded[1:-1], body)
    elif damage == "not_utf8":
        write_with_header(path, b"\xff\xfe" + encoded, body)
    elif damage == "deep_nesting":
        write_with_header(path, b"[" * 200_000 + b"]" * 200_000, body)
    elif damage == "length_past_the_end":
        write_with_header(path, encoded, body, size=2**63 + 5)
    elif damage == "length_zero":
        write_with_header(path, encoded, body, size=0)
    elif damage == "length_short":
        write_with_header(path, encoded, body, size=len(encoded) // 2)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\x00" * 7)
    refused(directory, "model.safetensors")


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(keep=st.floats(0.0, 1.0, exclude_max=True), layout=st.sampled_from(["single", "sharded"]))
def test_truncated_safetensors_names_the_file(saved, tmp_path_factory, keep, layout):
    """Cut anywhere (inside the length, the header or the data), every shard
    is refused before a byte of it is used."""
    directory = Path(shutil.copytree(saved[layout], tmp_path_factory.mktemp("cut") / layout))
    path = shard_files(directory)[len(shard_files(directory)) // 2]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    refused(directory, path.name)


def test_missing_shard_names_the_file(copy):
    directory = copy("sharded")
    victim = shard_files(directory)[1]
    victim.unlink()
    refused(directory, victim.name, error=(FileNotFoundError, ValueError))


# === config.json against the tensors, and memory, before allocating ==========

# (layout, config key, edited value, what the message must name: the tensor,
# its shape in the files, the shape the edited config implies)
SIZE_EDITS = [
    ("single", "hidden_size", 10_000_000, "'model.embed_tokens.weight'", "(64, 16)", "(64, 10000000)"),
    ("sharded", "vocab_size", 10**12, "'model.embed_tokens.weight'", "(64, 16)", f"({10**12}, 16)"),
    ("single", "intermediate_size", 10**9, "'model.layers.0.mlp.down_proj.weight'", "(16, 32)", f"(16, {10**9})"),
    ("single", "num_key_value_heads", 1, "'model.layers.0.self_attn.qkv_proj.weight'", "(32, 16)", "(24, 16)"),
    ("single", "num_hidden_layers", 10_000_000, "'model.layers.1.", "2 decoder layers", "10000000"),
    ("sharded", "num_hidden_layers", 1, "'model.layers.1.", "2 decoder layers", "=1 "),
    ("keras_hub", "hidden_dim", 10_000_000, "'reversible_embedding/vars/0'", "(64, 16)", "(64, 10000000)"),
    ("keras_hub", "intermediate_dim", 10**9, "feedforward_output_dense", "(32, 16)", f"({10**9}, 16)"),
    ("keras_hub", "num_key_value_heads", 1, "'phi3_decoder/attention/key_dense/vars/0'", "(16, 2, 4)", "(16, 1, 4)"),
    ("keras_hub", "num_layers", 10_000_000, "'phi3_decoder_1/", "2 decoder layers", "10000000"),
]


@pytest.mark.parametrize("layout, key, value, tensor, found, implied", SIZE_EDITS, ids=lambda v: str(v)[:20])
def test_config_disagreeing_with_tensor_shapes_is_refused_before_allocating(
    copy, layout, key, value, tensor, found, implied
):
    """An edited size in config.json is refused from the files' headers,
    naming the key, the tensor and both shapes; the model is never built
    with real variables (building one would fail: RESOURCE_EXHAUSTED)."""
    directory = copy(layout)
    rewrite_config(
        directory, (lambda c: c["config"].__setitem__(key, value)) if layout == "keras_hub" else _set(key, value)
    )
    refused(directory, "config.json", f"{key}={value}", tensor, found, implied)
    # Nothing of the refused model waits in keras to be allocated: leaving a
    # stateless scope (as every symbolic keras call does) initializes the
    # variables pending in keras' global state, and there are none.
    with keras.StatelessScope():
        pass


def test_from_preset_override_disagreeing_with_tensors_is_named_as_an_argument(saved):
    with pytest.raises(ValueError) as info:
        Phi3Backbone.from_preset(str(saved["single"]), hidden_dim=32, num_query_heads=4)
    assert "hidden_dim=32 (a from_preset argument)" in str(info.value)
    assert "'model.embed_tokens.weight' has shape (64, 16)" in str(info.value)


@pytest.mark.parametrize("layout", ["keras_hub", "keras_hub_bfloat16", "single"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_larger_than_the_memory_available_are_refused_before_allocating(saved, monkeypatch, layout, dtype):
    """The refusal compares the weight bytes the config declares with the
    memory `available_bytes` reports: one byte less than the loaded model's
    weights is refused, naming them, and exactly enough loads (whatever
    dtype the files hold)."""
    from phi3lab.tracing import WeightsTooLarge, memory

    loaded = Phi3Backbone.from_preset(str(saved[layout]), dtype=dtype)
    weights = sum(w.value.nbytes for w in loaded.weights)
    monkeypatch.setattr(memory, "available_bytes", lambda: weights - 1)
    with pytest.raises(WeightsTooLarge, match=rf"{loaded.count_params():,} parameters in {dtype}\); only"):
        Phi3Backbone.from_preset(str(saved[layout]), dtype=dtype)
    monkeypatch.setattr(memory, "available_bytes", lambda: weights)
    Phi3Backbone.from_preset(str(saved[layout]), dtype=dtype)


@pytest.mark.parametrize("layout", ["keras_hub", "single"])
def test_an_int8_load_is_checked_against_its_int8_bytes(saved, monkeypatch, layout):
    """`quantization="int8"` quantizes while loading, so the refusal counts
    the int8 model's bytes: memory for them (but not for the bfloat16
    weights) loads, one byte less is refused naming the int8 kernels."""
    from phi3lab.tracing import WeightsTooLarge, memory

    directory = str(saved[layout])
    loaded = Phi3Backbone.from_preset(directory, dtype="bfloat16", quantization="int8")
    weights = sum(w.value.nbytes for w in loaded.weights)
    monkeypatch.setattr(memory, "available_bytes", lambda: weights)
    Phi3Backbone.from_preset(directory, dtype="bfloat16", quantization="int8")
    with pytest.raises(WeightsTooLarge, match="parameters in bfloat16\\); only"):
        Phi3Backbone.from_preset(directory, dtype="bfloat16")
    monkeypatch.setattr(memory, "available_bytes", lambda: weights - 1)
    named = rf"{loaded.count_params():,} parameters in bfloat16, the projection kernels in int8\); only"
    with pytest.raises(WeightsTooLarge, match=named):
        Phi3Backbone.from_preset(directory, dtype="bfloat16", quantization="int8")
