"""Shared helpers for the phi3lab tests: small configs, random weights, oracles.

The oracles (keras-hub, transformers on torch CPU) are imported lazily, only by
the tests that use them, so a test file that needs neither stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from pathlib import Path
from typing import NoReturn

os.environ["KERAS_BACKEND"] = "jax"  # before anything imports keras
# Compiled programs go to a fresh directory per test session (notebook kernels
# inherit it), never to the user's cache.
if "PHI3LAB_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PHI3LAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="phi3lab-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["PHI3LAB_CACHE_DIR"], ignore_errors=True)

import numpy as np
import pytest

# The real-JupyterLab fixtures (`lab`, `page`) of tests/browser/, shared by
# every browser test (one server per session). A second conftest.py there
# would shadow this one for `from conftest import ...`.
pytest_plugins = ["browser.lab_fixtures"]

# Sizes shared by the oracle tests: small enough to compile in well under a
# second, large enough for GQA (4 query heads over 2 key/value heads) and for
# 8 rotary pairs. Positions beyond `PRETRAINING` (8) switch "su" scaling to
# the long factors; `MAX_POSITIONS / PRETRAINING` = 4 gives an attention
# factor of sqrt(1 + ln 4 / ln 8) ~ 1.29.
VOCAB, HIDDEN, FFN, LAYERS, HEADS = 96, 64, 128, 2, 4
PRETRAINING, MAX_POSITIONS = 8, 32
LENGTHS = {"below": 5, "at": PRETRAINING, "above": 13}

# The size arguments (each a positive int) as phi3lab and keras-hub name them,
# and as transformers' Phi3Config names them: the tests' own table, which
# `hf_config` builds its oracles from (a wrong entry gives an oracle of
# other sizes) and the bad-input tests reject 0 and negatives for.
HF_SIZE_NAMES = {
    "vocabulary_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "hidden_dim": "hidden_size",
    "intermediate_dim": "intermediate_size",
    "num_query_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "max_sequence_length": "max_position_embeddings",
    "pretraining_sequence_length": "original_max_position_embeddings",
}
SIZE_ARGUMENTS = tuple(HF_SIZE_NAMES)


@pytest.fixture(scope="module")
def shipped_model():
    """The shipped `phi3lab_tiny_en` backbone, loaded once per test module
    (tests that change a model load their own)."""
    import phi3lab

    return phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")


@pytest.fixture(scope="module")
def shipped_tokenizer():
    """The shipped `phi3lab_tiny_en` tokenizer, loaded once per test module."""
    import phi3lab

    return phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")


def sizes(*values: int, **named: int) -> dict:
    """`Phi3Backbone` size arguments from values in `SIZE_ARGUMENTS`' order
    (vocabulary, layers, hidden, MLP, query heads, key/value heads, max
    positions, pretraining positions; a prefix of them), then `named` ones."""
    assert len(values) <= len(SIZE_ARGUMENTS), values
    return {**dict(zip(SIZE_ARGUMENTS, values)), **named}


# Texts every tokenizer test encodes first: empty, whitespace runs, case and
# spaces at the edges of words.
EDGE_TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "Hello world",
    "hello world",
    " leading space",
    "trailing space ",
    "multiple   spaces  inside",
    "tabs\tand\nnewlines\r\n",
]


def rope_factors(num_pairs: int = HIDDEN // HEADS // 2, seed: int = 0):
    """Distinct (short, long) "su" factor lists, long ones clearly larger."""
    rng = np.random.default_rng(seed)
    short = (1.0 + 0.2 * rng.random(num_pairs)).round(4).tolist()
    long = (1.0 + np.linspace(0.0, 6.0, num_pairs) + 0.1 * rng.random(num_pairs)).round(4).tolist()
    return short, long


def backbone_kwargs(rope: str | None = "su", num_key_value_heads: int = 2, **overrides) -> dict:
    """Constructor arguments shared by phi3lab's and keras-hub's Phi3Backbone.

    The sizes above unless overridden; with `rope`, `rope_factors` sized to
    the head (`hidden_dim / num_query_heads / 2` pairs) unless given."""
    kwargs = sizes(VOCAB, LAYERS, HIDDEN, FFN, HEADS, num_key_value_heads, MAX_POSITIONS, PRETRAINING)
    kwargs.update(layer_norm_epsilon=1e-5, rope_scaling_type=rope)
    kwargs.update(overrides)
    short, long = rope_factors(kwargs["hidden_dim"] // kwargs["num_query_heads"] // 2) if rope else (None, None)
    kwargs.setdefault("rope_scaling_short_factor", short)
    kwargs.setdefault("rope_scaling_long_factor", long)
    return kwargs


def randomize_keras(model, seed: int, scale: float = 0.3) -> None:
    """Give every weight of a Keras model a random value: norm scales
    `1 + scale * N(0, 1)`, everything else `scale * N(0, 1)`."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        noise = scale * rng.standard_normal(tuple(variable.shape))
        value = 1.0 + noise if variable.path.endswith("scale") else noise
        variable.assign(value.astype(variable.dtype))


