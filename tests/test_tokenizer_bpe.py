"""Byte-level BPE tokenizers (Phi-4, Phi-4-mini) and chat templates against transformers.

The oracle is `transformers.AutoTokenizer` on the same directory, written by
`bpe_checkpoints` with the `tokenizers` library alone in each checkpoint's layout (a trained
~1,200-token byte-level BPE, the real regex, added tokens, flags, special-token names and chat
template of microsoft/phi-4 and microsoft/Phi-4-mini-instruct).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from bpe_checkpoints import (
    CL100K,
    O200K,
    PHI3_TEMPLATE,
    PHI4_ADDED,
    PHI4_MINI_ADDED,
    PHI4_MINI_TEMPLATE,
    PHI4_MINI_UNK,
    PHI4_TEMPLATE,
    WORDS,
    train_byte_level_bpe,
    write_phi4_dir,
    write_phi4_mini_dir,
)

from conftest import EDGE_TEXTS, require

transformers = require("transformers")
tokenizers = require("tokenizers")

from phi3lab.tokenization.bpe_backend import ByteLevelBPEBackend, byte_level_alphabet  # noqa: E402
from phi3lab.tokenization.tokenizer import ChatTemplateError, Phi3Tokenizer  # noqa: E402

LAYOUTS = {
    "phi4": (CL100K, write_phi4_dir, PHI4_ADDED[:12]),
    "phi4_mini": (O200K, write_phi4_mini_dir, [t for t, _, _ in PHI4_MINI_ADDED] + [PHI4_MINI_UNK]),
}
TEXTS = [
    *EDGE_TEXTS,
    "x\n\n\ny",
    "   \n  \n",
    "When Mary and John went",
    "digits 1234567890 and 3.14159, 2024-05-01, 1e-9, -42",
    "café naïve Zürich résumé über",
    "Ελληνικά русский",
    "東京 日本語の文章 中文 한국어",
    "emoji 😀🎉 and a family 👩‍👩‍👧 👩🏽‍💻",
    "don't DON'T it's WE'RE I'd",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "<div>&amp;</div>",
    "a \ufffd b \ufffd\ufffd",
    PHI4_MINI_UNK,
    f"x{PHI4_MINI_UNK}y",
    "\x00\x01\x1c\x7f",
    "\u3000\u00a0\u2003 x",
    "<|im_start|>user<|im_sep|>Hi<|im_end|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|endoftext|>",
    "<|user|>\nWhat?<|end|>\n<|assistant|>\n",
    "<|system|>  \n\t be brief<|end|>",
    "<|tool|>[]<|/tool|>",
    "<|user|><|user|><|end|>",
    "<|user",
    "<|unknown|>",
    "|>user<|",
    "<<|user|>>",
    "<｜PAD▁TOKEN｜> pad",
    "<|dummy_85|>",
    "<|endofprompt|> after",
]


def random_texts(count: int, specials, seed: int = 0) -> list[str]:
    """Strings mixing words, code, numbers, special tokens, whitespace runs, accents, CJK and emoji."""
    rng = random.Random(seed)
    atoms = (
        WORDS
        + list(specials)
        + [
            " ",
            "  ",
            "   ",
            "\n",
            "\n\n",
            "\t",
            "\r\n",
            "\u3000",
            "😀",
            "👩‍💻",
            "é",
            "7",
            "42",
            "2024",
            "3.14",
            ".",
            ",",
            "'s",
            "<",
            "|",
            ">",
            "(",
            "):",
            "\ufffd",
            "{",
            "}",
            "==",
            "->",
            "Ġ",
            "▁",
            "\x1c",
        ]
    )
    return [
        "".join(rng.choice(atoms) + rng.choice(["", "", " "]) for _ in range(rng.randint(0, 14))) for _ in range(count)
    ]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    """(name, directory, phi3lab tokenizer, transformers tokenizer, the layout's added tokens)."""
    pattern, write, specials = LAYOUTS[request.param]
    directory = write(tmp_path_factory.mktemp(request.param), train_byte_level_bpe(pattern))
    oracle = transformers.AutoTokenizer.from_pretrained(str(directory))
    return request.param, directory, Phi3Tokenizer.from_preset(directory), oracle, specials


def oracle_ids(oracle, text):
    return oracle.encode(text, add_special_tokens=False)


def test_oracle_loads_the_file_as_it_is(layout):
    _, _, tok, oracle, _ = layout
    assert type(oracle).__name__ == "TokenizersBackend"
    assert "Split" in str(oracle.backend_tokenizer.pre_tokenizer)
    assert isinstance(tok._backend, ByteLevelBPEBackend)


def test_special_tokens_follow_the_checkpoint(layout):
    name, directory, tok, oracle, _ = layout
    assert tok.vocabulary_size == len(oracle)
    assert tok.special_tokens == {t.content: i for i, t in oracle.added_tokens_decoder.items()}
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        oracle.bos_token_id,
        oracle.eos_token_id,
        oracle.pad_token_id,
        oracle.unk_token_id,
    )
    generation = json.loads((directory / "generation_config.json").read_text())["eos_token_id"]
    assert set(tok.stop_token_ids) == set(np.atleast_1d(generation).tolist())
    expected_eos = {"phi4": "<|im_end|>", "phi4_mini": "<|end|>"}[name]
    assert tok.id_to_token(tok.eos_token_id) == expected_eos


