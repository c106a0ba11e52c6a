"""Tests of `phi3lab.tokenizer` against Hugging Face's tokenizer as the oracle.

A small Llama-style SentencePiece model is trained once per session. The oracle directory is
written here, independently of `Phi3Tokenizer.save_hf`, in Phi-3-mini-4k-instruct's layout:
`tokenizer.model`, Phi-3's `tokenizer_config.json` (legacy false, rstrip flags, chat template),
`added_tokens.json`, `special_tokens_map.json`, a `tokenizer.json` built like Phi-3's (the
Llama-2 "legacy" normalizer: Prepend("▁") + Replace(" ", "▁"), BPE with byte fallback,
added tokens with Phi-3's flags) and a `config.json` with model_type "phi3", so that
`AutoTokenizer` takes the same path as for the real checkpoint (transformers 5 loads Phi-3's
`tokenizer.json` as it is, with `TokenizersBackend`).
"""

from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from bpe_checkpoints import PHI3_TEMPLATE  # Phi-3's tokenizer_config.json chat template

from conftest import EDGE_TEXTS, require, require_file

transformers = require("transformers")
tokenizers = require("tokenizers")
import sentencepiece as spm  # noqa: E402

from phi3lab.tokenization.tokenizer import ADDED_SPECIAL_TOKENS, Phi3Tokenizer  # noqa: E402
from phi3lab.tokenization.training import train_sentencepiece  # noqa: E402

# Phi-3's added tokens, ids 32000.. in this order: phi3lab's list, which the oracle files below are
# written with. It is checked against ids known without it (`test_added_tokens_are_phi3s`).
PHI3_ADDED = list(ADDED_SPECIAL_TOKENS)
# microsoft/Phi-3-mini-4k-instruct's added_tokens.json, for the tokens a chat depends on (its
# generation_config.json stops on 32000, 32001 and 32007).
PHI3_KNOWN_IDS = {
    "<|endoftext|>": 32000,
    "<|assistant|>": 32001,
    "<|system|>": 32006,
    "<|end|>": 32007,
    "<|user|>": 32010,
}
# Phi-3's tokenizer_config.json: (rstrip, special) of each token.
PHI3_FLAGS = {
    "<unk>": (False, True),
    "<s>": (False, True),
    "</s>": (True, False),
    "<|endoftext|>": (False, True),
    **{t: (True, True) for t in PHI3_ADDED[1:]},
}
WORDS = (
    "the a of attention head layer residual stream token model neuron circuit induction "
    "copy Paris France capital hello world question answer probe logit lens patch café "
    "naïve Zürich résumé über 東京 日本 数学"
).split()

