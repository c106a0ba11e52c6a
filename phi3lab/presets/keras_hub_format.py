"""keras-hub preset directories: `config.json`, `model.weights.h5`, assets.

Read without keras-hub installed, and never by deserializing objects: we
accept only the `Phi3Backbone` class and copy its known constructor
arguments. Weights come from the `.h5` file with h5py, dataset by dataset.
HDF5 has no bfloat16 type: h5py stores bfloat16 tensors as opaque 2-byte
values, and Keras (`saving_lib.H5IOStore`) marks each such dataset with the
attribute `dtype="bfloat16"`; we write and read the same mark, so bfloat16
files pass between phi3lab, keras-hub and Keras. We also write this layout,
so keras-hub can load what phi3lab saves (float models; an int8-quantized
model is written in the same layout, each kernel's scale as its layer's
second variable, and its config's DTypePolicyMap names phi3lab's layers,
so only phi3lab reads it back).
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import h5py
import keras
import ml_dtypes
import numpy as np

from phi3lab.model.config import BackboneConfig
from phi3lab.model.dtypes import read_dtype
from phi3lab.model.quantize import SCALE_SUFFIX
from phi3lab.model.stacked import layer_slice
from phi3lab.presets.h5_datasets import check_dataset, check_links, checked_dataset
from phi3lab.presets.preflight import PresetLayout, axis
from phi3lab.presets.weights import WeightFiller
from phi3lab.runtime.host_memory import release_freed_memory

ARGUMENTS = BackboneConfig.names()
ACCEPTED_CLASSES = ("Phi3Backbone",)
# Where a keras-hub (or keras-nlp, or phi3lab) Phi3Backbone config may say it comes from.
# Nothing is imported from them; any other origin is refused.
ACCEPTED_MODULES = re.compile(r"^(keras_hub|keras_nlp|phi3lab)(\..*)?$")
ACCEPTED_REGISTERED_NAMES = (None, "keras_hub>Phi3Backbone", "keras_nlp>Phi3Backbone", "phi3lab>Phi3Backbone")

# keras-hub's decoder sublayer (and variable index) -> our variable.
DECODER_MAP = {
    "pre_attention_layernorm": "decoder/attention_norm/scale",
    "attention/query_dense": "decoder/attention/query_kernel",
    "attention/key_dense": "decoder/attention/key_kernel",
    "attention/value_dense": "decoder/attention/value_kernel",
    "attention/output_dense": "decoder/attention/output_kernel",
    "post_attention_layernorm": "decoder/mlp_norm/scale",
    "feedforward_gate_dense": "decoder/mlp/gate_kernel",
    "feedforward_intermediate_dense": "decoder/mlp/up_kernel",
    "feedforward_output_dense": "decoder/mlp/down_kernel",
}
TOP_MAP = {
    "reversible_embedding/vars/0": "token_embedding/embeddings",
    "reversible_embedding/vars/1": "token_embedding/reverse_embeddings",
    "phi3_layer_norm/vars/0": "final_norm/scale",
}
# Keras' mark on a dataset of opaque 2-byte values that hold bfloat16 (the
# only opaque values a weights file may hold).
DTYPE_ATTRIBUTE, BFLOAT16 = "dtype", "bfloat16"
_DECODER_GROUP = re.compile(r"^phi3_decoder(?:_(\d+))?$")
# Tensors are named by their path under the weights file's "layers" group.
LAYOUT = PresetLayout(
    probes={
        "reversible_embedding/vars/0": (axis("vocabulary_size"), axis("hidden_dim")),
        "phi3_decoder/attention/query_dense/vars/0": (axis("hidden_dim"), axis("num_query_heads"), axis("head_dim")),
        "phi3_decoder/attention/key_dense/vars/0": (axis("hidden_dim"), axis("num_key_value_heads"), axis("head_dim")),
        "phi3_decoder/feedforward_output_dense/vars/0": (axis("intermediate_dim"), axis("hidden_dim")),
    },
    layer_pattern=re.compile(r"phi3_decoder(?:_(\d+))?/"),
)


def is_keras_hub_dir(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and "class_name" in json.loads(config.read_text())


def read_config(directory: Path) -> dict:
    """Constructor arguments from a keras-hub `config.json`."""
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    class_name = saved.get("class_name")
    if class_name not in ACCEPTED_CLASSES:
        raise ValueError(
            f"{path} describes class {class_name!r}; phi3lab loads only "
            f"{ACCEPTED_CLASSES} presets and never builds other classes."
        )
    module = saved.get("module")
    if module is not None and not (isinstance(module, str) and ACCEPTED_MODULES.match(module)):
        raise ValueError(
            f"{path} names module {module!r}; phi3lab loads only keras-hub / keras-nlp "
            "Phi3Backbone presets and never imports or builds objects from elsewhere."
        )
    if saved.get("registered_name") not in ACCEPTED_REGISTERED_NAMES:
        raise ValueError(
            f"{path} names registered class {saved.get('registered_name')!r}; phi3lab loads only "
            f"{[n for n in ACCEPTED_REGISTERED_NAMES if n]} presets."
        )
    config = saved.get("config", {})
    if not isinstance(config, dict):
        raise ValueError(f"{path}: 'config' must be a JSON object; it is a {type(config).__name__}.")
    kwargs = {key: config[key] for key in ARGUMENTS if key in config}
    dtype = config.get("dtype")
    if dtype is not None:
        # Checked here to name the file; the dict is read field by field
        # (keras' own policy classes only), never deserialized as objects.
        try:
            read_dtype(dtype)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        kwargs["dtype"] = dtype
    return kwargs


def _open_weights(directory: Path) -> tuple[Path, h5py.File]:
    path = directory / "model.weights.h5"
    if not path.is_file():
        raise FileNotFoundError(f"The keras-hub preset {directory} has no model.weights.h5.")
    try:
        return path, h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path} is not a readable weights file (truncated or corrupt?): {error}") from None


def _layers_group(path: Path, handle: h5py.File) -> h5py.Group:
    layers = handle.get("layers") if isinstance(handle.get("layers", getlink=True), h5py.HardLink) else None
    if not isinstance(layers, h5py.Group):
        raise ValueError(f"{path} has no 'layers' group: it is not a keras-hub Phi3Backbone weights file.")
    return layers


def _tensor_dtype(path: Path, name: str, dataset: h5py.Dataset) -> np.dtype:
    """The dtype `dataset` (at `layers/name`) holds: `ml_dtypes.bfloat16` for
    opaque 2-byte values marked bfloat16; refused for other opaque values,
    whose type the file does not say."""
    stored = dataset.dtype
    if stored.kind != "V":
        return stored
    if stored.itemsize == 2 and dataset.attrs.get(DTYPE_ATTRIBUTE) == BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(
        f"{path}: tensor 'layers/{name}' holds opaque {stored.itemsize}-byte values without the mark "
        f"{DTYPE_ATTRIBUTE}={BFLOAT16!r}; phi3lab reads opaque values only as bfloat16 marked as Keras marks them. "
        "A bfloat16 preset saved by phi3lab before it wrote the mark lacks it: set it on each 2-byte opaque "
        f"dataset with h5py (`dataset.attrs[{DTYPE_ATTRIBUTE!r}] = {BFLOAT16!r}`) and load again."
    )


def _write_tensor(group: h5py.Group, name: str, value: np.ndarray) -> None:
    """Store `value` at `group[name]`, marking bfloat16 as Keras does."""
    dataset = group.create_dataset(name, data=value)
    if value.dtype == ml_dtypes.bfloat16:
        dataset.attrs[DTYPE_ATTRIBUTE] = BFLOAT16


def _read_tensor(path: Path, layers: h5py.Group, name: str) -> np.ndarray:
    """The tensor at `layers[name]` (`h5_datasets.checked_dataset`), bfloat16
    as `ml_dtypes.bfloat16`."""
    dataset = checked_dataset(path, layers, name)
    dtype = _tensor_dtype(path, name, dataset)
    value = dataset[()]
    return value if value.dtype == dtype else value.view(dtype)


def tensor_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in `model.weights.h5`, by its path under the
    "layers" group, from the file's metadata alone (no data is read); a
    tensor of opaque values not marked bfloat16, a link, or a tensor whose
    bytes are not in the file or that would decompress to far more than it
    stores (`h5_datasets`) is refused here, before the model is allocated."""
    path, handle = _open_weights(directory)
    shapes = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            check_dataset(path, item)
            _tensor_dtype(path, name, item)
            shapes[name] = tuple(item.shape)

    with handle:
        layers = _layers_group(path, handle)
        check_links(path, layers)
        layers.visititems(visit)
    return shapes


