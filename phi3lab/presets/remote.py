"""Downloading `kaggle://` and `hf://` presets (when installed and online)."""

from __future__ import annotations

from pathlib import Path

HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.spm", "*.jinja"]  # *.jinja: chat templates


def _offline_hint(handle: str) -> str:
    return (
        f"To use {handle} without network access, download its files on a "
        "machine that has it (a keras-hub preset directory, or a Hugging Face "
        "checkpoint with config.json and *.safetensors) and pass the local "
        "directory: Phi3Backbone.from_preset('/path/to/dir')."
    )


def download(handle: str, subfolder: str | None = None) -> Path:
    """Fetch a `kaggle://owner/model/framework/variation[/version]` or
    `hf://owner/repo` handle into the local cache and return its directory.

    `subfolder` (Hugging Face only) fetches just that folder of the
    repository (a dictionary among many in an SAE release) and returns it.

    Uses kagglehub / huggingface_hub (`pip install "phi3lab[hub]"`); their
    caches make a second call work offline.
    """
    if handle.startswith("kaggle://"):
        try:
            import kagglehub
        except ImportError:
            raise ImportError(
                f"Loading {handle} needs kagglehub: pip install 'phi3lab[hub]'. " + _offline_hint(handle)
            ) from None
        fetch = lambda: kagglehub.model_download(handle[len("kaggle://") :])
    elif handle.startswith("hf://"):
        try:
            import huggingface_hub
        except ImportError:
            raise ImportError(
                f"Loading {handle} needs huggingface_hub: pip install 'phi3lab[hub]'. " + _offline_hint(handle)
            ) from None
        patterns = HF_PATTERNS if subfolder is None else [f"{subfolder.strip('/')}/{p}" for p in HF_PATTERNS]
        fetch = lambda: huggingface_hub.snapshot_download(handle[len("hf://") :], allow_patterns=patterns)
    else:
        raise ValueError(f"`preset` handle {handle!r} must start with 'kaggle://' or 'hf://'.")
    if subfolder is not None and not handle.startswith("hf://"):
        raise ValueError(f"`subfolder` is for hf:// handles; received subfolder={subfolder!r} with {handle!r}.")
    try:
        directory = Path(fetch())
    except Exception as error:  # network, auth and cache errors of either library
        raise RuntimeError(
            f"Could not download {handle}: {type(error).__name__}: {error}. " + _offline_hint(handle)
        ) from error
    return directory if subfolder is None else directory / subfolder.strip("/")