TEXTS = [
    *EDGE_TEXTS,
    "x\n\n\ny",
    "digits 1234567890 and 3.14159, 2024-05-01",
    "café naïve Zürich résumé über",
    "東京 日本語の文章 中文 한국어",
    "emoji 😀🎉 and a family 👩‍👩‍👧 👩🏽‍💻",
    "▁a",
    "a▁b ▁▁ c",
    "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n",
    "<|system|>  \n\t be brief<|end|>",
    "<|endoftext|> after end of text",
    "<|endoftext|>",
    "x</s>  y",
    "<s>bos in text",
    "a <unk> b",
    "<|user|><|user|><|end|>",
    "<|user|>   ",
    "<|placeholder1|>p<|placeholder2|> q<|placeholder3|>\nr<|placeholder4|>",
    "<|placeholder5|><|placeholder6|>",
    " <|user|>Hi",
    "<|user",
    "<|unknown|>",
    "|>user<|",
    "<|end|>\x1c\x1d\x1e\x1f x",
    "<|end|>\u3000\u00a0\u2003\u2028 x",
    "<|end|>\u200b x",
    "<|end|>\r\n\r\nx",
    "tab after end<|end|>\tx",
    "<<|user|>>",
    "<|user|>\n\n\nHi",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings mixing words, special tokens, whitespace, accents, CJK and emoji."""
    rng = random.Random(seed)
    atoms = (
        WORDS
        + PHI3_ADDED
        + [
            "<s>",
            "</s>",
            "<unk>",
            " ",
            "  ",
            "\n",
            "\t",
            "\u3000",
            "😀",
            "é",
            "7",
            "42",
            ".",
            ",",
            "<",
            "|",
            ">",
            "▁",
            "\x1c",
        ]
    )
    return ["".join(rng.choice(atoms) + rng.choice(["", " "]) for _ in range(rng.randint(0, 12))) for _ in range(count)]


PLAIN_TEXTS = [
    t for t in TEXTS + random_texts(200, seed=5) if not any(s in t for s in PHI3_ADDED + ["<s>", "</s>", "<unk>"])
]


def corpus(count: int = 3000, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        if i % 4 == 0:
            line = line.capitalize() + rng.choice([".", "?", "!", ":"])
        if i % 5 == 0:
            line += f" {rng.randint(0, 10 ** rng.randint(1, 8))}"
        if i % 9 == 0:
            line = "  " + line.replace(" ", "   ", 2) + "\tend"
        lines.append(line)
    return lines


def write_phi3_hf_dir(directory, proto: bytes, flags=PHI3_FLAGS, legacy_json=True):
    """Phi-3's Hugging Face tokenizer files for `proto`, written without phi3lab."""
    directory.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    n = sp.get_piece_size()
    tokens = [("<unk>", 0), ("<s>", 1), ("</s>", 2)]
    tokens += [(t, n + i) for i, t in enumerate(PHI3_ADDED)]
    entry = {"lstrip": False, "normalized": False, "single_word": False}
    decoder = {str(i): {"content": t, **entry, "rstrip": flags[t][0], "special": flags[t][1]} for t, i in tokens}
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "chat_template": PHI3_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {
        k: {"content": v, **entry, "rstrip": False}
        for k, v in [
            ("bos_token", "<s>"),
            ("eos_token", "<|endoftext|>"),
            ("pad_token", "<|endoftext|>"),
            ("unk_token", "<unk>"),
        ]
    }
    (directory / "tokenizer.model").write_bytes(proto)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "added_tokens.json").write_text(json.dumps(dict(tokens[3:])))
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
    model_config = {"model_type": "phi3", "vocab_size": n + 64, "bos_token_id": 1, "eos_token_id": n, "pad_token_id": n}
    (directory / "config.json").write_text(json.dumps(model_config))
    if legacy_json:
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers
        from tokenizers.models import BPE
        from transformers.tokenization_utils_base import generate_merges

        vocab = {sp.id_to_piece(i): i for i in range(n)}
        backend = Tokenizer(
            BPE(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        )
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        backend.add_tokens(
            [AddedToken(t, rstrip=flags[t][0], lstrip=False, normalized=False, special=flags[t][1]) for t, _ in tokens]
        )
        assert [backend.token_to_id(t) for t, _ in tokens] == [i for _, i in tokens]
        backend.save(str(directory / "tokenizer.json"))
    return directory


def load_oracle(directory):
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="session")
def proto() -> bytes:
    return train_sentencepiece(corpus(), vocab_size=700)


@pytest.fixture(scope="session")
def hf_dir(proto, tmp_path_factory):
    return write_phi3_hf_dir(tmp_path_factory.mktemp("phi3_hf"), proto)


@pytest.fixture(scope="session")
def oracle(hf_dir):
    return load_oracle(hf_dir)


@pytest.fixture(scope="session")
def tok(proto) -> Phi3Tokenizer:
    return Phi3Tokenizer(proto)


def oracle_ids(oracle, text):
    return oracle.encode(text, add_special_tokens=False)


def test_oracle_has_phi3_shipped_behaviour(oracle):
    assert oracle.is_fast and "Prepend" in str(oracle.backend_tokenizer.normalizer)
    assert oracle.pad_token == "<|endoftext|>" and oracle.eos_token == "<|endoftext|>"