def test_encode_matches_transformers(layout):
    _, _, tok, oracle, specials = layout
    texts = TEXTS + random_texts(300, specials, seed=len(specials))
    mismatches = [t for t in texts if tok.encode(t) != oracle_ids(oracle, t)]
    assert not mismatches, mismatches[:5]
    assert tok.encode("Hi", add_bos=True) == [oracle.bos_token_id] + oracle_ids(oracle, "Hi")


def test_decode_matches_transformers(layout):
    _, _, tok, oracle, specials = layout
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, tok.vocabulary_size, size=rng.integers(0, 12)).tolist() for _ in range(200)]
    sequences += [tok.encode(t) for t in TEXTS + random_texts(100, specials, seed=3)]
    for ids in sequences:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip), ids
    for text in [t for t in TEXTS if not any(s in t for s in tok.special_tokens)]:  # (lstrip / rstrip eat spaces)
        assert tok.decode(tok.encode(text)) == text


def test_byte_level_alphabet_is_the_libraries():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert sorted(alphabet.values()) == list(range(256))
    pieces = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        "".join(map(chr, range(128)))
    )
    assert [alphabet[c] for c in pieces[0][0]] == list(range(128))


def test_token_strings_match_transformers(layout):
    _, _, tok, oracle, specials = layout
    ids = list(range(tok.vocabulary_size))
    assert [tok.id_to_token(i) for i in ids] == oracle.convert_ids_to_tokens(ids)
    assert all(tok.token_to_id(tok.id_to_token(i)) == i for i in ids)
    # Each token alone decodes to its text (U+FFFD where it holds part of a character's bytes).
    assert tok.to_str_tokens(ids) == [oracle.decode([i]) for i in ids]
    for text in TEXTS + random_texts(100, specials, seed=4):
        joined = "".join(tok.to_str_tokens(text))
        assert joined == tok.decode(tok.encode(text)) or "\ufffd" in joined, text


def test_display_tokens(layout):
    _, _, tok, _, _ = layout
    shown = tok.display_tokens(tok.encode("Hello\tworld 😀\n"))
    assert "\\t" in "".join(shown) and shown[-1].endswith("\\n") and "Ġ" not in "".join(shown)
    assert all(s.isprintable() for s in tok.display_tokens(range(tok.vocabulary_size)))
    split = tok.display_tokens(tok.encode("\U0001f9ec"))  # a character the training never saw: split bytes
    assert len(split) > 1 and "".join(split) == "\\xF0\\x9F\\xA7\\xAC"
    assert tok.display_tokens(tok.encode(" world"), space="␣") == [f"␣{tok.to_str_tokens(' world')[0][1:]}"]