def random_backbone(seed: int, scale: float = 0.3, config: dict | None = None, **kwargs):
    """A phi3lab `Phi3Backbone(**(config or backbone_kwargs(**kwargs)))` with
    `randomize_keras` weights. Built without keras' random initializers,
    whose compilation per weight shape costs seconds on a CPU."""
    from phi3lab import Phi3Backbone

    try:
        from phi3lab.model.initializers import zero_initialization
    except ImportError:  # an older phi3lab: random init, only slower
        zero_initialization = contextlib.nullcontext
    with zero_initialization():
        model = Phi3Backbone.from_config(config) if config else Phi3Backbone(**backbone_kwargs(**kwargs))
    randomize_keras(model, seed, scale)
    return model


def keras_initialized_backbone(seed: int, *values: int, **named):
    """A phi3lab `Phi3Backbone(**sizes(*values, **named))` with keras' own
    random initialization after `keras.utils.set_random_seed(seed)`; without
    sizes, the views' model: 64 tokens, 2 layers, width 32, MLP 64, 4 query
    heads over 2."""
    import keras

    from phi3lab import Phi3Backbone

    keras.utils.set_random_seed(seed)
    return Phi3Backbone(**sizes(*(values or (64, 2, 32, 64, 4, 2)), **named))


def randomize_torch(module, seed: int, scale: float = 0.3) -> None:
    """Same as `randomize_keras` for a torch module (norm weights around 1)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = scale * torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + noise if "norm" in name else noise)


def token_batch(length: int, seed: int = 0, vocab: int = VOCAB, pad: int = 3):
    """Ids `[3, length]` and padding mask: row 0 unpadded, row 1 with `pad`
    left-padding positions, row 2 with `pad` right-padding positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, length)).astype("int32")
    mask = np.ones((3, length), "int32")
    mask[1, :pad] = 0
    mask[2, length - pad :] = 0
    return ids, mask


# What a missing requirement's message says to do, unless the call says otherwise.
MAKE_INSTALL = "`make install` (the environment `make test` runs in)"


def under_ci() -> bool:
    """True under CI (`CI=true`), where a skipped test would hide a broken set-up."""
    return os.environ.get("CI", "").lower() == "true"


