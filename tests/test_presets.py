"""Preset files: what phi3lab writes loads in the oracles, what the oracles
and the hubs write loads in phi3lab, and the hub handles work offline from
caches laid out as kagglehub and huggingface_hub lay them out."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import (
    LENGTHS,
    MAX_POSITIONS,
    PRETRAINING,
    assert_matches_transformers,
    backbone_kwargs,
    forward,
    hf_config,
    hf_forward,
    hf_model,
    keras_hub_forward,
    max_diff,
    put_in_hf_cache,
    random_backbone,
    randomize_keras,
    require,
    rope_factors,
    token_batch,
)
from phi3lab import Phi3Backbone
from phi3lab.presets import save_hf_checkpoint, save_preset

TOLERANCE = 1e-4


def test_saved_preset_loads_in_keras_hub(tmp_path):
    keras_hub = require("keras_hub")
    model = random_backbone(seed=11, rope="su")
    save_preset(model, tmp_path)
    reference = keras_hub.models.Phi3Backbone.from_preset(str(tmp_path))
    assert reference.rope_scaling_long_factor == list(model.rope_scaling_long_factor)
    for length in (LENGTHS["below"], LENGTHS["above"]):
        ids, mask = token_batch(length, seed=length)
        assert max_diff(forward(model, ids, mask)[0], keras_hub_forward(reference, ids, mask), mask) < 1e-5


def bits(model) -> list:
    """Every weight's path, dtype and raw bytes, in the model's order."""
    return [(v.path, str(v.dtype), np.asarray(v.value).tobytes()) for v in model.weights]


def assert_widened(narrow, wide) -> None:
    """`wide`'s float32 weights are exactly `narrow`'s bfloat16 ones, widened."""
    assert {str(v.dtype) for v in narrow.weights} == {"bfloat16"}
    for ours, theirs in zip(narrow.weights, wide.weights):
        assert str(theirs.dtype) == "float32"
        np.testing.assert_array_equal(np.asarray(ours.value).astype("float32"), np.asarray(theirs.value))


def test_bfloat16_preset_round_trips_through_phi3lab_and_keras_hub(tmp_path):
    """HDF5 has no bfloat16: phi3lab marks its tensors as Keras does, so a
    bfloat16 keras-hub preset loads back bit for bit in phi3lab and in
    keras-hub, whose bfloat16 save phi3lab reads back bit for bit too. The
    float32 model keras-hub loads by default (bfloat16 widened exactly)
    computes what phi3lab computes in float32 from the same file."""
    keras_hub = require("keras_hub")
    model = random_backbone(seed=17, rope="su", dtype="bfloat16")
    save_preset(model, tmp_path / "phi3lab")
    reloaded = Phi3Backbone.from_preset(str(tmp_path / "phi3lab"))
    assert reloaded.dtype_policy.name == "bfloat16"
    assert bits(reloaded) == bits(model)
    theirs = keras_hub.models.Phi3Backbone.from_preset(str(tmp_path / "phi3lab"), dtype="bfloat16")
    theirs.save_to_preset(str(tmp_path / "keras_hub"))
    back = Phi3Backbone.from_preset(str(tmp_path / "keras_hub"))
    assert back.dtype_policy.name == "bfloat16"
    assert bits(back) == bits(model)

    widened = Phi3Backbone.from_preset(str(tmp_path / "phi3lab"), dtype="float32")
    assert_widened(model, widened)
    reference = keras_hub.models.Phi3Backbone.from_preset(str(tmp_path / "phi3lab"))
    ids, mask = token_batch(LENGTHS["above"], seed=17)
    assert max_diff(forward(widened, ids, mask)[0], keras_hub_forward(reference, ids, mask), mask) < 1e-5


def test_bfloat16_preset_saved_by_keras_hub_loads(tmp_path):
    """keras-hub's own bfloat16 save loads in bfloat16, and in float32 as
    the exact widening of it, which computes what keras-hub's float32
    reading of the file computes."""
    keras_hub = require("keras_hub")
    original = keras_hub.models.Phi3Backbone(**backbone_kwargs("su", 2), dtype="bfloat16")
    randomize_keras(original, seed=18)
    original.save_to_preset(str(tmp_path))
    model = Phi3Backbone.from_preset(str(tmp_path))
    assert model.dtype_policy.name == "bfloat16"
    widened = Phi3Backbone.from_preset(str(tmp_path), dtype="float32")
    assert_widened(model, widened)
    reference = keras_hub.models.Phi3Backbone.from_preset(str(tmp_path))
    assert {str(v.dtype) for v in reference.weights} == {"float32"}
    ids, mask = token_batch(LENGTHS["above"], seed=18)
    assert max_diff(forward(widened, ids, mask)[0], keras_hub_forward(reference, ids, mask), mask) < 1e-5


def test_unmarked_opaque_tensor_is_refused_before_allocating(tmp_path, monkeypatch):
    """A dataset of opaque 2-byte values without Keras' bfloat16 mark (what
    phi3lab wrote before it wrote the mark) is refused from the file's
    metadata, naming the tensor and the mark, before the model is built."""
    from phi3lab.presets import keras_hub_format

    save_preset(random_backbone(seed=19, rope=None, dtype="bfloat16"), tmp_path)
    tensor = "layers/phi3_decoder_1/attention/key_dense/vars/0"
    with h5py.File(tmp_path / "model.weights.h5", "a") as handle:
        del handle[tensor].attrs["dtype"]
    monkeypatch.setattr(keras_hub_format, "load_weights", lambda *args, **kwargs: pytest.fail("weights were read"))
    with pytest.raises(ValueError) as info:
        Phi3Backbone.from_preset(str(tmp_path))
    for fragment in ("model.weights.h5", repr(tensor), "opaque 2-byte values", "dtype='bfloat16'"):
        assert fragment in str(info.value)


def test_sharded_transformers_checkpoint(tmp_path):
    require("transformers")
    reference = hf_model(hf_config("longrope"), seed=12)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model = Phi3Backbone.from_preset(str(tmp_path))
    assert_matches_transformers(model, reference, [LENGTHS["above"]], TOLERANCE)


@pytest.mark.parametrize("max_shard_bytes", [2**30, 40_000], ids=["single", "sharded"])
def test_saved_hf_checkpoint_loads_in_transformers(tmp_path, max_shard_bytes):
    transformers = require("transformers")
    model = random_backbone(seed=13, rope="su", sliding_window=6)
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes < 2**30)
    reference = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype="float32"
    ).eval()
    assert reference.config.sliding_window == 6
    assert reference.config.rope_parameters["rope_type"] == "longrope"
    assert_matches_transformers(model, reference, (LENGTHS["at"], LENGTHS["above"]), TOLERANCE)
    # And back into phi3lab, exactly.
    reloaded = Phi3Backbone.from_preset(str(tmp_path))
    assert {**reloaded.get_config(), "name": None} == {**model.get_config(), "name": None}
    for ours, theirs in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(np.asarray(ours.value), np.asarray(theirs.value))


def legacy_config(reference) -> dict:
    """The config.json of microsoft/Phi-3-mini-128k-instruct as first
    published (transformers 4.x layout, "su" scaling), for `reference`'s sizes."""
    config = reference.config
    short, long = rope_factors()
    return {
        "_name_or_path": "Phi-3-mini-128k-instruct",
        "architectures": ["Phi3ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_phi3.Phi3Config",
            "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
        },
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "phi3",
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "original_max_position_embeddings": PRETRAINING,
        "pad_token_id": 0,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.39.3",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def test_legacy_su_config_json(tmp_path):
    """A hand-written config.json in the original hub layout. transformers
    5.24 itself refuses this file (it asks for
    `original_max_position_embeddings` inside `rope_scaling`), so the oracle
    is the same weights under transformers' current "longrope" config."""
    require("transformers")
    reference = hf_model(hf_config("longrope", sliding_window=262144), seed=14)
    reference.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(legacy_config(reference), indent=2))
    model = Phi3Backbone.from_preset(str(tmp_path))
    assert model.rope_scaling_type == "su"
    assert model.pretraining_sequence_length == PRETRAINING
    assert model.max_sequence_length == MAX_POSITIONS
    assert_matches_transformers(model, reference, (LENGTHS["below"], LENGTHS["above"]), TOLERANCE)