def test_to_single_token(layout):
    _, _, tok, oracle, _ = layout
    for word in ("Mary", "John", "the", "store"):
        in_sentence = oracle_ids(oracle, f"When {word}")[-1]
        assert tok.to_single_token(f" {word}") == in_sentence == oracle.convert_tokens_to_ids(f"Ġ{word}")
    assert tok.to_single_token("<|endoftext|>") == tok.special_tokens["<|endoftext|>"]
    with pytest.raises(ValueError, match=r"`text`.*' Zqxjv'.*\d tokens: \['Ġ"):
        tok.to_single_token(" Zqxjv")
    with pytest.raises(ValueError, match=r"`text`.*''.*0 tokens"):
        tok.to_single_token("")


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\n"},
        {"role": "assistant", "content": " Hello! 😀"},
        {"role": "user", "content": ""},
    ],
    [
        {"role": "system", "content": "You call tools.", "tools": '[{"name": "f"}]'},
        {"role": "user", "content": "  spaced  "},
    ],
    [{"role": "assistant", "content": "東京 <|im_end|> inside"}],
]


@pytest.mark.parametrize(
    "template", [PHI3_TEMPLATE, PHI4_MINI_TEMPLATE, PHI4_TEMPLATE], ids=["phi3", "phi4_mini", "phi4"]
)
def test_chat_templates_match_transformers(layout, template):
    _, _, tok, oracle, _ = layout
    ours = Phi3Tokenizer.from_backend(tok._backend, chat_template=template)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            text = ours.apply_chat_template(messages, add_generation_prompt=prompt)
            assert text == oracle.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
            )
            assert ours.encode(text) == oracle_ids(oracle, text)


def test_checkpoint_template_is_used(layout):
    name, _, tok, oracle, _ = layout
    messages = CONVERSATIONS[1]
    assert tok.has_own_chat_template
    assert tok.apply_chat_template(messages) == oracle.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    opening = {"phi4": "<|im_start|>system<|im_sep|>Be brief.<|im_end|>", "phi4_mini": "<|system|>Be brief.<|end|>"}
    assert tok.apply_chat_template(messages).startswith(opening[name])
    robot = tok.apply_chat_template([{"role": "robot", "content": "beep"}])  # the checkpoint's template decides
    assert robot == oracle.apply_chat_template(
        [{"role": "robot", "content": "beep"}], tokenize=False, add_generation_prompt=True
    )


def test_template_sources(tmp_path):
    bpe = train_byte_level_bpe(CL100K, vocab_size=400)
    directory = write_phi4_dir(tmp_path / "jinja", bpe)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    oracle = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (
        Phi3Tokenizer.from_preset(directory).apply_chat_template(messages)
        == "[a][b]"
        == (oracle.apply_chat_template(messages, tokenize=False))
    )
    named = write_phi4_dir(
        tmp_path / "named",
        train_byte_level_bpe(CL100K, vocab_size=400),
        chat_template=[
            {"name": "default", "template": "{{ messages[0]['content'] }}!"},
            {"name": "tool_use", "template": "tools"},
        ],
    )
    assert Phi3Tokenizer.from_preset(named).apply_chat_template(messages) == "a!"
    bare = write_phi4_dir(tmp_path / "none", train_byte_level_bpe(CL100K, vocab_size=400), chat_template=None)
    tok = Phi3Tokenizer.from_preset(bare)
    assert not tok.has_own_chat_template
    assert tok.apply_chat_template(messages[:1]) == "<|user|>\na<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match=r"`messages\[0\]\['role'\]`.*'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "b"}])


