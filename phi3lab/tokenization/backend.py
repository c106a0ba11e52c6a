"""The protocol `Phi3Tokenizer` runs on, and how the bytes of a token are shown as text."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


@runtime_checkable
class TokenizerBackend(Protocol):
    """One kind of tokenizer (SentencePiece, byte-level BPE) behind `Phi3Tokenizer`.

    Ids are checked by `Phi3Tokenizer` before they reach a backend.

    Attributes:
        special_tokens: the added (control) tokens, each a single id inside text, to their ids.
        vocabulary_size: one more than the largest id.
        bos_token_id, eos_token_id, pad_token_id, unk_token_id: `eos_token_id` ends a chat turn.
        stop_token_ids: the ids that end generation.
        template_tokens: the special-token strings a chat template sees (`bos_token`,
            `eos_token`, `pad_token`, `unk_token`), as in the checkpoint's tokenizer_config.json.
    """

    special_tokens: Mapping[str, int]
    vocabulary_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int | None
    stop_token_ids: tuple[int, ...]
    template_tokens: Mapping[str, str]

    def encode(self, text: str) -> list[int]:
        """The ids of `text` as a whole text (no BOS)."""

    def encode_in_context(self, text: str) -> list[int]:
        """The ids `text` contributes when it follows other text (no SentencePiece dummy prefix)."""

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of `ids`, as Hugging Face's tokenizer of the same files decodes it."""

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of an id (`"▁Hello"`, `"ĠHello"`, `"<|user|>"`)."""

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, None if there is none."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text a token stands for: `"▁Hi"` and `"ĠHi"` give b" Hi", `"<|user|>"` b"<|user|>"."""

    def vocabulary(self) -> Iterable[str]:
        """Every vocabulary entry (for "did you mean" messages)."""

    def save_hf(self, directory: Path, chat_template: str) -> list[Path]:
        """Write Hugging Face tokenizer files to an existing directory; the paths written."""


def escape(text: str) -> str:
    """Non-printable characters as escapes: "\\n", "\\t", "\\r", "\\x1C", "\\u3000"."""
    return "".join(
        c if c.isprintable() else _ESCAPES.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 256 else f"\\u{ord(c):04X}")
        for c in text
    )


def show_bytes(data: bytes, space: str) -> str:
    """Token bytes as readable text: UTF-8 where valid, `\\xNN` for the bytes of split characters,
    non-printable characters escaped and spaces shown as `space`."""
    try:
        return escape(data.decode("utf-8")).replace(" ", space)
    except UnicodeDecodeError as error:
        bad = "".join(f"\\x{b:02X}" for b in data[error.start : error.end])
        return show_bytes(data[: error.start], space) + bad + show_bytes(data[error.end :], space)
