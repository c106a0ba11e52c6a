"""Training a small Llama-style SentencePiece vocabulary (for the shipped
model and for tests)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from phi3lab.checks import check_positive_int


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_prefix_dir: str | os.PathLike | None = None
) -> bytes:
    """Train a small Llama-style BPE SentencePiece model and return it serialized.

    Llama's (and Phi-3's) `tokenizer.model` settings: BPE, byte fallback, `<unk>`=0, `<s>`=1,
    `</s>`=2, no pad, split digits, dummy prefix, identity normalization, whitespace kept.

    Args:
        texts: the training sentences, one str each.
        vocab_size: the number of pieces, counting the 3 specials and 256 bytes.
        model_prefix_dir: if given, also write `tokenizer.model` and `tokenizer.vocab` there.

    Example:
    >>> tok = Phi3Tokenizer(train_sentencepiece(corpus, vocab_size=600))
    """
    check_positive_int("vocab_size", vocab_size)
    texts = None if isinstance(texts, str) or not isinstance(texts, Iterable) else list(texts)
    if texts is None or not all(isinstance(text, str) for text in texts):
        raise TypeError("`texts` must be an iterable of str, one training sentence each.")
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentencepiece_length=16,
        minloglevel=2,
    )
    sentences = iter([text for text in texts if text])
    writer, prefix = io.BytesIO(), None
    if model_prefix_dir is not None:
        prefix = Path(model_prefix_dir) / "tokenizer"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        options["model_prefix"] = str(prefix)
    else:
        options["model_writer"] = writer
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences, **options)
    except RuntimeError as error:
        raise ValueError(f"Training SentencePiece with vocab_size={vocab_size} failed: {error}") from None
    return prefix.with_suffix(".model").read_bytes() if prefix else writer.getvalue()
