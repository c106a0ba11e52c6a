"""Byte-level BPE tokenizers shipped as `tokenizer.json` (Phi-4-mini, Phi-4), run by the
`tokenizers` library, the Rust implementation transformers uses.

Such a file holds a BPE model over GPT-2's byte alphabet (each byte of UTF-8 text is one
character: a space is "Ġ", a newline "Ċ"), a regex pre-tokenizer (Phi-4: GPT-4's cl100k pattern;
Phi-4-mini: GPT-4o's o200k pattern) followed by `ByteLevel(use_regex=False)`, a `ByteLevel`
decoder, and the added tokens with their `lstrip` / `rstrip` / `special` flags.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders

_TRANSFORMERS_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
_FLAG_NAMES = ("lstrip", "rstrip", "normalized", "single_word", "special")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte: the printable Latin-1 bytes stand for
    themselves, the other 68 bytes, in increasing order, for U+0100, U+0101, ...

    Example:
    >>> byte_level_alphabet()["Ġ"], byte_level_alphabet()["a"]
    (32, 97)
    """
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = sorted(set(range(256)) - set(kept))
    return {chr(b): b for b in kept} | {chr(0x100 + i): b for i, b in enumerate(others)}


_BYTES = byte_level_alphabet()


class ByteLevelBPEBackend:
    """A byte-level BPE `tokenizers.Tokenizer` with a checkpoint's special tokens (see
    `TokenizerBackend`).

    Args:
        tokenizer: the `tokenizers.Tokenizer` (from `tokenizer.json`); its decoder must be
            `ByteLevel`. It is changed in place by `added_tokens`.
        added_tokens: tokenizer_config.json's `added_tokens_decoder` (id -> {"content", flags}).
            As in transformers, an entry whose token is missing from `tokenizer` or whose flags
            differ is added with the config's flags, and must keep its id.
        template_tokens: tokenizer_config.json's `bos_token`, `eos_token`, `pad_token`,
            `unk_token` (strings); `eos_token` is required and ends a chat turn.
        stop_token_ids: the ids that end generation besides `eos_token`'s
            (generation_config.json's `eos_token_id`).
        clean_up_tokenization_spaces: transformers' clean-up after decoding (" ." -> ".", ...).
        source: the file's name, for messages.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        added_tokens: Mapping[int | str, Mapping] | None = None,
        template_tokens: Mapping[str, str] | None = None,
        stop_token_ids: Iterable[int] = (),
        clean_up_tokenization_spaces: bool = False,
        source: str = "tokenizer.json",
    ):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"`tokenizer` must be a tokenizers.Tokenizer; received {type(tokenizer).__name__}.")
        if not isinstance(tokenizer.decoder, decoders.ByteLevel):
            raise ValueError(
                f"{source} must be a byte-level BPE tokenizer (a ByteLevel decoder, as Phi-4's); "  # noqa: TRY004
                f"its decoder is {type(tokenizer.decoder).__name__!r}."
            )
        self._tokenizer, self._source = tokenizer, source
        for token_id, entry in sorted((added_tokens or {}).items(), key=lambda item: int(item[0])):
            self._add(int(token_id), entry)
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {token.content: token_id for token_id, token in sorted(added.items())}
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self.vocabulary_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.template_tokens = {k: v for k, v in (template_tokens or {}).items() if v is not None}
        ids = {key: self._named_id(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if ids["eos_token"] is None:
            raise ValueError(
                f"The tokenizer of {source} needs an `eos_token` (the end of a chat turn) in tokenizer_config.json."
            )
        self.eos_token_id, self.bos_token_id, self.unk_token_id = ids["eos_token"], ids["bos_token"], ids["unk_token"]
        self.pad_token_id = self.eos_token_id if ids["pad_token"] is None else ids["pad_token"]
        self.stop_token_ids = tuple(dict.fromkeys([self.eos_token_id, *map(int, stop_token_ids)]))
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)

    def _add(self, token_id: int, entry: Mapping) -> None:
        content = entry.get("content") if isinstance(entry, Mapping) else None
        if not isinstance(content, str):
            raise ValueError(
                f"tokenizer_config.json's added_tokens_decoder[{token_id}] must be a dict with a str "  # noqa: TRY004
                f"'content'; received {entry!r}."
            )
        flags = {name: bool(entry.get(name, name == "normalized" and not entry.get("special"))) for name in _FLAG_NAMES}
        current = self._tokenizer.get_added_tokens_decoder().get(self._tokenizer.token_to_id(content))
        if current is None or any(getattr(current, name) != value for name, value in flags.items()):
            self._tokenizer.add_tokens([AddedToken(content, **flags)])
        if self._tokenizer.token_to_id(content) != token_id:
            raise ValueError(
                f"tokenizer_config.json gives the added token {content!r} the id {token_id}; "
                f"{self._source} gives it {self._tokenizer.token_to_id(content)}."
            )

    def _named_id(self, key: str) -> int | None:
        token = self.template_tokens.get(key)
        if token is None:
            return None
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer_config.json names {key}={token!r}, which {self._source} does not hold.")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_in_context(self, text: str) -> list[int]:
        """Byte-level BPE has no dummy prefix: a text's ids are the same inside a longer text,
        where the pre-tokenizer splits there (" Mary" after "When" is one piece, "ĠMary")."""
        return self.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for before, after in _TRANSFORMERS_CLEANUP:
                text = text.replace(before, after)
        return text

    def id_to_token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id) or ""

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Each character of the alphabet is its byte, any other its UTF-8 (as the ByteLevel
        decoder reads added tokens such as `<｜PAD▁TOKEN｜>`)."""
        return b"".join(bytes([_BYTES[c]]) if c in _BYTES else c.encode() for c in self.id_to_token(token_id))

    def vocabulary(self) -> Iterable[str]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def save_hf(self, directory: Path, chat_template: str) -> list[Path]:
        """Write `tokenizer.json` and a `tokenizer_config.json` (added tokens with their flags,
        the special-token names, the chat template)."""
        decoder = {
            str(i): {"content": t.content, **{name: getattr(t, name) for name in _FLAG_NAMES}}
            for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())
        }
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            **self.template_tokens,
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "tokenizer_class": "GPT2Tokenizer",
        }
        written = [directory / "tokenizer.json", directory / "tokenizer_config.json"]
        self._tokenizer.save(str(written[0]))
        written[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return written
