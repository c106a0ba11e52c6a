"""Small but real byte-level BPE tokenizer directories in Phi-4's and Phi-4-mini's layout, written
with the `tokenizers` library alone (no phi3lab code), for the tokenizer tests.

Layout of microsoft/phi-4 and microsoft/Phi-4-mini-instruct: `tokenizer.json` with a BPE model
over GPT-2's byte alphabet, pre-tokenizer `Sequence([Split(<regex>, "isolated"),
ByteLevel(add_prefix_space=False, use_regex=False)])` (Phi-4: GPT-4's cl100k regex; Phi-4-mini:
GPT-4o's o200k regex), a `ByteLevel` decoder, the added tokens after the learned vocabulary
with their flags; `tokenizer_config.json` (`GPT2Tokenizer`, `added_tokens_decoder`, named
special tokens, `chat_template`, `clean_up_tokenization_spaces: false`); `generation_config.json`;
`config.json` (model_type "phi3", see `write_model_config`).

Phi-4 (ids 100256..100351 there): `<|dummy_N|>`, `<|endoftext|>`, `<|fim_*|>`, `<|im_start|>`,
`<|im_end|>`, `<|im_sep|>`, `<|endofprompt|>`, all `special`, `lstrip` and `rstrip`; bos
`<|endoftext|>`, eos `<|im_end|>`, pad `<|dummy_85|>`, no unk. Phi-4-mini (ids 199999..200029):
`<|endoftext|>`, `<|endofprompt|>`, `<|assistant|>`, `<|end|>`, `<|user|>`, `<|system|>` (special,
rstrip but the first two), `<|tool|>`, `<|/tool|>`, `<|tool_call|>`, `<|/tool_call|>`,
`<|tool_response|>` (rstrip, *not* special), `<|tag|>`, `<｜PAD▁TOKEN｜>`; bos `<|endoftext|>`, eos
`<|end|>`, pad `<｜PAD▁TOKEN｜>`, and unk "ï¿½" — U+FFFD's bytes, a learned token that the config
also lists as a special added token (id 3251 there).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CL100K = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
O200K = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% endif %}"
)
PHI4_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

PHI4_ADDED = (
    [
        "<|dummy_0|>",
        "<|endoftext|>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|dummy_1|>",
        "<|dummy_2|>",
        "<|dummy_3|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|im_sep|>",
    ]
    + [f"<|dummy_{i}|>" for i in range(4, 13)]
    + ["<|endofprompt|>"]
    + [f"<|dummy_{i}|>" for i in range(13, 88)]
)
# (content, rstrip, special) of Phi-4-mini's added tokens after the learned vocabulary.
PHI4_MINI_ADDED = [
    ("<|endoftext|>", False, True),
    ("<|endofprompt|>", False, True),
    ("<|assistant|>", True, True),
    ("<|end|>", True, True),
    ("<|user|>", True, True),
    ("<|system|>", True, True),
    ("<|tool|>", True, False),
    ("<|/tool|>", True, False),
    ("<|tool_call|>", True, False),
    ("<|/tool_call|>", True, False),
    ("<|tool_response|>", True, False),
    ("<|tag|>", True, True),
    ("<｜PAD▁TOKEN｜>", False, True),
]
PHI4_MINI_UNK = "ï¿½"  # U+FFFD's UTF-8 bytes in GPT-2's byte alphabet

WORDS = [
    "the",
    "a",
    "of",
    "attention",
    "head",
    "layer",
    "residual",
    "stream",
    "token",
    "model",
    "neuron",
    "circuit",
    "induction",
    "copy",
    "Paris",
    "France",
    "capital",
    "hello",
    "world",
    "question",
    "answer",
    "probe",
    "logit",
    "lens",
    "patch",
    "Mary",
    "John",
    "store",
    "went",
    "When",
    "café",
    "naïve",
    "Zürich",
    "résumé",
    "über",
    "Ελληνικά",
    "русский",
    "東京",
    "日本語",
    "数学",
    "中文",
    "한국어",
    "don't",
    "it's",
    "we're",
]
CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "import numpy as np\nnp.zeros((3, 4), dtype=np.float32)",
    "SELECT * FROM t WHERE id = 42;",
    '<div class="x">&amp;</div>',
    "x = {'a': [1, 2, 3], \"b\": None}  # comment",
]


def corpus(count: int = 2500, seed: int = 1) -> list[str]:
    """Training sentences: prose, code, numbers, accents, CJK, emoji, U+FFFD."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        if i % 3 == 0:
            line = line.capitalize() + rng.choice([".", "?", "!", ":", ","])
        if i % 5 == 0:
            line += f" {rng.randint(0, 10 ** rng.randint(1, 8))}"
        if i % 7 == 0:
            line += " " + rng.choice(CODE)
        if i % 11 == 0:
            line += rng.choice([" 😀", "🎉", " \ufffd", "\ufffd\ufffd", "\t\t", "\n\n"])
        lines.append(line)
    return lines