# --- hub handles, from local caches ------------------------------------------


def test_hf_handle_from_cache(tmp_path, monkeypatch, no_network):
    require("transformers")
    constants = require("huggingface_hub.constants")
    reference = hf_model(hf_config("longrope"), seed=15)
    reference.save_pretrained(tmp_path / "download")
    (tmp_path / "download" / "tokenizer_config.json").write_text("{}")
    commit = hashlib.sha1(b"phi3lab test").hexdigest()
    snapshot = put_in_hf_cache(tmp_path / "hf" / "hub", "owner/repo", tmp_path / "download", commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    from phi3lab.presets import resolve_preset_dir

    assert resolve_preset_dir("hf://owner/repo").resolve() == snapshot.resolve()
    model = Phi3Backbone.from_preset("hf://owner/repo")
    ids, mask = token_batch(LENGTHS["above"])
    _, expected = hf_forward(reference, ids, mask)
    assert max_diff(forward(model, ids, mask)[1], expected, mask) < TOLERANCE
    with pytest.raises(RuntimeError, match="pass the local directory"):
        Phi3Backbone.from_preset("hf://owner/not-cached")


def kaggle_cache(root: Path, handle: str) -> Path:
    """Where kagglehub 1.x caches a model handle `owner/model/framework/variation/version`
    (`$KAGGLEHUB_CACHE/models/...`); it treats the download as complete
    only when `<variation>/<version>.complete` exists beside it."""
    owner, model, framework, variation, version = handle.split("/")
    return root / "models" / owner / model / framework / variation / version


def test_kaggle_handle_from_cache(tmp_path, monkeypatch, no_network):
    keras_hub = require("keras_hub")
    require("kagglehub")
    reference = keras_hub.models.Phi3Backbone(**backbone_kwargs("su", 2))
    randomize_keras(reference, seed=16)
    handle = "keras/phi3/keras/phi3lab_test_en/3"
    directory = kaggle_cache(tmp_path / "kaggle", handle)
    reference.save_to_preset(str(directory))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    # No real credentials are read; an unauthenticated client is enough.
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    # Without the completion marker the cache is partial: kagglehub goes to
    # the network (refused here) and the error says how to work offline.
    with pytest.raises(RuntimeError, match="pass the local directory"):
        Phi3Backbone.from_preset(f"kaggle://{handle}")
    (directory.parent / "3.complete").touch()

    from phi3lab.presets import resolve_preset_dir

    assert resolve_preset_dir(f"kaggle://{handle}") == directory
    model = Phi3Backbone.from_preset(f"kaggle://{handle}")
    ids, mask = token_batch(LENGTHS["above"])
    assert max_diff(forward(model, ids, mask)[0], keras_hub_forward(reference, ids, mask), mask) < 1e-5


@pytest.mark.parametrize(
    "handle, package",
    [("kaggle://keras/phi3/keras/phi3_mini_4k_instruct_en/2", "kagglehub"), ("hf://owner/repo", "huggingface_hub")],
)
def test_hub_library_missing(monkeypatch, handle, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    with pytest.raises(ImportError) as error:
        Phi3Backbone.from_preset(handle)
    message = str(error.value)
    assert handle in message
    assert "pip install" in message and package in message
    assert "from_preset('/path/to/dir')" in message  # how to pass a local directory


SAVE_MEMORY = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    import jax
    import numpy as np
    import phi3lab
    from phi3lab.runtime.host_memory import release_freed_memory
    from phi3lab.model.initializers import zero_initialization
    from phi3lab.presets import save_hf_checkpoint, save_preset

    def status(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    def extra_peak(step):
        # Peak resident memory of `step` above what is resident before it
        # (the kernel's high-water mark, reset through clear_refs).
        gc.collect()
        release_freed_memory()
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        step()
        return status("VmHWM") - before

    root, dtype = Path(sys.argv[1]), sys.argv[2]
    with zero_initialization():
        model = phi3lab.Phi3Backbone(vocabulary_size=16384, num_layers=6, hidden_dim=1024, intermediate_dim=4096,
                                     num_query_heads=16, num_key_value_heads=16, max_sequence_length=256, dtype=dtype)
    rng = np.random.default_rng(0)
    for variable in model.weights:  # distinct values, made faster than by JAX's generator
        variable.assign(rng.random(tuple(variable.shape), dtype=np.float32))
    jax.block_until_ready([v.value for v in model.weights])  # the baseline holds the weights
    stacked = {id(v) for v in model.decoder.weights}
    report = {
        "weights": sum(int(v.value.nbytes) for v in model.weights),
        # one checkpoint tensor: a layer's slice of a stacked variable, or a whole top-level one
        "largest": max(int(v.value.nbytes) // (v.shape[0] if id(v) in stacked else 1) for v in model.weights),
        "hf": extra_peak(lambda: save_hf_checkpoint(model, root / "hf", max_shard_bytes=2**27)),
        "keras_hub": extra_peak(lambda: save_preset(model, root / "keras_hub")),
        "shards": len(list((root / "hf").glob("*.safetensors"))),
    }
    loaded = {}
    report["keras_hub_load"] = extra_peak(
        lambda: loaded.update(keras_hub=phi3lab.Phi3Backbone.from_preset(str(root / "keras_hub")))
    )
    loaded["hf"] = phi3lab.Phi3Backbone.from_preset(str(root / "hf"), dtype=dtype)
    for reloaded in loaded.values():
        for ours, theirs in zip(model.weights, reloaded.weights):
            assert theirs.dtype == ours.dtype, (ours.path, theirs.dtype)
            np.testing.assert_array_equal(np.asarray(theirs.value), np.asarray(ours.value), err_msg=ours.path)
    print(json.dumps(report))
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "reuse, dtype",
    [("0", "float32"), ("1", "float32"), ("0", "bfloat16")],
    ids=["host_memory_settings", "glibc_defaults", "bfloat16"],
)
def test_saving_and_loading_stream_tensor_by_tensor(tmp_path, reuse, dtype):
    """Saving a 0.54 GB model (float32, 134M parameters; 0.27 GB in
    bfloat16) in either layout adds at most two tensors' memory (its
    largest: the 64 MiB LM head, 32 MiB in bfloat16, transposed for
    Hugging Face) and 32 MiB to the resident peak, with phi3lab's allocator
    settings and without them; holding converted copies of a shard or of
    everything (the writers before) adds up to the weights. Loading the
    keras-hub preset adds its weights and no more than that (bfloat16 read
    as it is stored, one tensor at a time). The files round-trip bit for
    bit (several shards)."""
    result = subprocess.run(
        [sys.executable, "-c", SAVE_MEMORY, str(tmp_path), dtype],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PHI3LAB_NO_HOST_MEMORY_REUSE": reuse},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["weights"] > 5e8 / (2 if dtype == "bfloat16" else 1) and report["shards"] >= 3
    bound = 2 * report["largest"] + 32 * 2**20
    assert report["hf"] <= bound, report
    assert report["keras_hub"] <= bound, report
    assert report["keras_hub_load"] <= report["weights"] + bound, report
