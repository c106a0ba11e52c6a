"""`Phi3Tokenizer`: the tokenizer of every Phi-3-family checkpoint, behind one interface.

Phi-3 and Phi-3.5 ship a SentencePiece `tokenizer.model`; Phi-4-mini and Phi-4 a byte-level
BPE `tokenizer.json`. `Phi3Tokenizer.from_preset(directory)` picks the backend from what the
directory holds (`phi3lab.tokenization`); both encode, decode and format chats exactly as
`transformers.AutoTokenizer` on the same files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from phi3lab.checks import check_positive_int, check_token_ids
from phi3lab.errors import bad_argument, close_matches
from phi3lab.tokenization.backend import TokenizerBackend, show_bytes
from phi3lab.tokenization.chat_template import (
    CHAT_ROLES,
    PHI3_CHAT_TEMPLATE,
    ChatTemplateError,
    check_messages,
    render_chat_template,
)
from phi3lab.tokenization.hf_files import KERAS_VOCAB, load_backend, preset_directory
from phi3lab.tokenization.sentencepiece_backend import (
    ADDED_SPECIAL_TOKENS,
    PHI3_RSTRIP_TOKENS,
    SentencePieceBackend,
)

__all__ = ["ADDED_SPECIAL_TOKENS", "CHAT_ROLES", "PHI3_RSTRIP_TOKENS", "ChatTemplateError", "Phi3Tokenizer"]


class Phi3Tokenizer:
    """Phi-3-family tokenizer: special tokens, chat template, and readable token strings.

    Built from a SentencePiece model it is Phi-3's tokenizer: `<unk>`, `<s>`, `</s>` keep their
    ids (0, 1, 2), Phi-3's added tokens (`ADDED_SPECIAL_TOKENS`) follow the pieces (32000..32010),
    `pad_token_id` is `<|endoftext|>`, `eos_token_id` `<|end|>` (end of a chat turn),
    `vocabulary_size` 32011 (the model's embedding has 32064 rows, the last ones unused).
    `from_preset` also reads Hugging Face directories, among them Phi-4-mini's and Phi-4's
    byte-level BPE `tokenizer.json`, with the special tokens, flags and chat template of their
    tokenizer_config.json.

    Args:
        proto: a serialized SentencePiece model (`bytes`), or the path of one.
        rstrip_tokens: special tokens that swallow the whitespace after them. `None` means
            Phi-3's: all but `<unk>`, `<s>` and `<|endoftext|>`.
        chat_template: a Jinja chat template; None means Phi-3's.

    Example:
    >>> tok = Phi3Tokenizer.from_preset("/models/Phi-3-mini-4k-instruct")
    >>> tok.encode("<|user|>\\nHello<|end|>\\n<|assistant|>\\n")
    [32010, 15043, 32007, 32001]
    """

    def __init__(
        self,
        proto: bytes | str | os.PathLike,
        rstrip_tokens: Iterable[str] | None = None,
        chat_template: str | None = None,
    ):
        self._bind(SentencePieceBackend(proto, rstrip_tokens), chat_template)

    @classmethod
    def from_backend(cls, backend: TokenizerBackend, chat_template: str | None = None) -> Phi3Tokenizer:
        """A tokenizer over any `phi3lab.tokenization.backend.TokenizerBackend`.

        Args:
            backend: e.g. a `ByteLevelBPEBackend` over a `tokenizers.Tokenizer`.
            chat_template: a Jinja chat template; None means Phi-3's.

        Example:
        >>> from tokenizers import Tokenizer
        >>> from phi3lab.tokenization.bpe_backend import ByteLevelBPEBackend
        >>> backend = ByteLevelBPEBackend(Tokenizer.from_file("tokenizer.json"),
        ...                               template_tokens={"eos_token": "<|im_end|>"})
        >>> tok = Phi3Tokenizer.from_backend(backend)
        """
        if not isinstance(backend, TokenizerBackend):
            raise bad_argument("backend", backend, "a TokenizerBackend (phi3lab.tokenization.backend)")
        tokenizer = cls.__new__(cls)
        tokenizer._bind(backend, chat_template)
        return tokenizer

    def _bind(self, backend: TokenizerBackend, chat_template: str | None) -> None:
        if chat_template is not None and not isinstance(chat_template, str):
            raise bad_argument("chat_template", chat_template, "None or a Jinja template (str)")
        self._backend = backend
        self.chat_template = PHI3_CHAT_TEMPLATE if chat_template is None else chat_template
        self.has_own_chat_template = chat_template is not None
        self.vocabulary_size = backend.vocabulary_size
        self.bos_token_id, self.eos_token_id = backend.bos_token_id, backend.eos_token_id
        self.pad_token_id, self.unk_token_id = backend.pad_token_id, backend.unk_token_id
        self.stop_token_ids = tuple(backend.stop_token_ids)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike) -> Phi3Tokenizer:
        """Load the tokenizer of a preset directory or of a built-in preset name.

        A directory holds a keras-hub preset (`assets/tokenizer/vocabulary.spm`), or a Hugging
        Face tokenizer: `tokenizer.model` (SentencePiece: Phi-3, Phi-3.5; the ids in
        `added_tokens.json` and `tokenizer_config.json` are checked, the `rstrip` flags of the
        latter used) or else `tokenizer.json` (byte-level BPE: Phi-4-mini, Phi-4; added tokens
        and their flags from `tokenizer_config.json` as transformers applies them, stop tokens
        from `generation_config.json`). The chat template is `chat_template.jinja`, else
        tokenizer_config.json's, else Phi-3's. Other names go to
        `phi3lab.presets.resolve_preset_dir`.

        Args:
            preset: a directory, or the name of a built-in preset.

        Example:
        >>> tok = Phi3Tokenizer.from_preset("/models/Phi-4-mini-instruct")
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
        '<|user|>Hi<|end|><|assistant|>'
        """
        return cls.from_backend(*load_backend(preset_directory(preset)))

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every added (control) token, mapped to its id."""
        return dict(self._backend.special_tokens)

    @property
    def rstrip_tokens(self) -> frozenset[str]:
        """The SentencePiece special tokens that swallow the whitespace after them."""
        return getattr(self._backend, "rstrip_tokens", frozenset())

    @property
    def proto(self) -> bytes:
        """The serialized SentencePiece model (SentencePiece tokenizers only)."""
        if not isinstance(self._backend, SentencePieceBackend):
            raise AttributeError("`proto` is the SentencePiece model; this tokenizer is byte-level BPE.")  # noqa: TRY004
        return self._backend.proto

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Encode a string to token ids, special-token strings as single ids.

        Args:
            text: the string.
            add_bos: start with the BOS token (`<s>`; Phi-4: `<|endoftext|>`). The Hugging
                Face tokenizers of the family do not (`add_bos_token: false`), hence the default.

        Example:
        >>> tok.encode("Hello world")
        [15043, 3186]
        """
        self._check_text(text)
        if not isinstance(add_bos, (bool, np.bool_)):
            raise bad_argument("add_bos", add_bos, "True or False")
        if add_bos and self.bos_token_id is None:
            raise bad_argument("add_bos", add_bos, "False: this tokenizer names no bos_token")
        return ([self.bos_token_id] if add_bos else []) + self._backend.encode(text)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, padding: str | int = "longest", padding_side: str = "right"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode strings into a padded `int32` id array and a `bool` padding mask.

        Args:
            texts: a list of strings.
            add_bos: start every sequence with the BOS token.
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
                raise TypeError(f"`texts[{index}]` must be a str; received {text!r} of type {type(text).__name__}.")
        if padding_side not in ("right", "left"):
            raise bad_argument("padding_side", padding_side, '"right" or "left"')
        encoded = [self.encode(text, add_bos=add_bos) for text in texts]
        longest = max(map(len, encoded), default=0)
        if padding != "longest" and (isinstance(padding, str) or check_positive_int("padding", padding) < longest):
            raise bad_argument("padding", padding, f'"longest" or an int >= {longest} (longest)')
        length = longest if padding == "longest" else int(padding)
        token_ids = np.full((len(encoded), length), self.pad_token_id, dtype=np.int32)
        padding_mask = np.zeros((len(encoded), length), dtype=bool)
        for row, ids in enumerate(encoded):
            cols = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), None)
            token_ids[row, cols], padding_mask[row, cols] = ids, True
        return token_ids, padding_mask

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Turn token ids back into text, as the Hugging Face tokenizer of the same files does.

        SentencePiece: "▁" becomes a space, byte pieces are joined as UTF-8 (an invalid run
        gives one U+FFFD per byte) and one leading space is dropped. Byte-level BPE: the bytes
        of all tokens joined as UTF-8.

        Args:
            ids: a 1-D list or array of token ids.
            skip_special_tokens: leave out the tokens the checkpoint marks special (Phi-3: all
                added tokens but `</s>`).

        Example:
        >>> tok.decode([15043, 3186])
        'Hello world'
        """
        if not isinstance(skip_special_tokens, (bool, np.bool_)):
            raise bad_argument("skip_special_tokens", skip_special_tokens, "True or False")
        return self._backend.decode(self._check_ids(ids), bool(skip_special_tokens))

    def id_to_token(self, id: int) -> str:
        """The vocabulary entry of an id: `"▁Hello"` (SentencePiece), `"ĠHello"` (byte-level
        BPE), `"<0x0A>"`, `"<|user|>"`."""
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)):
            raise bad_argument("id", id, f"an int in [0, {self.vocabulary_size})")
        check_token_ids("id", id, self.vocabulary_size, ndim=0)
        return self._backend.id_to_token(int(id))

    def token_to_id(self, token: str) -> int:
        """The id of a vocabulary entry (`id_to_token`'s inverse; a `ValueError` for other
        strings: `to_single_token` takes text)."""
        if not isinstance(token, str):
            raise bad_argument("token", token, "a str")
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            near = close_matches(token, self._backend.vocabulary())
            raise bad_argument("token", token, f"a piece of the vocabulary, such as {near}")
        return token_id

    def to_single_token(self, text: str) -> int:
        """The id of the one token `text` is inside a longer text, or a `ValueError`.

        `text` is taken as it appears after other text: `" Mary"` is the token of "Mary" after
        a space inside a sentence (`▁Mary` for SentencePiece, `ĠMary` for byte-level BPE),
        `"Mary"` the token of "Mary" glued to what precedes it. (`encode(" Mary")` encodes a
        whole text, to which SentencePiece adds its dummy-prefix "▁": `▁`, `▁Mary`.)

        Args:
            text: the text of one token.

        Raises:
            ValueError: `text` is not exactly one token; the message names the tokens it became.

        Example:
        >>> tok.to_single_token(" Mary") == tok.encode("When Mary")[-1]
        True
        """
        self._check_text(text)
        ids = self._backend.encode_in_context(text)
        if len(ids) != 1:
            shown = [self._backend.id_to_token(i) for i in ids]
            hint = ""
            if text[:1] != " " and len(self._backend.encode_in_context(" " + text)) == 1:
                hint = f" ({' ' + text!r} is one token: a word after a space starts with the space)"
            raise ValueError(
                f"`text` must be exactly one token inside a text; received text={text!r}, which is "
                f"{len(ids)} tokens: {shown}{hint}."
            )
        return ids[0]

    def to_str_tokens(self, inputs: str | Sequence[int] | np.ndarray, add_bos: bool = False) -> list[str]:
        """The text of each token of a string or of token ids (TransformerLens' `to_str_tokens`).

        Each token gives the text it stands for in a sequence: `▁Mary` and `ĠMary` give
        `" Mary"`, special tokens their string; a token holding part of a character's bytes
        gives U+FFFD for them. Joined, they give the decoded text (SentencePiece: with the
        dummy-prefix space kept).

        Args:
            inputs: a string (encoded with `encode`) or a 1-D sequence of token ids.
            add_bos: for a string, start with the BOS token.

        Example:
        >>> tok.to_str_tokens("When Mary and John")
        [' When', ' Mary', ' and', ' John']
        """
        ids = self.encode(inputs, add_bos=add_bos) if isinstance(inputs, str) else self._check_ids(inputs)
        return [self._backend.token_bytes(i).decode("utf-8", errors="replace") for i in ids]

    def display_tokens(
        self, ids: Sequence[int] | np.ndarray, space: str = " ", beyond_vocabulary: str | None = None
    ) -> list[str]:
        """Readable strings for token ids, one per id, for tables and widgets.

        A space (SentencePiece's "▁", byte-level BPE's "Ġ") shows as `space` (a real space by
        default; `"␣"` makes it visible). Bytes of a character split over several tokens show
        as `\\xNN`; non-printable characters are escaped (`<0x0A>` and `Ċ` show as `\\n`,
        U+3000 as `\\u3000`). Special tokens stay as they are.

        Args:
            ids: a 1-D list or array of token ids.
            space: what to show for a space.
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
        return [
            beyond_vocabulary.format(i) if i >= self.vocabulary_size else self._display(i, space)
            for i in self._check_ids(ids, bounded=beyond_vocabulary is None)
        ]

    def _display(self, token_id: int, space: str) -> str:
        token = self._backend.id_to_token(token_id)
        return (
            token if token in self._backend.special_tokens else show_bytes(self._backend.token_bytes(token_id), space)
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, **variables
    ) -> str:
        """Format chat messages with the checkpoint's chat template (Phi-3's if it has none).

        Phi-3's gives `<|role|>\\n{content}<|end|>\\n` per message, then `<|assistant|>\\n` if
        `add_generation_prompt`, else `<|endoftext|>`; Phi-4-mini's `<|role|>{content}<|end|>`;
        Phi-4's `<|im_start|>role<|im_sep|>{content}<|im_end|>`. The template runs in a Jinja
        sandbox and sees `messages`, `add_generation_prompt`, the special-token strings
        (`bos_token`, `eos_token`, ...) and `variables`.

        Args:
            messages: dicts with a str `"role"` (with Phi-3's template: `"system"`, `"user"` or
                `"assistant"`) and a str `"content"`.
            add_generation_prompt: end by opening the assistant's turn.
            **variables: more names for the template, e.g. `tools`.

        Raises:
            ChatTemplateError: the template is invalid, reaches outside the sandbox, or raised.

        Example:
        >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])
        '<|user|>\\nHi<|end|>\\n<|assistant|>\\n'
        """
        check_messages(messages, None if self.has_own_chat_template else CHAT_ROLES)
        if not isinstance(add_generation_prompt, (bool, np.bool_)):
            raise bad_argument("add_generation_prompt", add_generation_prompt, "True or False")
        names = {**self._backend.template_tokens, **variables}
        return render_chat_template(self.chat_template, [dict(m) for m in messages], bool(add_generation_prompt), names)

    def save_assets(self, directory: str | os.PathLike) -> Path:
        """Write the SentencePiece model to `assets/tokenizer/vocabulary.spm` (keras-hub)."""
        path = Path(directory) / KERAS_VOCAB
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.proto)
        return path

    def save_hf(self, directory: str | os.PathLike) -> list[Path]:
        """Write Hugging Face tokenizer files that `from_preset` and transformers read back.

        SentencePiece: Phi-3's `tokenizer.model`, `tokenizer_config.json`, `added_tokens.json`,
        `special_tokens_map.json` (no `tokenizer.json`; `"legacy": true` makes transformers
        rebuild Phi-3's encoding from `tokenizer.model`, given a `config.json` with model_type
        "phi3"). Byte-level BPE: `tokenizer.json` and `tokenizer_config.json`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return self._backend.save_hf(directory, self.chat_template)

    def _check_text(self, text) -> None:
        if not isinstance(text, str):
            raise TypeError(f"`text` must be a str; received text={text!r} of type {type(text).__name__}.")

    def _check_ids(self, ids, bounded: bool = True) -> list[int]:
        """`ids` (1-D) as a list of ints within the vocabulary (only
        non-negative without `bounded`), by the one token-id rule."""
        return check_token_ids("ids", ids, self.vocabulary_size if bounded else None, ndim=1).tolist()
