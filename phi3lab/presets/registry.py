"""Built-in preset names and how a `preset` string becomes a directory."""

from __future__ import annotations

from pathlib import Path

from phi3lab.errors import close_matches
from phi3lab.presets import family_configs as family

ASSETS = Path(__file__).resolve().parent.parent / "assets"

BUILTIN = {
    "phi3lab_tiny_en": {
        "description": "The small Phi-3 trained by scripts/train_tiny.py and shipped with phi3lab (offline).",
        "directory": ASSETS / "phi3lab_tiny_en",
    },
    "phi3_mini_4k_instruct_en": {
        "description": "Phi-3-mini-4k-instruct: 3.8B parameters, 32 layers, 4k context (downloaded from Kaggle).",
        "handle": "kaggle://keras/phi3/keras/phi3_mini_4k_instruct_en/2",
        # The reference implementation masks attention to the last 2047
        # positions (Hugging Face config); keras-hub's preset omits it.
        "config": family.PHI3_MINI_4K,
        "overrides": {"sliding_window": 2047},
    },
    "phi3_mini_128k_instruct_en": {
        "description": "Phi-3-mini-128k-instruct: 3.8B parameters, 32 layers, 128k context with su/LongRoPE scaling "
        "(downloaded from Kaggle).",
        "handle": "kaggle://keras/phi3/keras/phi3_mini_128k_instruct_en/2",
        # The 48 short/long rotary factors come with the downloaded config.
        "config": family.PHI3_MINI_128K,
        "overrides": {},
    },
    "phi3_5_mini_instruct_en": {
        "description": "Phi-3.5-mini-instruct: 3.8B parameters, 32 layers, 128k context with LongRoPE "
        "(downloaded from Hugging Face).",
        "handle": "hf://microsoft/Phi-3.5-mini-instruct",
        "config": family.PHI3_5_MINI,
    },
    "phi3_medium_4k_instruct_en": {
        "description": "Phi-3-medium-4k-instruct: 14B parameters, 40 layers, grouped-query attention, 4k context "
        "(downloaded from Hugging Face).",
        "handle": "hf://microsoft/Phi-3-medium-4k-instruct",
        "config": family.PHI3_MEDIUM_4K,
    },
    "phi4_mini_instruct_en": {
        "description": "Phi-4-mini-instruct: 3.8B parameters, 32 layers, grouped-query attention, rotary on 3/4 of "
        "each head, tied embeddings, 128k context with LongRoPE, byte-level BPE vocabulary of 200k "
        "(downloaded from Hugging Face).",
        "handle": "hf://microsoft/Phi-4-mini-instruct",
        "config": family.PHI4_MINI,
    },
    "phi4_en": {
        "description": "Phi-4: 14B parameters, 40 layers, grouped-query attention, 16k context, rotary base 250000 "
        "(downloaded from Hugging Face).",
        "handle": "hf://microsoft/phi-4",
        "config": family.PHI4,
    },
}


def builtin_presets() -> dict:
    """`{name: description}` of every built-in preset."""
    return {name: entry["description"] for name, entry in BUILTIN.items()}


def resolve_preset_dir(preset: str) -> Path:
    """The local directory holding `preset`'s files, downloading if needed.

    Args:
        preset: a local directory, a built-in name, or a `kaggle://` /
            `hf://` handle.
    """
    if not isinstance(preset, (str, Path)):
        raise TypeError(f"`preset` must be a string or path; received {preset!r} of type {type(preset).__name__}.")
    preset = str(preset)
    if Path(preset).is_dir():
        return Path(preset)
    if preset.startswith(("kaggle://", "hf://")):
        from phi3lab.presets.remote import download

        return download(preset)
    if preset in BUILTIN:
        entry = BUILTIN[preset]
        if "directory" in entry:
            if not entry["directory"].is_dir():
                raise FileNotFoundError(
                    f"The built-in preset {preset!r} is missing from this installation "
                    f"({entry['directory']}); run `python scripts/train_tiny.py` to rebuild it."
                )
            return entry["directory"]
        from phi3lab.presets.remote import download

        return download(entry["handle"])
    raise ValueError(
        f"`preset` must be a local directory, a 'kaggle://' or 'hf://' handle, or "
        f"a built-in name; received preset={preset!r}. Built-in names: "
        f"{sorted(BUILTIN)} (closest: {close_matches(preset, BUILTIN)})."
    )
