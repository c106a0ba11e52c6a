"""Phi-3's tokenizer: SentencePiece plus Phi-3's special tokens, chat format and file layouts.

Encoding matches `transformers.AutoTokenizer` on microsoft/Phi-3-mini-4k-instruct (its
`tokenizer.json`): text is split on special-token strings, each piece between them is encoded
by SentencePiece on its own, dummy-prefix "▁" included (the "legacy" Llama way), and tokens
marked `rstrip` swallow the whitespace after them: `"<|user|>\\nHi"` gives `<|user|>`, `▁Hi`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from phi3lab.checks import check_positive_int
from phi3lab.errors import bad_argument, close_matches

# Added after the SentencePiece pieces, in this order: ids 32000..32010 for Phi-3.
ADDED_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)
# The tokens Phi-3's tokenizer_config.json marks `rstrip: true`.
PHI3_RSTRIP_TOKENS = frozenset(["</s>", *ADDED_SPECIAL_TOKENS[1:]])
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (  # Phi-3-mini-4k-instruct's, for save_hf.
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n'"
    " + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Rust's `char::is_whitespace`, which is what Hugging Face's `rstrip` swallows.
_WHITESPACE = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))
)
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_KERAS_VOCAB = Path("assets", "tokenizer", "vocabulary.spm")
_HF_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json",
             "special_tokens_map.json")


class Phi3Tokenizer:
    """SentencePiece tokenizer with Phi-3's special tokens and chat format.

    `<unk>`, `<s>`, `</s>` keep their SentencePiece ids (0, 1, 2); the added tokens
    (`ADDED_SPECIAL_TOKENS`) take the ids after the pieces (32000..32010 for Phi-3) unless the
    model has them as pieces. All are single ids inside text. `pad_token_id` is `<|endoftext|>`,
    `eos_token_id` `<|end|>` (end of a chat turn), `bos_token_id` `<s>`. `vocabulary_size` is
    32011 for Phi-3; the model's embedding has 32064 rows, the last ones unused.

    Args:
        proto: a serialized SentencePiece model (`bytes`), or the path of one.
        rstrip_tokens: special tokens that swallow the whitespace after them. `None` means
            Phi-3's: all but `<unk>`, `<s>` and `<|endoftext|>`.

    Example:
    >>> tok = Phi3Tokenizer.from_preset("/models/Phi-3-mini-4k-instruct")
    >>> tok.encode("<|user|>\\nHello<|end|>\\n<|assistant|>\\n")
    [32010, 15043, 32007, 32001]
    """

    def __init__(self, proto: bytes | str | os.PathLike,
                 rstrip_tokens: Iterable[str] | None = None):
        if isinstance(proto, (str, os.PathLike)) and Path(proto).is_file():
            proto = Path(proto).read_bytes()
        if not isinstance(proto, bytes):
            raise TypeError("`proto` must be a serialized SentencePiece model (bytes) or its path; "
                            f"received proto={str(proto)[:80]!r} of type {type(proto).__name__}.")
        self.proto, self._sp = proto, spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception as error:  # RuntimeError or OSError, depending on the damage
            raise ValueError(f"`proto` is not a SentencePiece model: {error}") from None
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
        self._special_ids, self._special_tokens = ids, {i: t for t, i in ids.items()}
        self.vocabulary_size = next_id
        if rstrip_tokens is not None and (isinstance(rstrip_tokens, (str, bytes)) or not isinstance(
                rstrip_tokens, Iterable) or not all(isinstance(t, str) for t in rstrip_tokens)):
            raise bad_argument("rstrip_tokens", rstrip_tokens, f"None or special tokens (str), among {list(ids)}")
        rstrip = PHI3_RSTRIP_TOKENS if rstrip_tokens is None else frozenset(rstrip_tokens)
        if not rstrip <= ids.keys():
            raise bad_argument("rstrip_tokens", sorted(rstrip - ids.keys()),
                               f"special tokens, among {list(ids)}")
        self.rstrip_tokens = rstrip
        self._split = re.compile("|".join(map(re.escape, sorted(ids, key=len, reverse=True))))
        self.unk_token_id, self.bos_token_id = sp.unk_id(), sp.bos_id()
        self.pad_token_id, self.eos_token_id = ids["<|endoftext|>"], ids["<|end|>"]
        # Phi-3's generation_config stops on any of these.
        self.stop_token_ids = (ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"])

    @classmethod
    def from_preset(cls, preset: str | os.PathLike) -> Phi3Tokenizer:
        """Load the tokenizer of a preset directory or of a built-in preset name.

        A directory holds a keras-hub preset (`assets/tokenizer/vocabulary.spm`) or a Hugging
        Face tokenizer (`tokenizer.model`; the ids in `added_tokens.json` and
        `tokenizer_config.json` are checked, the `rstrip` flags of the latter used). Other
        names go to `phi3lab.presets.resolve_preset_dir`.

        Args:
            preset: a directory, or the name of a built-in preset.

        Example:
        >>> tok = Phi3Tokenizer.from_preset("/models/Phi-3-mini-4k-instruct")
        """
        if not isinstance(preset, (str, os.PathLike)):
            raise TypeError("`preset` must be a directory or a preset name (str); received "
                            f"preset={preset!r} of type {type(preset).__name__}.")
        path = Path(preset)
        if not path.is_dir():
            try:
                from phi3lab.presets import resolve_preset_dir
            except ImportError:
                raise bad_argument("preset", str(preset), "an existing directory (no preset "
                                   "registry, phi3lab.presets.resolve_preset_dir, is installed)"
                                   ) from None
            path = Path(resolve_preset_dir(str(preset)))
        if (path / _KERAS_VOCAB).is_file():
            return cls((path / _KERAS_VOCAB).read_bytes())
        if not (path / "tokenizer.model").is_file():
            held = sorted(p.name for p in path.iterdir())[:20]
            raise ValueError(f"`preset` must hold a keras-hub vocabulary ({_KERAS_VOCAB}) or a "
                             f"Hugging Face tokenizer.model; received preset={str(preset)!r}, "
                             f"a directory holding {held}.")
        decoder = _read_json(path / "tokenizer_config.json").get("added_tokens_decoder", {})
        rstrip = {t["content"] for t in decoder.values() if t.get("rstrip")} if decoder else None
        tokenizer = cls((path / "tokenizer.model").read_bytes(), rstrip_tokens=rstrip)
        pairs = [(t["content"], int(i)) for i, t in decoder.items()]
        for token, token_id in pairs + list(_read_json(path / "added_tokens.json").items()):
            if tokenizer._special_ids.get(token) != token_id:
                raise ValueError(f"{path} gives the added token {token!r} the id {token_id}; this "
                                 f"tokenizer.model supports only {tokenizer.special_tokens}.")
        return tokenizer

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token, mapped to its id."""
        return dict(self._special_ids)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Encode a string to token ids, special-token strings as single ids.

        Args:
            text: the string.
            add_bos: start with `<s>`. Phi-3's Hugging Face tokenizer does not
                (`add_bos_token: false`), hence the default.

        Example:
        >>> tok.encode("Hello world")
        [15043, 3186]
        """
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; received text={text!r} of type "
                            f"{type(text).__name__}.")
        if not isinstance(add_bos, (bool, np.bool_)):
            raise bad_argument("add_bos", add_bos, "True or False")
        ids = [self.bos_token_id] if add_bos else []
        start, strip = 0, False
        for match in self._split.finditer(text):
            ids += self._encode_plain(text[start:match.start()], strip)
            ids.append(self._special_ids[match.group()])
            start, strip = match.end(), match.group() in self.rstrip_tokens
        return ids + self._encode_plain(text[start:], strip)

    def _encode_plain(self, text: str, strip: bool) -> list[int]:
        text = text.lstrip(_WHITESPACE) if strip else text
        return self._sp.encode(text) if text else []

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     padding: str | int = "longest",
                     padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Encode strings into a padded `int32` id array and a `bool` padding mask.

        Args:
            texts: a list of strings.
            add_bos: start every sequence with `<s>`.
            padding: `"longest"`, or a length (no sequence may be longer).
            padding_side: `"right"`, or `"left"` for generation.

        Returns:
            `(token_ids, padding_mask)`, `[len(texts), length]`; padding is `pad_token_id`.

        Example:
        >>> token_ids, padding_mask = tok.encode_batch(["Hi", "Hello there"], padding=8)
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise bad_argument("texts", texts, "a list of str (`encode` takes one string)")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"`texts[{index}]` must be a str; received {text!r} of type "
                                f"{type(text).__name__}.")
        if padding_side not in ("right", "left"):
            raise bad_argument("padding_side", padding_side, '"right" or "left"')
        encoded = [self.encode(text, add_bos=add_bos) for text in texts]
        longest = max(map(len, encoded), default=0)
        if padding != "longest" and (isinstance(padding, str)
                                     or check_positive_int("padding", padding) < longest):
            raise bad_argument("padding", padding, f'"longest" or an int >= {longest} (longest)')
        length = longest if padding == "longest" else int(padding)
        token_ids = np.full((len(encoded), length), self.pad_token_id, dtype=np.int32)
        padding_mask = np.zeros((len(encoded), length), dtype=bool)
        for row, ids in enumerate(encoded):
            cols = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), None)
            token_ids[row, cols], padding_mask[row, cols] = ids, True
        return token_ids, padding_mask

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text, the way Hugging Face's Phi-3 tokenizer does.

        "▁" becomes a space, byte pieces are joined as UTF-8 (an invalid run gives one
        U+FFFD per byte) and one leading space is dropped.

        Args:
            ids: a 1-D list or array of token ids.
            skip_special_tokens: leave out the tokens Phi-3 marks special (all but `</s>`).

        Example:
        >>> tok.decode([15043, 3186])
        'Hello world'
        """
        if not isinstance(skip_special_tokens, (bool, np.bool_)):
            raise bad_argument("skip_special_tokens", skip_special_tokens, "True or False")
        parts, run = [], bytearray()
        for token_id in self._check_ids(ids):
            if self._is_byte(token_id):
                run.append(int(self._sp.id_to_piece(token_id)[3:5], 16))
                continue
            parts.append(_utf8(run))
            run = bytearray()
            token = self.id_to_token(token_id)
            if not (skip_special_tokens and token in self._special_ids and token != "</s>"):
                parts.append(token.replace("▁", " "))
        text = "".join(parts) + _utf8(run)
        return text[1:] if text.startswith(" ") else text

    def id_to_token(self, id: int) -> str:
        """The piece or special token of an id: `"▁Hello"`, `"<0x0A>"`, `"<|user|>"`."""
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise bad_argument("id", id, f"an int in [0, {self.vocabulary_size})")
        self._check_ids([id])
        return self._special_tokens.get(int(id)) or self._sp.id_to_piece(int(id))

    def token_to_id(self, token: str) -> int:
        """The id of a piece or special token (a `ValueError` for other strings)."""
        if not isinstance(token, str):
            raise bad_argument("token", token, "a str")
        if token in self._special_ids:
            return self._special_ids[token]
        token_id = self._sp.piece_to_id(token)
        if self._sp.id_to_piece(token_id) != token:
            pieces = (self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size()))
            near = close_matches(token, [*self._special_ids, *pieces])
            raise bad_argument("token", token, f"a piece of the vocabulary, such as {near}")
        return token_id

    def display_tokens(self, ids: Sequence[int] | np.ndarray, space: str = " ",
                       beyond_vocabulary: str | None = None) -> list[str]:
        """Readable strings for token ids, one per id, for tables and widgets.

        "▁" shows as `space` (a real space by default; `"␣"` makes it visible). Byte pieces
        show as their ASCII character, or as `\\xNN` for bytes of multi-byte characters.
        Non-printable characters are escaped (`<0x0A>` shows as `\\n`, U+3000 as `\\u3000`).
        Special tokens stay as they are.

        Args:
            ids: a 1-D list or array of token ids.
            space: what to show for SentencePiece's "▁".
            beyond_vocabulary: None (ids past the tokenizer's vocabulary are
                an error), or a format such as `"<unused {}>"` for them: a
                model's embedding may have more rows than the tokenizer has
                ids (Phi-3: 32064 rows, 32011 ids), and a logit lens can rank
                those rows.

        Example:
        >>> tok.display_tokens(tok.encode("Hi\\n<|end|>"))
        [' Hi', '\\\\n', '<|end|>']
        """
        if not isinstance(space, str):
            raise bad_argument("space", space, "a str")
        if beyond_vocabulary is not None and not isinstance(beyond_vocabulary, str):
            raise bad_argument("beyond_vocabulary", beyond_vocabulary, 'None or a format string like "<unused {}>"')
        shown = []
        for token_id in self._check_ids(ids, bounded=beyond_vocabulary is None):
            if token_id >= self.vocabulary_size:
                shown.append(beyond_vocabulary.format(token_id))
                continue
            token = self.id_to_token(token_id)
            if token_id in self._special_tokens:
                shown.append(token)
            elif self._is_byte(token_id):
                shown.append(_escape(chr(int(token[3:5], 16))) if token[3] < "8" else
                             f"\\x{token[3:5]}")
            else:
                shown.append(_escape(token).replace("▁", space))
        return shown

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Format chat messages as Phi-3-mini-4k-instruct's chat template does.

        Each message becomes `<|role|>\\n{content}<|end|>\\n`, followed by `<|assistant|>\\n`
        if `add_generation_prompt`, else by `<|endoftext|>` (the template's `eos_token`).

        Args:
            messages: dicts with a `"role"` (`"system"`, `"user"` or `"assistant"`) and a
                str `"content"`.
            add_generation_prompt: end by opening the assistant's turn.

        Example:
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
        '<|user|>\\nHi<|end|>\\n<|assistant|>\\n'
        """
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or (
                not messages):
            raise bad_argument("messages", messages, 'a non-empty list of {"role", "content"} '
                               "dicts")
        if not isinstance(add_generation_prompt, (bool, np.bool_)):
            raise bad_argument("add_generation_prompt", add_generation_prompt, "True or False")
        parts = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
                raise bad_argument(f"messages[{index}]", message, 'a dict with a str "content"')
            if message.get("role") not in CHAT_ROLES:
                raise bad_argument(f"messages[{index}]['role']", message.get("role"),
                                   f"one of {CHAT_ROLES}")
            parts.append(f"<|{message['role']}|>\n{message['content']}<|end|>\n")
        parts.append("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")
        return "".join(parts)

    def save_assets(self, directory: str | os.PathLike) -> Path:
        """Write the SentencePiece model to `assets/tokenizer/vocabulary.spm` (keras-hub)."""
        path = Path(directory) / _KERAS_VOCAB
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.proto)
        return path

    def save_hf(self, directory: str | os.PathLike) -> list[Path]:
        """Write Phi-3's Hugging Face tokenizer files (`_HF_FILES`; no `tokenizer.json`).

        `tokenizer_config.json` is Phi-3's but for `"legacy": true`. Phi-3 says `false`, yet
        its `tokenizer.json` encodes the legacy way; without that file, `true` makes
        transformers rebuild the same encoding from `tokenizer.model` (given the model's
        `config.json`, model_type "phi3", in the directory too).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        flags = {"lstrip": False, "normalized": False, "single_word": False}
        decoder = {str(i): {"content": t, **flags, "rstrip": t in self.rstrip_tokens,
                            "special": t != "</s>"}
                   for i, t in sorted(self._special_tokens.items())}
        config = {
            "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
            "bos_token": "<s>", "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": True,
            "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
        added = {t: i for i, t in self._special_tokens.items() if i >= self._sp.get_piece_size()}
        special_map = {key: {"content": t, **flags, "rstrip": False} for key, t in (
            ("bos_token", "<s>"), ("eos_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>"),
            ("unk_token", "<unk>"))}
        (directory / "tokenizer.model").write_bytes(self.proto)
        for name, content in zip(_HF_FILES[1:], (config, added, special_map)):
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        return [directory / name for name in _HF_FILES]

    def _is_byte(self, token_id: int) -> bool:
        return token_id not in self._special_tokens and self._sp.is_byte(token_id)

    def _check_ids(self, ids, bounded: bool = True) -> list[int]:
        try:
            array = np.asarray(ids)
        except (TypeError, ValueError):
            raise bad_argument("ids", ids, "a 1-D sequence of int token ids") from None
        if array.size == 0:
            return []
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise bad_argument("ids", ids, "a 1-D sequence of int token ids")
        bad = array[(array < 0) | (bounded & (array >= self.vocabulary_size))]
        if bad.size:
            accepted = f"[0, {self.vocabulary_size})" if bounded else "non-negative"
            raise bad_argument("ids", ids, f"token ids in {accepted}; {int(bad[0])} is not")
        return array.tolist()


def _escape(text: str) -> str:
    """Non-printable characters as escapes: "\\n", "\\t", "\\r", "\\x1C", "\\u3000"."""
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or (
        f"\\x{ord(c):02X}" if ord(c) < 256 else f"\\u{ord(c):04X}") for c in text)


def _utf8(run: bytearray) -> str:
    """Bytes as text; as Hugging Face's ByteFallback, an invalid run gives U+FFFD per byte."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