def load_weights(model, directory: Path, quantize: bool = False) -> None:
    """Copy `model.weights.h5` of a keras-hub preset into `model`; with
    `quantize`, float kernels into its int8 ones, quantized as they are read
    (`WeightFiller`)."""
    path, handle = _open_weights(directory)
    filler = WeightFiller(model, quantize=quantize)
    with handle:
        layers = _layers_group(path, handle)
        for source, key in TOP_MAP.items():
            if key not in filler.variables:
                continue  # the tied LM head has no variable of its own
            if source not in layers:
                raise ValueError(f"{path} has no tensor 'layers/{source}' (needed for {key}).")
            filler.put(key, _read_tensor(path, layers, source), source=f"layers/{source}")
        for group_name in layers:
            match = _DECODER_GROUP.match(group_name)
            if not match:
                continue
            index = int(match.group(1) or 0)
            if index >= model.num_layers:
                raise ValueError(
                    f"{path} holds decoder group {group_name!r} but the config has num_layers={model.num_layers}."
                )
            for sub, key in DECODER_MAP.items():
                # An int8 kernel's scale is its layer's second variable (unless
                # the kernel was float and quantized while loading: its scale is written).
                for variable, target in enumerate((key, key + SCALE_SUFFIX)):
                    if not filler.wants(target, index):
                        continue
                    name = f"{group_name}/{sub}/vars/{variable}"
                    if name not in layers:
                        raise ValueError(f"{path} has no tensor 'layers/{name}' (needed for {target}).")
                    filler.put(target, _read_tensor(path, layers, name), layer=index, source=f"layers/{name}")
    filler.finish(str(directory))


