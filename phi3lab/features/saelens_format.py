"""Dictionaries on disk in SAELens' format: `cfg.json` + `sae_weights.safetensors`.

The tensors are SAELens' (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae,
d_out]`, `b_dec`, `threshold`, `W_skip [d_out, d_in]`), the config its 6.x
keys (`d_in`, `d_sae`, `d_out`, `dtype`, `apply_b_dec_to_input`,
`normalize_activations`, `reshape_activations`, `k`,
`rescale_acts_by_decoder_norm`, `architecture`, and `metadata` with
`hook_name` / `hook_name_out`). Architectures map to kinds as SAELens'
registry does:

    standard -> relu SAE             transcoder / skip_transcoder -> relu transcoder
    topk     -> topk SAE             jumprelu_transcoder / jumprelu_skip_transcoder
    jumprelu -> jumprelu SAE         -> jumprelu transcoder

A `"batchtopk"` dictionary is written as SAELens writes one after training,
a `"jumprelu"` with its learned threshold (the metadata key `phi3lab_kind`
brings the kind and `k` back when phi3lab reads it). A top-k transcoder,
which SAELens has no class for, is written as `topk_transcoder`. Files from
SAELens before 6.0 (`hook_point`, `activation_fn_str`, no `architecture`)
are read too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from jax import numpy as jnp

from phi3lab.errors import bad_argument, close_matches
from phi3lab.features.dictionary import NORMALIZATIONS, DictionaryConfig, SparseDictionary
from phi3lab.presets.safetensors_io import SafetensorsFile, write_safetensors

CONFIG_FILE = "cfg.json"
# Where a preset directory keeps its dictionaries, one folder per name.
DICTIONARIES = "dictionaries"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens file layout phi3lab writes (its 6.x config); SAELens reads older layouts differently.
FORMAT_VERSION = "6.0.0"
# architecture -> (kind, transcoder, skip)
ARCHITECTURES = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", True, False),
}
_PHI3LAB_KIND = "phi3lab_kind"
_PHI3LAB_K = "phi3lab_k"
_PRE_6_NAMES = {"hook_point": "hook_name", "activation_fn_str": "activation_fn"}


def architecture_of(config: DictionaryConfig) -> str:
    """The SAELens architecture name `config` is saved under."""
    kind = "jumprelu" if config.kind == "batchtopk" else config.kind
    for name, (k, transcoder, skip) in ARCHITECTURES.items():
        if (k, transcoder, skip) == (kind, config.transcoder, config.skip):
            return name
    raise bad_argument("dictionary", config, "a kind SAELens' format can hold (a top-k transcoder has no skip)")


def save(dictionary: SparseDictionary, directory) -> Path:
    """Write `dictionary` as `directory/cfg.json` and `directory/sae_weights.safetensors`.

    Example:
    >>> sae.save("my_sae")
    >>> sae_lens.SAE.load_from_disk("my_sae")     # and phi3lab.features.load("my_sae")
    """
    config = dictionary.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {**config.metadata, "sae_lens_version": FORMAT_VERSION, "hook_name": config.site}
    if config.transcoder:
        metadata["hook_name_out"] = config.target_site
    if config.kind == "batchtopk":
        metadata.update({_PHI3LAB_KIND: "batchtopk", _PHI3LAB_K: config.k})
    cfg = {
        "d_in": config.d_in,
        "d_sae": config.d_sae,
        "dtype": str(np.dtype(dictionary.W_enc.dtype)),
        "device": "cpu",
        "apply_b_dec_to_input": config.apply_b_dec_to_input,
        "normalize_activations": config.normalize_activations,
        "reshape_activations": "hook_z" if (config.site or "").endswith("attn.hook_z") else "none",
        "metadata": metadata,
        "architecture": architecture_of(config),
    }
    if config.transcoder:
        cfg["d_out"] = config.d_out
    if config.kind == "topk":
        cfg.update(k=config.k, rescale_acts_by_decoder_norm=config.rescale_acts_by_decoder_norm)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    write_safetensors(directory / WEIGHTS_FILE, dictionary.numpy())
    return directory


def load(directory) -> SparseDictionary:
    """Read a dictionary saved by phi3lab or SAELens (`cfg.json` +
    `sae_weights.safetensors` in `directory`).

    Raises a `ValueError` naming the config key for what phi3lab cannot
    honour (an unknown architecture or input normalisation).

    Example:
    >>> sae = phi3lab.features.load("path/to/sae_dir")
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise bad_argument("directory", str(directory), f"a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = _current_layout(json.loads((directory / CONFIG_FILE).read_text()))
    tensors = SafetensorsFile(directory / WEIGHTS_FILE)
    if "log_threshold" in tensors.keys():  # older JumpReLU files
        weights = {"threshold": np.exp(np.asarray(tensors.tensor("log_threshold"), np.float32))}
    else:
        weights = {}
    weights.update({name: np.asarray(tensors.tensor(name)) for name in tensors.keys() if name != "log_threshold"})
    config = config_from_cfg(cfg, directory / CONFIG_FILE)
    dtype = cfg.get("dtype", "float32")
    expected = {
        "W_enc": (config.d_in, config.d_sae),
        "b_enc": (config.d_sae,),
        "W_dec": (config.d_sae, config.d_out),
        "b_dec": (config.d_out,),
        "threshold": (config.d_sae,) if config.kind in ("jumprelu", "batchtopk") else None,
        "W_skip": (config.d_out, config.d_in) if config.skip else None,
    }
    arrays = {}
    for name, shape in expected.items():
        if shape is None:
            arrays[name] = None
            continue
        if name not in weights or weights[name].shape != shape:
            found = None if name not in weights else weights[name].shape
            raise ValueError(
                f"{directory / WEIGHTS_FILE} must hold {name!r} of shape {shape} for the "
                f"{cfg['architecture']!r} architecture in {CONFIG_FILE}; found {found}."
            )
        arrays[name] = jnp.asarray(weights[name], dtype)
    return SparseDictionary(**arrays, config=config)


def _current_layout(cfg: dict) -> dict:
    """A config in SAELens' 6.x layout (older files keep hook names and the
    activation at the top level)."""
    cfg = {_PRE_6_NAMES.get(key, key): value for key, value in cfg.items()}
    if "metadata" not in cfg:
        cfg["metadata"] = {key: cfg[key] for key in ("hook_name", "hook_name_out", "model_name") if key in cfg}
        cfg.setdefault("architecture", "standard")
        if cfg.get("activation_fn", "relu") == "topk":
            cfg["architecture"] = "topk"
            cfg.setdefault("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    return cfg


def config_from_cfg(cfg: dict, source) -> DictionaryConfig:
    """The `DictionaryConfig` of a SAELens 6.x config dict (`source` names the file in errors)."""
    architecture = cfg.get("architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"`architecture` in {source} must be one of {sorted(ARCHITECTURES)} (the SAELens architectures phi3lab "
            f"can run); received architecture={architecture!r}."
        )
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"`normalize_activations` in {source} must be one of {list(NORMALIZATIONS)}; "
            f"received normalize_activations={normalize!r}."
        )
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"`finetuning_scaling_factor` in {source} must be false: phi3lab does not apply it.")
    if cfg.get("reshape_activations", "none") not in ("none", "hook_z"):
        raise ValueError(
            f"`reshape_activations` in {source} must be 'none' or 'hook_z'; "
            f"received reshape_activations={cfg.get('reshape_activations')!r}."
        )
    kind, transcoder, skip = ARCHITECTURES[architecture]
    metadata = dict(cfg.get("metadata") or {})
    k = cfg.get("k") if kind == "topk" else None
    if metadata.get(_PHI3LAB_KIND) == "batchtopk" and kind == "jumprelu":
        kind, k = "batchtopk", metadata[_PHI3LAB_K]
    site, target = metadata.pop("hook_name", None), metadata.pop("hook_name_out", None)
    for key in ("sae_lens_version", "sae_lens_training_version", _PHI3LAB_KIND, _PHI3LAB_K):
        metadata.pop(key, None)
    return DictionaryConfig(
        kind=kind,
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        d_out=int(cfg.get("d_out", cfg["d_in"])),
        site=site,
        target_site=target,
        transcoder=transcoder,
        k=int(k) if kind == "topk" and k is not None else k,
        skip=skip,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
        normalize_activations=normalize,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        metadata_json=json.dumps(metadata, sort_keys=True),
    )


def from_pretrained(source: str, subfolder: str | None = None) -> SparseDictionary:
    """A dictionary from a local directory or a Hugging Face repository
    (`"hf://org/repo"`, `subfolder=` the dictionary's folder in it), fetched
    through the same hub code as model presets (and its cache, so a second
    call works offline).

    Example:
    >>> sae = phi3lab.features.from_pretrained("hf://org/phi3-saes", subfolder="blocks.16.hook_resid_post")
    """
    if not isinstance(source, str):
        raise bad_argument("source", source, "a directory path or an 'hf://org/repo' handle")
    if source.startswith("hf://"):
        from phi3lab.presets.remote import download

        return load(download(source, subfolder=subfolder))
    return load(Path(source) / (subfolder or ""))


def from_preset(preset: str, name: str) -> SparseDictionary:
    """A dictionary shipped with a model preset: `<preset>/dictionaries/<name>/`.

    Args:
        preset: a built-in preset name (`"phi3lab_tiny_en"`), a local preset
            directory or a `kaggle://` / `hf://` handle.
        name: the dictionary's folder, e.g. `"resid_post_2"` or
            `"transcoder_0"` (see `docs/features.md`).

    Returns:
        The `SparseDictionary`, with its site(s) in its config.

    Example:
    >>> sae = phi3lab.features.from_preset("phi3lab_tiny_en", "resid_post_2")
    >>> sae.config.site
    'blocks.2.hook_resid_post'
    """
    from phi3lab.presets.registry import resolve_preset_dir

    folder = resolve_preset_dir(preset) / DICTIONARIES
    names = sorted(path.name for path in folder.iterdir() if (path / CONFIG_FILE).is_file()) if folder.is_dir() else []
    if name not in names:
        accepted = f"one of {names} (closest: {close_matches(str(name), names)})" if names else "a dictionary name"
        raise bad_argument("name", name, f"{accepted}; the preset {preset!r} ships {len(names)} dictionaries")
    return load(folder / name)