def test_added_tokens_are_phi3s():
    """The 11 added tokens, against the ids of Phi-3's added_tokens.json known without phi3lab."""
    assert len(set(PHI3_ADDED)) == len(PHI3_ADDED) == 11
    assert {t: 32000 + PHI3_ADDED.index(t) for t in PHI3_KNOWN_IDS} == PHI3_KNOWN_IDS
    placeholders = [t for t in PHI3_ADDED if t not in PHI3_KNOWN_IDS]
    assert placeholders == [f"<|placeholder{i}|>" for i in range(1, 7)]


def test_special_token_ids_follow_phi3(tok, proto, oracle):
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: n + i for i, t in enumerate(PHI3_ADDED)}}
    assert tok.special_tokens == expected
    assert {t: oracle.convert_tokens_to_ids(t) for t in expected} == expected
    assert tok.vocabulary_size == n + 11 == len(oracle)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (1, n, n + 7)
    assert set(tok.stop_token_ids) == {n, n + 1, n + 7}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_oracle(tok, oracle, text):
    assert tok.encode(text) == oracle_ids(oracle, text)
    assert tok.encode(text, add_bos=True) == [1] + oracle_ids(oracle, text)


def test_encode_random_texts_match_oracle(tok, oracle):
    texts = random_texts(600)
    mismatches = [t for t in texts if tok.encode(t) != oracle_ids(oracle, t)]
    assert not mismatches, mismatches[:5]


def test_chat_template_matches_oracle(tok, oracle):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi\n"},
            {"role": "assistant", "content": " Hello! 😀"},
            {"role": "user", "content": ""},
        ],
        [{"role": "assistant", "content": "  leading spaces"}],
    ]
    for messages in conversations:
        for prompt in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert tok.encode(text) == oracle_ids(oracle, text)
    first = tok.encode(tok.apply_chat_template(conversations[0]))[0]
    assert first == tok.special_tokens["<|user|>"]


def test_decode_matches_oracle(tok, oracle):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, tok.vocabulary_size, size=rng.integers(0, 12)).tolist() for _ in range(300)]
    sequences += [tok.encode(t) for t in TEXTS + random_texts(100, seed=3)]
    sequences += [[2, 0, 1, 5, 200], [3 + 0xE6, 3 + 0x97], [3 + 0x80, 3 + 0xE6, 3 + 0x97, 3 + 0xA5]]
    for ids in sequences:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip), ids
    assert tok.decode(np.array(tok.encode("Hello world"), dtype=np.int32)) == "Hello world"


def test_decode_round_trips_plain_text(tok):
    for text in PLAIN_TEXTS:
        assert tok.decode(tok.encode(text)) == text.replace("▁", " "), text


def test_id_and_token_lookups(tok, oracle):
    for token_id in [0, 1, 2, 3, 13, 300, tok.vocabulary_size - 1, *tok.special_tokens.values()]:
        token = tok.id_to_token(token_id)
        assert token == oracle.convert_ids_to_tokens(token_id)
        assert tok.token_to_id(token) == token_id
    assert tok.id_to_token(np.int64(13)) == "<0x0A>"