SANDBOX_ESCAPES = {
    "dunder": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"sandbox.*__class__"),
    "globals": ("{{ cycler.__init__.__globals__ }}", r"sandbox.*__init__"),
    "private": ("{% set ns = namespace(a=1) %}{{ ns._Namespace__attrs }}", r"sandbox.*_Namespace__attrs"),
    "mutate": ("{{ messages.append({'role': 'user', 'content': 'x'}) }}", r"sandbox.*append"),
    "format": ("{{ '{0.__class__}'.format(messages) }}", r"sandbox"),
    "include": ("{% include '/etc/passwd' %}", r"include.*may not load other templates or files"),
    "import": ("{% import 'macros.j2' as m %}{{ m }}", r"import.*may not load"),
    "extends": ("{% extends 'base.j2' %}", r"extends.*may not load"),
}


@pytest.mark.parametrize("name", list(SANDBOX_ESCAPES))
def test_sandbox_refuses_templates_that_reach_outside(name, tok_sp):
    source, message = SANDBOX_ESCAPES[name]
    tok = Phi3Tokenizer.from_backend(tok_sp._backend, chat_template=source)
    with pytest.raises(ChatTemplateError, match=message):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_clear(tok_sp):
    raising = Phi3Tokenizer.from_backend(tok_sp._backend, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="refused the messages: roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Phi3Tokenizer.from_backend(tok_sp._backend, "{% for m in messages %}{{ m }")
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])
    tojson = Phi3Tokenizer.from_backend(tok_sp._backend, "{{ messages | tojson }}{{ tools | tojson(indent=1) }}")
    messages = [{"role": "user", "content": "é"}]
    assert tojson.apply_chat_template(messages, tools=[1]) == json.dumps(messages, ensure_ascii=False) + "[\n 1\n]"
    with pytest.raises(ValueError, match=r"`chat_template`.*3"):
        Phi3Tokenizer(tok_sp.proto, chat_template=3)


@pytest.fixture(scope="module")
def tok_sp():
    from phi3lab.tokenization.training import train_sentencepiece

    return Phi3Tokenizer(train_sentencepiece([" ".join(WORDS)] * 50, vocab_size=400))


def test_config_flags_win_over_tokenizer_json(tmp_path):
    """tokenizer.json says `<|im_start|>` strips nothing; tokenizer_config.json says both sides,
    and transformers follows the config."""
    directory = write_phi4_dir(
        tmp_path, train_byte_level_bpe(CL100K, vocab_size=500), json_flags={"<|im_start|>": (False, False)}
    )
    tok, oracle = Phi3Tokenizer.from_preset(directory), transformers.AutoTokenizer.from_pretrained(str(directory))
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    texts = ["a <|im_start|> b", "x\n<|im_start|>\ny", " <|im_start|>user"]
    assert [tok.encode(t) for t in texts] == [oracle_ids(oracle, t) for t in texts]
    assert [tok.encode(t) for t in texts] != [raw.encode(t, add_special_tokens=False).ids for t in texts]