def save_preset(model, directory: str | Path) -> Path:
    """Write `model` as a keras-hub preset directory (loadable by keras-hub).

    Writes `config.json` (class `keras_hub>Phi3Backbone`), `metadata.json`
    and `model.weights.h5` in keras-hub's layout. phi3lab's extra arguments
    (`sliding_window`, `partial_rotary_factor`, `tie_word_embeddings`) are
    kept in the config only when they differ from the default, since
    keras-hub does not know them. A tied model writes only the token
    embedding (keras-hub's `ReversibleEmbedding(tie_weights=True)` layout).
    An int8-quantized model keeps its int8 kernels, each with its scale as
    `vars/1`, and its DTypePolicyMap `dtype`: phi3lab loads it back as the
    same quantized model (keras-hub does not: the map names phi3lab's layers).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.backbone_config.keras_hub_dict()
    config["name"] = "phi3_backbone"
    config["trainable"] = True
    config["dtype"] = model.get_config()["dtype"]
    (directory / "config.json").write_text(
        json.dumps(
            {
                "module": "keras_hub.src.models.phi3.phi3_backbone",
                "class_name": "Phi3Backbone",
                "config": config,
                "registered_name": "keras_hub>Phi3Backbone",
            },
            indent=4,
        )
    )
    (directory / "metadata.json").write_text(
        json.dumps(
            {
                "keras_version": keras.__version__,
                "keras_hub_version": "0.32.0",
                "parameter_count": int(model.count_params()),
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                "tasks": [],
                "saved_by": "phi3lab",
            },
            indent=4,
        )
    )
    params = model.params()
    with h5py.File(directory / "model.weights.h5", "w") as handle:
        layers = handle.create_group("layers")
        for name, key in TOP_MAP.items():
            group, variable = key.split("/")
            if variable not in params[group]:
                continue  # the tied LM head
            _write_tensor(layers, name, np.asarray(params[group][variable]))
        decoder = params["decoder"]
        for index in range(model.num_layers):
            group = "phi3_decoder" + (f"_{index}" if index else "")
            for sub, key in DECODER_MAP.items():
                _, part, variable = key.split("/")
                for number, name in enumerate((variable, variable + SCALE_SUFFIX)):
                    if name in decoder[part]:
                        data = np.asarray(layer_slice(model, decoder[part][name], index))
                        _write_tensor(layers, f"{group}/{sub}/vars/{number}", data)
                        release_freed_memory()  # as `write_safetensors` does: one tensor's memory at a time
    return directory