def test_display_tokens(tok):
    ids = tok.encode("<|user|>\nHello\tworld 😀<|end|>\n")
    shown = tok.display_tokens(ids)
    assert len(shown) == len(ids)
    assert shown[0] == "<|user|>" and shown[-1] == "<|end|>"
    assert "\\t" in shown and "<0x09>" not in shown
    assert ["\\xF0", "\\x9F", "\\x98", "\\x80"] == shown[-5:-1]
    assert tok.display_tokens(tok.encode("a\nb")) == [" a", "\\n", "b"]
    assert tok.display_tokens(tok.encode("hello world"), space="␣") == ["␣hello", "␣world"]
    assert tok.display_tokens(tok.encode("a\u3000b")[1:-1]) == ["\\xE3", "\\x80", "\\x80"]
    everything = tok.display_tokens(range(tok.vocabulary_size))
    assert all(s.isprintable() and "▁" not in s for s in everything)


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_matches_oracle_padding(tok, oracle, side):
    texts = ["Hello world", "", "<|user|>\nHi there, how are you?<|end|>\n<|assistant|>\n", "a"]
    ids, mask = tok.encode_batch(texts, padding_side=side)
    expected = oracle(texts, add_special_tokens=False, padding="longest", padding_side=side, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"].astype(bool))
    assert ids.dtype == np.int32 and mask.dtype == bool


def test_encode_batch_fixed_length_and_bos(tok):
    ids, mask = tok.encode_batch(["Hello", "Hello world"], add_bos=True, padding=6)
    assert ids.shape == mask.shape == (2, 6)
    hello = tok.encode("Hello", add_bos=True)
    assert ids[0].tolist() == hello + [tok.pad_token_id] * (6 - len(hello))
    assert mask[0].tolist() == [True] * len(hello) + [False] * (6 - len(hello))
    assert mask[1].sum() == len(tok.encode("Hello world", add_bos=True))
    assert tok.encode_batch([])[0].shape == (0, 0)


def test_from_preset_hugging_face_dir(tok, hf_dir):
    loaded = Phi3Tokenizer.from_preset(hf_dir)
    assert loaded.special_tokens == tok.special_tokens
    assert all(loaded.encode(t) == tok.encode(t) for t in TEXTS)


def test_from_preset_keras_hub_dir(tok, tmp_path):
    path = tok.save_assets(tmp_path)
    assert path == tmp_path / "assets" / "tokenizer" / "vocabulary.spm"
    loaded = Phi3Tokenizer.from_preset(str(tmp_path))
    assert loaded.proto == tok.proto and loaded.special_tokens == tok.special_tokens


def test_save_hf_round_trips_through_transformers(tok, tmp_path):
    written = tok.save_hf(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"]
    )
    assert json.loads((tmp_path / "added_tokens.json").read_text()) == {
        t: i for t, i in tok.special_tokens.items() if t in PHI3_ADDED
    }
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    reloaded = load_oracle(tmp_path)
    for text in TEXTS + random_texts(200, seed=7):
        assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text), text
    messages = [{"role": "user", "content": "Hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(messages)
    )
    assert Phi3Tokenizer.from_preset(tmp_path).special_tokens == tok.special_tokens


def test_from_preset_uses_rstrip_flags_of_the_checkpoint(proto, tmp_path):
    flags = {t: (False, special) for t, (_, special) in PHI3_FLAGS.items()}  # April 2024 revision
    directory = write_phi3_hf_dir(tmp_path, proto, flags=flags)
    loaded, old_oracle = Phi3Tokenizer.from_preset(directory), load_oracle(directory)
    assert loaded.rstrip_tokens == frozenset()
    for text in TEXTS + random_texts(100, seed=9):
        assert loaded.encode(text) == oracle_ids(old_oracle, text), text


def test_from_preset_checks_added_token_ids(proto, tmp_path):
    directory = write_phi3_hf_dir(tmp_path, proto, legacy_json=False)
    added = json.loads((directory / "added_tokens.json").read_text())
    added["<|user|>"] += 1
    (directory / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(ValueError, match=r"<\|user\|>.*id"):
        Phi3Tokenizer.from_preset(directory)


def test_from_preset_registry_and_errors(tok, tmp_path, monkeypatch):
    registry = types.ModuleType("phi3lab.presets")
    registry.resolve_preset_dir = lambda name: tok.save_assets(tmp_path / name).parents[2]
    monkeypatch.setitem(sys.modules, "phi3lab.presets", registry)
    assert Phi3Tokenizer.from_preset("tiny").special_tokens == tok.special_tokens
    monkeypatch.setitem(sys.modules, "phi3lab.presets", types.ModuleType("phi3lab.presets"))
    with pytest.raises(ValueError, match=r"`preset`.*no_such_preset"):
        Phi3Tokenizer.from_preset("no_such_preset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"vocabulary\.spm.*tokenizer\.model"):
        Phi3Tokenizer.from_preset(tmp_path / "empty")
    with pytest.raises(TypeError, match="preset"):
        Phi3Tokenizer.from_preset(3)


def test_spm_holding_the_added_tokens_as_pieces(tok):
    """A vocabulary holding the added tokens as pieces (keras-hub style) gives the same ids."""
    model_pb2 = require("sentencepiece.sentencepiece_model_pb2")
    model = model_pb2.ModelProto.FromString(tok.proto)
    for token in PHI3_ADDED:
        model.pieces.add(piece=token, score=0.0, type=model_pb2.ModelProto.SentencePiece.USER_DEFINED)
    extended = Phi3Tokenizer(model.SerializeToString())
    assert extended.special_tokens == tok.special_tokens
    assert extended.vocabulary_size == tok.vocabulary_size
    assert all(extended.encode(t) == tok.encode(t) for t in TEXTS)


def test_legacy_false_reference_differs_only_after_special_tokens(tok, proto, tmp_path):
    """transformers' non-legacy Llama encoding (tokenizer.model, legacy false) agrees on plain
    text; after a special token it adds no "▁", which is where Phi-3's tokenizer.json differs.
    (Texts starting with a space or "▁" are left out: transformers 5's Metaspace then skips the
    dummy prefix, which neither SentencePiece nor Phi-3's tokenizer.json does.)"""
    directory = write_phi3_hf_dir(tmp_path, proto, legacy_json=False)
    (directory / "config.json").unlink()
    non_legacy = load_oracle(directory)
    for text in [t for t in PLAIN_TEXTS if not t[:1].isspace() and t[:1] != "▁"]:
        assert non_legacy.encode(text, add_special_tokens=False) == tok.encode(text), text
    hi = tok.encode("<|user|>Hello")
    assert non_legacy.encode("<|user|>Hello", add_special_tokens=False) != hi
    assert hi == [tok.special_tokens["<|user|>"]] + tok.encode("Hello")


def test_errors_name_the_argument(tok):
    with pytest.raises(TypeError, match=r"`text`.*str.*123"):
        tok.encode(123)
    with pytest.raises(ValueError, match=r"`add_bos`"):
        tok.encode("a", add_bos="yes")
    with pytest.raises(ValueError, match=rf"`ids`.*\[0, {tok.vocabulary_size}\).*-1"):
        tok.decode([5, -1])
    with pytest.raises(ValueError, match=rf"`ids`.*out of range: \[{tok.vocabulary_size}\]"):
        tok.decode([tok.vocabulary_size])
    with pytest.raises(TypeError, match=r"`ids`.*1-D.*int.*dtype float"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match=r"`ids`.*1-D"):
        tok.display_tokens([[1, 2]])
    with pytest.raises(ValueError, match=r"`id`.*'x'"):
        tok.id_to_token("x")
    with pytest.raises(ValueError, match=r"`token`.*vocabulary.*'no such piece'"):
        tok.token_to_id("no such piece")
    with pytest.raises(ValueError, match=r"`messages\[1\]\['role'\]`.*system.*user.*'robot'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ValueError, match=r"`messages\[0\]`.*content"):
        tok.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match=r"`messages`"):
        tok.apply_chat_template("hello")
    with pytest.raises(ValueError, match=r"`messages`.*non-empty"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match=r"`texts`.*list of str"):
        tok.encode_batch("one string")
    with pytest.raises(ValueError, match=r"`padding_side`.*'middle'"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match=r"`padding`.*longest.*padding=1\."):
        tok.encode_batch(["a long sentence here"], padding=1)
    with pytest.raises(ValueError, match=r"`padding`.*'max'"):
        tok.encode_batch(["a"], padding="max")
    with pytest.raises(ValueError, match=r"`proto`"):
        Phi3Tokenizer(b"not a sentencepiece model")
    with pytest.raises(TypeError, match=r"`proto`.*int"):
        Phi3Tokenizer(7)
    with pytest.raises(ValueError, match=r"`rstrip_tokens`.*<\|nope\|>"):
        Phi3Tokenizer(tok.proto, rstrip_tokens=["<|nope|>"])


def test_train_sentencepiece(tmp_path):
    model_pb2 = require("sentencepiece.sentencepiece_model_pb2")
    proto = train_sentencepiece(corpus(400), vocab_size=450, model_prefix_dir=tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == proto
    model = model_pb2.ModelProto.FromString(proto)
    trainer, normalizer = model.trainer_spec, model.normalizer_spec
    assert len(model.pieces) == 450 and trainer.model_type == trainer.BPE
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (0, 1, 2, -1)
    assert trainer.byte_fallback and trainer.split_digits and trainer.allow_whitespace_only_pieces
    assert normalizer.name == "identity" and normalizer.add_dummy_prefix
    assert not normalizer.remove_extra_whitespaces
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["a b c"], vocab_size=100000)
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(["a b c"], vocab_size=0)
    with pytest.raises(TypeError, match="texts"):
        train_sentencepiece(["a", 3], vocab_size=300)


def test_display_tokens_can_label_model_rows_past_the_vocabulary(tok):
    """A model's embedding may have more rows than the tokenizer has ids
    (Phi-3: 32064 vs 32011); a logit lens can rank those rows."""
    past = tok.vocabulary_size + 3
    shown = tok.display_tokens([tok.bos_token_id, past], beyond_vocabulary="<unused {}>")
    assert shown == [tok.display_tokens([tok.bos_token_id])[0], f"<unused {past}>"]
    with pytest.raises(ValueError, match="ids"):
        tok.display_tokens([past])
    with pytest.raises(ValueError, match="ids"):
        tok.display_tokens([-1], beyond_vocabulary="<unused {}>")


def test_decode_joins_bytes_around_a_skipped_special_token(tok, oracle):
    """Hugging Face leaves skipped tokens out before joining byte pieces: "日" (E6 97 A5) split by
    a skipped <|user|> still decodes whole, while a kept one splits it into U+FFFDs."""
    user, eos = tok.special_tokens["<|user|>"], tok.special_tokens["</s>"]
    byte = {b: tok.token_to_id(f"<0x{b:02X}>") for b in (0xE6, 0x97, 0xA5)}
    sequences = [
        [byte[0xE6], user, byte[0x97], byte[0xA5]],
        [byte[0xE6], byte[0x97], user, user, byte[0xA5]],
        [byte[0xE6], eos, byte[0x97], byte[0xA5]],
        [user, byte[0xE6], byte[0x97], byte[0xA5], user],
    ]
    for ids in sequences:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip), ids
    assert tok.decode(sequences[0], skip_special_tokens=True) == "日"
    assert tok.decode(sequences[0]) == "\ufffd<|user|>\ufffd\ufffd"


@pytest.fixture(scope="session")
def in_context_oracle(proto, tmp_path_factory):
    """transformers' non-legacy Llama tokenizer: no dummy prefix after a special token, so
    `encode("<|endoftext|>" + text)[1:]` is `text` as it appears inside a longer text."""
    directory = write_phi3_hf_dir(tmp_path_factory.mktemp("non_legacy"), proto, legacy_json=False)
    (directory / "config.json").unlink()
    return load_oracle(directory)


def test_to_single_token_is_the_token_inside_a_text(tok, oracle, in_context_oracle):
    eot, lengths = tok.special_tokens["<|endoftext|>"], set()
    for word in WORDS + ["Mary", "capital"]:
        in_context = in_context_oracle.encode(f"<|endoftext|> {word}", add_special_tokens=False)
        assert in_context[0] == eot
        lengths.add(min(len(in_context) - 1, 2))
        if len(in_context) == 2:
            assert tok.to_single_token(" " + word) == in_context[1] == oracle_ids(oracle, f"a {word}")[-1]
        else:
            with pytest.raises(ValueError, match=rf"`text`.*' {word}'.*{len(in_context) - 1} tokens: \['▁"):
                tok.to_single_token(" " + word)
    assert lengths == {1, 2}  # both single tokens and words of several
    assert tok.to_single_token("<|user|>") == tok.special_tokens["<|user|>"]
    for glued in ["ary", "'s", "7", "\n"]:
        ids = in_context_oracle.encode("<|endoftext|>" + glued, add_special_tokens=False)[1:]
        if len(ids) == 1:
            assert tok.to_single_token(glued) == ids[0]
        else:
            with pytest.raises(ValueError, match=f"{len(ids)} tokens"):
                tok.to_single_token(glued)


def test_to_str_tokens(tok, oracle):
    ids = tok.encode("<|user|>\nHello\tworld 😀 東京<|end|>")
    strings = tok.to_str_tokens(ids)
    assert strings == tok.to_str_tokens("<|user|>\nHello\tworld 😀 東京<|end|>")
    assert strings[0] == "<|user|>" and strings[-1] == "<|end|>" and "\t" in strings
    for text in PLAIN_TEXTS:
        joined = "".join(tok.to_str_tokens(text))
        if "\ufffd" not in joined:  # no token holds part of a character
            assert joined == " " + oracle.decode(tok.encode(text)) or joined == oracle.decode(tok.encode(text)), text
    assert tok.to_str_tokens("Hi", add_bos=True)[0] == "<s>"
    with pytest.raises(ValueError, match="`ids`"):
        tok.to_str_tokens([[1, 2]])


def test_from_preset_uses_the_checkpoints_chat_template(hf_dir, proto, tmp_path, oracle):
    messages = [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "ignored by Phi-3's"}]
    loaded = Phi3Tokenizer.from_preset(hf_dir)
    assert loaded.has_own_chat_template
    assert loaded.apply_chat_template(messages) == oracle.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    directory = write_phi3_hf_dir(tmp_path, proto, legacy_json=False)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}")
    assert Phi3Tokenizer.from_preset(directory).apply_chat_template(messages) == "user:Hi|tool:ignored by Phi-3's|"
    saved = loaded.save_hf(tmp_path / "saved")
    assert json.loads(saved[1].read_text())["chat_template"] == PHI3_TEMPLATE


