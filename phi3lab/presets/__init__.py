"""Preset loading: built-in names, keras-hub dirs, Hugging Face dirs, hubs."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from phi3lab.model import preset_loader
from phi3lab.model.dtypes import read_dtype
from phi3lab.model.initializers import zero_initialization
from phi3lab.presets import hf_format, keras_hub_format
from phi3lab.presets.preflight import check_preset_fits
from phi3lab.presets.registry import BUILTIN, builtin_presets, resolve_preset_dir
from phi3lab.runtime.host_memory import release_freed_memory

__all__ = [
    "builtin_presets",
    "load_backbone",
    "read_backbone_config",
    "resolve_preset_dir",
    "save_preset",
    "save_hf_checkpoint",
]

save_preset = keras_hub_format.save_preset
save_hf_checkpoint = hf_format.save_checkpoint


def read_backbone_config(directory: Path) -> tuple[dict, object]:
    """Constructor arguments and the format module (`keras_hub_format` or
    `hf_format`: its `load_weights`, `tensor_shapes`, `LAYOUT`) of a preset directory."""
    config_path = Path(directory) / "config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path} must hold a JSON object; it holds a {type(loaded).__name__}.")
    if keras_hub_format.is_keras_hub_dir(directory):
        return keras_hub_format.read_config(directory), keras_hub_format
    if hf_format.is_hf_dir(directory):
        return hf_format.read_config(directory), hf_format
    raise ValueError(
        f"{directory} is not a preset directory phi3lab can read: expected a "
        "keras-hub preset (config.json with 'class_name', model.weights.h5) or "
        "a Hugging Face checkpoint (config.json with 'model_type', *.safetensors)."
    )


def load_backbone(cls, preset, load_weights: bool = True, **kwargs):
    """Build `cls` (a `Phi3Backbone`) from `preset`; see `Phi3Backbone.from_preset`."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"from_preset got unknown config override(s) {unknown}; accepted: {sorted(accepted)}.")
    if not isinstance(load_weights, bool):
        raise TypeError(f"`load_weights` must be True or False; received load_weights={load_weights!r}.")
    entry = BUILTIN.get(preset) if isinstance(preset, str) else None
    known_config = (entry or {}).get("config")
    if not load_weights and known_config and _complete(known_config):
        model = cls(**{**known_config, **kwargs})
    else:
        directory = resolve_preset_dir(preset)
        config, preset_format = read_backbone_config(directory)
        if entry:
            config.update(entry.get("overrides", {}))
        if not load_weights:
            model = cls(**{**config, **kwargs})
        else:
            arguments = {**config, **kwargs}
            with zero_initialization():  # every weight is overwritten next
                check_preset_fits(
                    lambda: cls(**arguments),
                    arguments,
                    preset_format.tensor_shapes(directory),
                    preset_format.LAYOUT,
                    directory / "config.json",
                    kwargs,
                )
                model = cls(**arguments)
            # int8 asked of a float preset (`quantization="int8"` or an int8
            # `dtype` map): each kernel is quantized as it is read.
            preset_quantization = config.get("quantization") or read_dtype(config.get("dtype")).quantization
            quantize = model.quantization == "int8" and not preset_quantization
            preset_format.load_weights(model, directory, quantize=quantize)
    # Reading the files freed host memory that the process would keep for
    # reuse (`phi3lab.runtime.host_memory`): 180 MiB over the 12-layer benchmark
    # model's 512 MiB of weights. Give it back.
    release_freed_memory()
    return model


def _complete(config: dict) -> bool:
    """Whether a built-in architecture is known offline: everything but the
    "su" rotary factors of a preset that only come with the download."""
    return config.get("rope_scaling_type") is None or config.get("rope_scaling_long_factor") is not None


preset_loader.install(preset_loader.PresetLoader(load=load_backbone, builtin_presets=builtin_presets))