def unavailable(missing: str, install: str = MAKE_INSTALL) -> NoReturn:
    """The one rule for a test whose requirement (an oracle, a binary, a data
    file) is missing: skip locally, fail under CI. The message names what is
    missing and how to install it."""
    message = f"{missing}; install it with {install}"
    if under_ci():
        pytest.fail(f"missing under CI (CI=true): {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str, install: str = MAKE_INSTALL):
    """Import and return an oracle or test-only module (`"keras_hub"`,
    `"transformers"`, `"torch"`, ...), or `unavailable`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        unavailable(f"the Python module `{module}` cannot be imported ({error})", install)


def require_binary(program: str | os.PathLike, install: str) -> str:
    """The path of an executable (a name looked up on PATH, or a path), or `unavailable`."""
    import shutil

    found = shutil.which(str(program))
    if found is None:
        where = "is not an executable file" if os.sep in str(program) else "is not on PATH"
        unavailable(f"`{program}` {where}", install)
    return found


def require_file(path: os.PathLike, what: str, install: str) -> Path:
    """`path` as a `Path` if it is a file, or `unavailable` (naming `what` it holds)."""
    path = Path(path)
    if not path.is_file():
        unavailable(f"{what} is not here ({path})", install)
    return path


_COMPILED = weakref.WeakKeyDictionary()


def forward(model, token_ids, padding_mask=None):
    """phi3lab hidden states and logits as NumPy, through the pure forward
    under `jax.jit` (the function `model.call` runs; compiled once per model
    and input shape)."""
    import jax

    if model not in _COMPILED:
        _COMPILED[model] = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask)[0])
    hidden = _COMPILED[model](
        model.params(),
        np.asarray(token_ids, "int32"),
        None if padding_mask is None else np.asarray(padding_mask),
    )
    logits = model.token_embedding(hidden, reverse=True)
    return np.asarray(hidden), np.asarray(logits)


def keras_hub_forward(model, token_ids, padding_mask):
    """keras-hub backbone output under `jax.jit` over `stateless_call`."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    run = jax.jit(lambda t, n, x: model.stateless_call(t, n, x)[0])
    inputs = {"token_ids": np.asarray(token_ids, "int32"), "padding_mask": np.asarray(padding_mask, "int32")}
    return np.asarray(run(trainable, non_trainable, inputs))


def hf_config(rope=None, num_key_value_heads=2, sliding_window=None, **overrides):
    """A small `transformers.Phi3Config` (eager attention, untied head).

    `rope` is None, "longrope" or "su". transformers 5 renames "su" to
    "longrope" but only after it checked the required keys, so the "su" dict
    must carry `original_max_position_embeddings` itself.
    """
    import transformers

    short, long = rope_factors()
    scaling = None
    if rope is not None:
        scaling = {"type": rope, "short_factor": short, "long_factor": long}
        if rope == "su":
            scaling["original_max_position_embeddings"] = PRETRAINING
    kwargs = {HF_SIZE_NAMES[k]: v for k, v in backbone_kwargs(None, num_key_value_heads).items() if k in HF_SIZE_NAMES}
    kwargs.update(
        rms_norm_eps=1e-5,
        rope_scaling=scaling,
        sliding_window=sliding_window,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.Phi3Config(**kwargs)


def hf_model(config, seed: int = 0):
    """A float32 `Phi3ForCausalLM` in eval mode with random weights."""
    import transformers

    model = transformers.Phi3ForCausalLM(config).eval()
    randomize_torch(model, seed)
    return model


def hf_forward(model, token_ids, padding_mask=None):
    """transformers' last hidden state (after the final norm) and logits."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(token_ids, "int64")),
            attention_mask=None if padding_mask is None else torch.as_tensor(np.asarray(padding_mask, "int64")),
            output_hidden_states=True,
        )
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def max_diff(a, b, padding_mask=None) -> float:
    """Largest absolute difference over the real (unpadded) positions."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    if padding_mask is not None:
        diff = diff[np.asarray(padding_mask).astype(bool)]
    return float(diff.max())


def assert_matches_transformers(model, reference, lengths, tolerance: float, run=forward) -> None:
    """phi3lab's final hidden states and logits (`run(model, ids, mask)`)
    within `tolerance` (absolute, unpadded positions) of transformers'
    `reference` on `token_batch(length, seed=length)` for each length, on
    logits that carry a real signal (some |logit| > 1)."""
    for length in lengths:
        ids, mask = token_batch(length, seed=length)
        expected_hidden, expected_logits = hf_forward(reference, ids, mask)
        hidden, logits = run(model, ids, mask)
        assert np.abs(expected_logits[mask.astype(bool)]).max() > 1.0, (length, "no signal in the oracle's logits")
        assert max_diff(hidden, expected_hidden, mask) < tolerance, (length, "hidden")
        assert max_diff(logits, expected_logits, mask) < tolerance, (length, "logits")


def corrupted_pair(seed: int, shape: tuple[int, int], shifts: dict[int, int], high: int = 90):
    """Clean and corrupted int32 ids for patching tests: clean ids uniform in
    [3, high) (no special ids), corrupted the same but for position `p` of
    every row, shifted by `shifts[p]` (mod `high`)."""
    clean = np.random.default_rng(seed).integers(3, high, shape).astype(np.int32)
    corrupted = clean.copy()
    for position, shift in shifts.items():
        corrupted[:, position] = (clean[:, position] + shift) % high
    return clean, corrupted


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a network connection fails
    loudly, so a test proves that it works offline."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError(f"network access attempted in an offline test: {args!r}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)


def put_in_hf_cache(cache: Path, repo_id: str, files: Path, commit: str) -> Path:
    """Lay the files under `files` (subfolders too) out as huggingface_hub
    caches a download of `repo_id`: content-addressed blobs, a snapshot of
    relative symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    snapshot.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        # LFS files are named by their sha256, plain git files by their git blob id.
        if path.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(repo / "blobs" / blob, link.parent), link)
    return snapshot