REAL_PHI3 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "phi3_sentencepiece.model"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Phi-3-mini's real tokenizer.model, with transformers' tokenizer of the same files."""
    where = "a checkout inside the workspace, whose shared/data/ holds it (see its README)"
    proto = require_file(REAL_PHI3, "the real Phi-3 vocabulary", where).read_bytes()
    return Phi3Tokenizer(proto), load_oracle(write_phi3_hf_dir(tmp_path_factory.mktemp("real"), proto))


def test_real_phi3_vocabulary(real):
    tok, oracle = real
    assert tok.encode("The quick brown fox.") == [450, 4996, 17354, 1701, 29916, 29889]  # keras-hub's test
    assert tok.vocabulary_size == 32011  # the 32000 pieces of shared/data/README.md, then the added tokens
    assert {t: tok.token_to_id(t) for t in PHI3_KNOWN_IDS} == PHI3_KNOWN_IDS
    sentence = "When Mary and John went to the store, John gave a drink to"
    ids = oracle_ids(oracle, sentence)
    assert tok.encode(sentence) == ids
    assert tok.encode(" Mary") == [29871, ids[1]]  # "▁", "▁Mary": `[0]` would be the lone "▁"
    assert tok.to_single_token(" Mary") == ids[1] == tok.token_to_id("▁Mary")
    assert tok.to_single_token(" John") == ids[3]
    assert tok.to_str_tokens(sentence) == [
        " " + oracle.decode([i]) if tok.id_to_token(i).startswith("▁") else oracle.decode([i]) for i in ids
    ]
    assert tok.to_str_tokens(sentence)[:3] == [" When", " Mary", " and"]
    with pytest.raises(ValueError, match=r"' Zürichsee'.*tokens: \['▁Z"):
        tok.to_single_token(" Zürichsee")
    with pytest.raises(ValueError, match=r"'Mary'.*2 tokens: \['M', 'ary'\] \(' Mary' is one token"):
        tok.to_single_token("Mary")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "東京は?"}]
    text = tok.apply_chat_template(chat)
    assert text == oracle.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert tok.encode(text) == oracle_ids(oracle, text)
    everything = list(range(tok.vocabulary_size))
    assert [tok.id_to_token(i) for i in everything] == oracle.convert_ids_to_tokens(everything)
    assert all(s.isprintable() for s in tok.display_tokens(everything))