def train_byte_level_bpe(pattern: str, vocab_size: int = 1200):
    """A byte-level BPE `tokenizers.Tokenizer` with the pre-tokenizer and decoder of Phi-4's
    tokenizer.json (no added tokens yet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def entry(content: str, lstrip: bool, rstrip: bool, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": lstrip,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def write_model_config(directory: Path, tokenizer) -> None:
    """The checkpoint's config.json: model_type "phi3" is what makes transformers 5 load
    tokenizer.json as it is (TokenizersBackend) rather than rebuild a GPT2Tokenizer, whose
    pre-tokenizer is GPT-2's, not the checkpoint's."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
    }
    (directory / "config.json").write_text(json.dumps(config))


def write_phi4_dir(directory: Path, tokenizer, json_flags: dict | None = None, chat_template=PHI4_TEMPLATE) -> Path:
    """Phi-4's tokenizer files over `tokenizer` (a trained byte-level BPE). `json_flags` gives
    tokenizer.json other (lstrip, rstrip) flags than tokenizer_config.json's for some tokens."""
    from tokenizers import AddedToken

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True) for t in PHI4_ADDED])
    for token, (lstrip, rstrip) in (json_flags or {}).items():
        tokenizer.add_tokens([AddedToken(token, lstrip=lstrip, rstrip=rstrip, normalized=False, special=True)])
    tokenizer.save(str(directory / "tokenizer.json"))
    decoder = {str(tokenizer.token_to_id(t)): entry(t, True, True, True) for t in PHI4_ADDED}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 16384,
        "pad_token": "<|dummy_85|>",
        "tokenizer_class": "GPT2Tokenizer",
    }
    if chat_template is None:
        del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    generation = {
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
    }
    (directory / "generation_config.json").write_text(json.dumps(generation))
    write_model_config(directory, tokenizer)
    return directory


def write_phi4_mini_dir(directory: Path, tokenizer) -> Path:
    """Phi-4-mini-instruct's tokenizer files over `tokenizer` (a trained byte-level BPE)."""
    from tokenizers import AddedToken

    directory.mkdir(parents=True, exist_ok=True)
    unk_id = tokenizer.token_to_id(PHI4_MINI_UNK)
    assert unk_id is not None, "the training corpus must make U+FFFD's bytes one token"
    tokenizer.add_tokens([AddedToken(PHI4_MINI_UNK, lstrip=False, rstrip=False, normalized=False, special=True)])
    tokenizer.add_tokens(
        [
            AddedToken(t, lstrip=False, rstrip=rstrip, normalized=False, special=special)
            for t, rstrip, special in PHI4_MINI_ADDED
        ]
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    decoder = {str(unk_id): entry(PHI4_MINI_UNK, False, False, True)}
    decoder |= {
        str(tokenizer.token_to_id(t)): entry(t, False, rstrip, special) for t, rstrip, special in PHI4_MINI_ADDED
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<|endoftext|>",
        "chat_template": PHI4_MINI_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end|>",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<｜PAD▁TOKEN｜>",
        "padding_side": "left",
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": PHI4_MINI_UNK,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    generation = {
        "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
        "eos_token_id": [tokenizer.token_to_id("<|end|>"), tokenizer.token_to_id("<|endoftext|>")],
    }
    (directory / "generation_config.json").write_text(json.dumps(generation))
    write_model_config(directory, tokenizer)
    return directory
