"""Phi-3's SentencePiece tokenizer (`tokenizer.model`) with its added tokens, encoded the way
microsoft/Phi-3-mini-4k-instruct's `tokenizer.json` does.

Text is split on special-token strings, each piece between them is encoded by SentencePiece on
its own, dummy-prefix "▁" included (the "legacy" Llama way), and tokens marked `rstrip` swallow
the whitespace after them: `"<|user|>\\nHi"` gives `<|user|>`, `▁Hi`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import sentencepiece as spm

from phi3lab.errors import bad_argument

# Added after the SentencePiece pieces, in this order: ids 32000..32010 for Phi-3.
ADDED_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
)
# The tokens Phi-3's tokenizer_config.json marks `rstrip: true`; all but `</s>` are `special`.
PHI3_RSTRIP_TOKENS = frozenset(["</s>", *ADDED_SPECIAL_TOKENS[1:]])
# Phi-3's tokenizer_config.json names these (a chat template sees them).
PHI3_TEMPLATE_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
}
# Rust's `char::is_whitespace`, which is what Hugging Face's `rstrip` swallows.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
# Appended to a serialized SentencePiece model: a second `normalizer_spec` (field 3) holding only
# `add_dummy_prefix` (its field 3) = false. Protobuf merges repeated occurrences of a message
# field, so the model loads with every other setting kept and no dummy prefix.
_NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])
_FLAGS = {"lstrip": False, "normalized": False, "single_word": False}


class SentencePieceBackend:
    """A SentencePiece model plus Phi-3's added tokens (see `TokenizerBackend`).

    `<unk>`, `<s>`, `</s>` keep their SentencePiece ids (0, 1, 2); the added tokens
    (`ADDED_SPECIAL_TOKENS`) take the ids after the pieces (32000..32010 for Phi-3) unless the
    model has them as pieces. `pad_token_id` is `<|endoftext|>`, `eos_token_id` `<|end|>` (end of
    a chat turn), `bos_token_id` `<s>`.

    Args:
        proto: a serialized SentencePiece model (`bytes`), or the path of one.
        rstrip_tokens: special tokens that swallow the whitespace after them. `None` means
            Phi-3's: all but `<unk>`, `<s>` and `<|endoftext|>`.
        template_tokens: the special-token strings of the checkpoint's tokenizer_config.json
            (`PHI3_TEMPLATE_TOKENS` when None).
        skipped_tokens: the tokens `decode(..., skip_special_tokens=True)` leaves out (those
            marked `special`); None means Phi-3's: every special token but `</s>`.
    """

    def __init__(
        self,
        proto: bytes | str | os.PathLike,
        rstrip_tokens: Iterable[str] | None = None,
        template_tokens: Mapping[str, str] | None = None,
        skipped_tokens: Iterable[str] | None = None,
    ):
        if isinstance(proto, (str, os.PathLike)) and Path(proto).is_file():
            proto = Path(proto).read_bytes()
        if not isinstance(proto, bytes):
            raise TypeError(
                "`proto` must be a serialized SentencePiece model (bytes) or its path; "
                f"received proto={str(proto)[:80]!r} of type {type(proto).__name__}."
            )
        self.proto, self._sp = proto, _load(proto)
        sp = self._sp
        if min(sp.unk_id(), sp.bos_id(), sp.eos_id()) < 0:
            raise ValueError("`proto` must define unk, bos and eos pieces (<unk>, <s>, </s>).")
        ids = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())}
        next_id = sp.get_piece_size()
        for token in ADDED_SPECIAL_TOKENS:
            piece_id = sp.piece_to_id(token)
            if piece_id != sp.unk_id() and sp.id_to_piece(piece_id) == token:
                ids[token] = piece_id  # e.g. a keras-hub vocabulary that holds them as pieces
            else:
                ids[token], next_id = next_id, next_id + 1
        self.special_tokens, self._special_by_id = ids, {i: t for t, i in ids.items()}
        self.vocabulary_size = next_id
        if rstrip_tokens is not None and (
            isinstance(rstrip_tokens, (str, bytes))
            or not isinstance(rstrip_tokens, Iterable)
            or not all(isinstance(t, str) for t in rstrip_tokens)
        ):
            raise bad_argument("rstrip_tokens", rstrip_tokens, f"None or special tokens (str), among {list(ids)}")
        rstrip = PHI3_RSTRIP_TOKENS if rstrip_tokens is None else frozenset(rstrip_tokens)
        if not rstrip <= ids.keys():
            raise bad_argument("rstrip_tokens", sorted(rstrip - ids.keys()), f"special tokens, among {list(ids)}")
        self.rstrip_tokens = rstrip
        self.skipped_tokens = frozenset(ids.keys() - {"</s>"} if skipped_tokens is None else skipped_tokens)
        self.template_tokens = dict(PHI3_TEMPLATE_TOKENS if template_tokens is None else template_tokens)
        self._split = re.compile("|".join(map(re.escape, sorted(ids, key=len, reverse=True))))
        self.unk_token_id, self.bos_token_id = sp.unk_id(), sp.bos_id()
        self.pad_token_id, self.eos_token_id = ids["<|endoftext|>"], ids["<|end|>"]
        # Phi-3's generation_config stops on any of these.
        self.stop_token_ids = (ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"])

    @functools.cached_property
    def _sp_in_context(self) -> spm.SentencePieceProcessor:
        return _load(self.proto + _NO_DUMMY_PREFIX)

    def encode(self, text: str) -> list[int]:
        return self._encode(text, self._sp)

    def encode_in_context(self, text: str) -> list[int]:
        """As `encode`, but the first piece gets no dummy prefix: `" Mary"` gives `▁Mary` alone,
        as inside "When Mary", and `"ary"` gives the pieces of a word's continuation."""
        return self._encode(text, self._sp_in_context)

    def _encode(self, text: str, first: spm.SentencePieceProcessor) -> list[int]:
        ids, start, strip, sp = [], 0, False, first
        for match in self._split.finditer(text):
            ids += _encode_plain(sp, text[start : match.start()], strip)
            ids.append(self.special_tokens[match.group()])
            start, strip, sp = match.end(), match.group() in self.rstrip_tokens, self._sp
        return ids + _encode_plain(sp, text[start:], strip)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """ "▁" becomes a space, consecutive byte pieces are joined as UTF-8 (an invalid run gives
        one U+FFFD per byte) and one leading space is dropped. Skipped tokens are left out before
        the bytes are joined, so a byte run around one stays whole, as in Hugging Face."""
        parts, run = [], bytearray()
        for token_id in ids:
            token = self.id_to_token(token_id)
            if skip_special_tokens and token in self.skipped_tokens:
                continue
            if self._is_byte(token_id):
                run.append(int(token[3:5], 16))
                continue
            parts += [_utf8(run), token.replace("▁", " ")]
            run = bytearray()
        text = "".join(parts) + _utf8(run)
        return text.removeprefix(" ")

    def id_to_token(self, token_id: int) -> str:
        return self._special_by_id.get(token_id) or self._sp.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_by_id:
            return self._special_by_id[token_id].encode()
        piece = self._sp.id_to_piece(token_id)
        return bytes([int(piece[3:5], 16)]) if self._sp.is_byte(token_id) else piece.replace("▁", " ").encode()

    def vocabulary(self) -> Iterable[str]:
        return [*self.special_tokens, *(self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))]

    def save_hf(self, directory: Path, chat_template: str) -> list[Path]:
        """Write Phi-3's Hugging Face tokenizer files (no `tokenizer.json`).

        `tokenizer_config.json` is Phi-3's but for `"legacy": true`. Phi-3 says `false`, yet its
        `tokenizer.json` encodes the legacy way; without that file, `true` makes transformers
        rebuild the same encoding from `tokenizer.model` (given the model's `config.json`,
        model_type "phi3", in the directory too).
        """
        decoder = {
            str(i): {"content": t, **_FLAGS, "rstrip": t in self.rstrip_tokens, "special": t in self.skipped_tokens}
            for i, t in sorted(self._special_by_id.items())
        }
        tokens = self.template_tokens
        config = {
            "add_bos_token": False,
            "add_eos_token": False,
            "added_tokens_decoder": decoder,
            "bos_token": tokens["bos_token"],
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": tokens["eos_token"],
            "legacy": True,
            "pad_token": tokens["pad_token"],
            "padding_side": "left",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": tokens["unk_token"],
            "use_default_system_prompt": False,
        }
        added = {t: i for i, t in self._special_by_id.items() if i >= self._sp.get_piece_size()}
        special_map = {
            key: {"content": tokens[key], **_FLAGS, "rstrip": False}
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        written = [directory / "tokenizer.model"]
        written[0].write_bytes(self.proto)
        for name, content in (
            ("tokenizer_config.json", config),
            ("added_tokens.json", added),
            ("special_tokens_map.json", special_map),
        ):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
            written.append(directory / name)
        return written

    def _is_byte(self, token_id: int) -> bool:
        return token_id not in self._special_by_id and self._sp.is_byte(token_id)


def _load(proto: bytes) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as error:  # depending on the damage
        raise ValueError(f"`proto` is not a SentencePiece model: {error}") from None
    return processor


def _encode_plain(sp: spm.SentencePieceProcessor, text: str, strip: bool) -> list[int]:
    text = text.lstrip(_WHITESPACE) if strip else text
    return sp.encode(text) if text else []


def _utf8(run: bytearray) -> str:
    """Bytes as text; as Hugging Face's ByteFallback, an invalid run gives U+FFFD per byte."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)
