"""Reading a tokenizer directory: a keras-hub preset's SentencePiece vocabulary, or a Hugging
Face checkpoint's `tokenizer.model` (SentencePiece, Phi-3) or `tokenizer.json` (byte-level BPE,
Phi-4-mini and Phi-4), with `tokenizer_config.json` (added-token flags, special-token names,
chat template), `chat_template.jinja`, `added_tokens.json` and `generation_config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from phi3lab.errors import bad_argument
from phi3lab.tokenization.backend import TokenizerBackend
from phi3lab.tokenization.sentencepiece_backend import (
    PHI3_TEMPLATE_TOKENS,
    SentencePieceBackend,
)

KERAS_VOCAB = Path("assets", "tokenizer", "vocabulary.spm")
_NAMED = ("bos_token", "eos_token", "pad_token", "unk_token")


def preset_directory(preset) -> Path:
    """The directory of `preset`: a directory as it is, another name through
    `phi3lab.presets.resolve_preset_dir`."""
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            "`preset` must be a directory or a preset name (str); received "
            f"preset={preset!r} of type {type(preset).__name__}."
        )
    path = Path(preset)
    if path.is_dir():
        return path
    try:
        from phi3lab.presets import resolve_preset_dir
    except ImportError:
        raise bad_argument(
            "preset",
            str(preset),
            "an existing directory (no preset registry, phi3lab.presets.resolve_preset_dir, is installed)",
        ) from None
    return Path(resolve_preset_dir(str(preset)))


def load_backend(path: Path) -> tuple[TokenizerBackend, str | None]:
    """The backend of a tokenizer directory and the checkpoint's chat template (None if it has none).

    A keras-hub vocabulary comes first, then `tokenizer.model` (SentencePiece; Phi-3 ships a
    `tokenizer.json` next to it, which encodes the same), then `tokenizer.json`.
    """
    if (path / KERAS_VOCAB).is_file():
        return SentencePieceBackend((path / KERAS_VOCAB).read_bytes()), None
    config = read_json(path / "tokenizer_config.json")
    template = chat_template_of(path, config)
    if (path / "tokenizer.model").is_file():
        return _sentencepiece(path, config), template
    if (path / "tokenizer.json").is_file():
        return _byte_level_bpe(path, config), template
    held = sorted(p.name for p in path.iterdir())[:20]
    raise ValueError(
        f"`preset` must hold a keras-hub vocabulary ({KERAS_VOCAB}), a Hugging Face tokenizer.model "
        f"(SentencePiece) or tokenizer.json (byte-level BPE); received preset={str(path)!r}, a "
        f"directory holding {held}."
    )


def _sentencepiece(path: Path, config: dict) -> SentencePieceBackend:
    decoder = config.get("added_tokens_decoder") or {}
    rstrip = {t["content"] for t in decoder.values() if t.get("rstrip")} if decoder else None
    skipped = {t["content"] for t in decoder.values() if t.get("special")} if decoder else None
    backend = SentencePieceBackend(
        (path / "tokenizer.model").read_bytes(),
        rstrip_tokens=rstrip,
        template_tokens=PHI3_TEMPLATE_TOKENS | named_tokens(config),
        skipped_tokens=skipped,
    )
    pairs = [(t["content"], int(i)) for i, t in decoder.items()]
    for token, token_id in pairs + list(read_json(path / "added_tokens.json").items()):
        if backend.special_tokens.get(token) != token_id:
            raise ValueError(
                f"{path} gives the added token {token!r} the id {token_id}; this tokenizer.model "
                f"supports only {backend.special_tokens}."
            )
    return backend


def _byte_level_bpe(path: Path, config: dict) -> TokenizerBackend:
    # Imported here: only byte-level checkpoints need the tokenizers library.
    from tokenizers import Tokenizer

    from phi3lab.tokenization.bpe_backend import ByteLevelBPEBackend

    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as error:  # noqa: BLE001 (the Rust library raises plain Exceptions)
        raise ValueError(f"{path / 'tokenizer.json'} is not a tokenizers file: {error}") from None
    stop = read_json(path / "generation_config.json").get("eos_token_id") or []
    return ByteLevelBPEBackend(
        tokenizer,
        added_tokens=config.get("added_tokens_decoder"),
        template_tokens=named_tokens(config),
        stop_token_ids=[stop] if isinstance(stop, int) else stop,
        clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
        source=str(path / "tokenizer.json"),
    )


def named_tokens(config: dict) -> dict[str, str]:
    """tokenizer_config.json's special-token names, each a str or a dict with a "content"."""
    named = {}
    for key in _NAMED:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            named[key] = value
    return named


def chat_template_of(path: Path, config: dict) -> str | None:
    """`chat_template.jinja` if present (transformers prefers it), else tokenizer_config.json's
    `chat_template`: a str, or a list of {"name", "template"} of which "default" is taken."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"{path / 'tokenizer_config.json'}'s chat_template must be a str or a list of "
            f"{{'name', 'template'}} dicts with a 'default'; received {type(template).__name__}."
        )
    return template


def read_json(path: Path) -> dict:
    """A JSON file's object, {} when the file is absent."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