def test_bad_checkpoints_are_refused(tmp_path):
    directory = write_phi4_dir(tmp_path / "ids", train_byte_level_bpe(CL100K, vocab_size=400))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    first = min(config["added_tokens_decoder"], key=int)
    config["added_tokens_decoder"][str(int(first) + 500)] = config["added_tokens_decoder"].pop(first)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"<\|dummy_0\|>.*id \d+; .*tokenizer\.json gives it \d+"):
        Phi3Tokenizer.from_preset(directory)
    config = {k: v for k, v in config.items() if k != "eos_token"}
    config["added_tokens_decoder"] = {}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token"):
        Phi3Tokenizer.from_preset(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>'.*does not hold"):
        Phi3Tokenizer.from_preset(directory)
    wordpiece = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordpiece.decoder = tokenizers.decoders.WordPiece()
    (tmp_path / "wordpiece").mkdir()
    wordpiece.save(str(tmp_path / "wordpiece" / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"byte-level BPE.*'WordPiece'"):
        Phi3Tokenizer.from_preset(tmp_path / "wordpiece")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers file"):
        Phi3Tokenizer.from_preset(tmp_path / "broken")


def test_save_hf_round_trips_through_transformers(layout, tmp_path):
    _, directory, tok, _, specials = layout
    written = tok.save_hf(tmp_path)
    assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    reloaded, ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), Phi3Tokenizer.from_preset(tmp_path)
    for text in TEXTS + random_texts(50, specials, seed=8):
        assert oracle_ids(reloaded, text) == tok.encode(text) == ours.encode(text), text
    messages = CONVERSATIONS[1]
    assert (
        ours.apply_chat_template(messages)
        == tok.apply_chat_template(messages)
        == (reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    )
    with pytest.raises(AttributeError, match="SentencePiece"):
        tok.save_assets(tmp_path / "keras")


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_pads_as_transformers(layout, side):
    _, _, tok, oracle, _ = layout
    texts = ["Hello world", "", "<|user|>Hi there, how are you?<|end|><|assistant|>", "東京 😀"]
    ids, mask = tok.encode_batch(texts, padding_side=side)
    expected = oracle(texts, add_special_tokens=False, padding="longest", padding_side=side, return_tensors="np")
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"].astype(bool))


def test_bad_arguments_name_themselves(layout):
    _, _, tok, _, _ = layout
    with pytest.raises(TypeError, match=r"`text`.*3"):
        tok.to_single_token(3)
    with pytest.raises(ValueError, match=rf"`ids`.*\[0, {tok.vocabulary_size}\)"):
        tok.to_str_tokens([tok.vocabulary_size])
    with pytest.raises(ValueError, match=r"`token`.*such as 'ĠMary'.*received token='ĠMaryy'"):
        tok.token_to_id("ĠMaryy")
    with pytest.raises(ValueError, match=r"`backend`.*TokenizerBackend"):
        Phi3Tokenizer.from_backend("tokenizer.json")
    with pytest.raises(ValueError, match=r"`messages\[0\]`.*content"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match=r"`messages\[0\]\['role'\]`.*a str"):
        tok.apply_chat_template([{"role": None, "content": "x"}])


RICH_TEMPLATE = (
    "{%- set ns = namespace(system='', count=0) -%}"
    "{%- for m in messages -%}{%- if m.role == 'system' -%}{%- set ns.system = m.content | trim -%}"
    "{%- else -%}{%- set ns.count = ns.count + 1 -%}{%- endif -%}{%- endfor -%}"
    "[{{ ns.system }}|{{ ns.count }}]\n"
    "{% for m in messages if m.role != 'system' %}"
    "{% if loop.index > 3 %}{% break %}{% endif %}"
    "{{ loop.index }}:{{ m['role'] | upper }}={{ m.content | tojson }}{% if not loop.last %};{% endif %}\n"
    "{% endfor %}"
    "{% if tools is defined and tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{{ bos_token ~ '/' ~ eos_token }}{{ add_generation_prompt }}"
)


def test_template_features_match_transformers(layout):
    """Namespaces, loop controls, filters, `tools` and the special-token names, as transformers."""
    _, _, tok, oracle, _ = layout
    ours = Phi3Tokenizer.from_backend(tok._backend, chat_template=RICH_TEMPLATE)
    messages = CONVERSATIONS[1] + [{"role": "user", "content": f'turn {i} "quoted" é'} for i in range(3)]
    tools = [{"name": "get_weather", "parameters": {"city": "東京"}}]
    for kwargs in ({}, {"tools": tools}):
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, **kwargs) == (
                oracle.apply_chat_template(
                    messages, chat_template=RICH_TEMPLATE, tokenize=False, add_generation_prompt=prompt, **kwargs
                )
            )
