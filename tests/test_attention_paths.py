"""The attention paths of `Phi3Attention` against transformers' eager Phi-3.

The plain forward (no attention map captured) runs flash attention on GPUs
and `_attend_causal_blocks` elsewhere: a block of queries at a time over the
keys up to its last query. `use_fused_attention = False` forces the explicit
scores -> softmax -> z of `attend` over every key. `fused_attention` (the
`jax.nn.dot_product_attention` call that flash attention goes through) runs
here with XLA's implementation. Each path is compared with the oracle on
GQA, "su" scaling below and above the pretraining window, a sliding window,
and left/right padding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from conftest import (
    LENGTHS,
    assert_matches_transformers,
    hf_config,
    hf_model,
    require,
    token_batch,
)
from phi3lab import Phi3Backbone
from phi3lab.model.attention import Phi3Attention, fused_attention

HF_TOLERANCE = 1e-4
# Blocks of 4 queries: the 13-token inputs are attended as 4 + 4 + 4 + 1.
SMALL_BLOCK = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    require("transformers")
    reference = hf_model(hf_config("longrope", 2, sliding_window=4), seed=7)
    directory = tmp_path_factory.mktemp("hf_paths")
    reference.save_pretrained(directory)
    return reference, Phi3Backbone.from_preset(str(directory))


def run(model, ids, mask, path: str):
    attention = model.decoder.attention
    settings = attention.use_fused_attention, attention.min_causal_block
    attention.use_fused_attention, attention.min_causal_block = path == "blocks", SMALL_BLOCK
    try:
        # A fresh jit per path: the settings are read while tracing.
        hidden = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])(model.params(), ids, mask)
        return np.asarray(hidden), np.asarray(model.unembed(model.params(), hidden))
    finally:
        attention.use_fused_attention, attention.min_causal_block = settings


@pytest.mark.parametrize("path", ["blocks", "explicit"])
@pytest.mark.parametrize("length", [LENGTHS["below"], LENGTHS["above"]])
def test_each_path_matches_transformers(pair, path, length):
    reference, model = pair
    assert_matches_transformers(model, reference, [length], HF_TOLERANCE, lambda m, i, k: run(m, i, k, path))


def test_paths_agree_everywhere_including_padding(pair):
    _, model = pair
    ids, mask = token_batch(LENGTHS["above"], seed=3, pad=5)
    blocks, _ = run(model, ids, mask, "blocks")
    explicit, _ = run(model, ids, mask, "explicit")
    # Left-padded queries have no key to attend to: both paths give them the
    # same (zero-attention) output, so even padded positions agree.
    np.testing.assert_allclose(blocks, explicit, atol=1e-5)


def attention_inputs(length, num_key_value_heads=2, seed=0):
    """Random q `[3, T, 4, 8]`, k and v `[3, T, Hkv, 8]`, and `token_batch`'s mask."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (3, length, 4, 8))
    k, v = (jax.random.normal(key, (3, length, num_key_value_heads, 8)) for key in keys[1:])
    return q, k, v, jnp.asarray(token_batch(length, seed=seed, pad=5)[1], bool)


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("num_key_value_heads", [1, 2, 4])
def test_causal_blocks_and_fused_attention_equal_attend(sliding_window, num_key_value_heads):
    """Every path's `z` equals `attend`'s on 21 queries (blocks of 4 leave
    a last block of 1), with padding on both sides and grouped heads."""
    attention = Phi3Attention(1, 32, 4, num_key_value_heads, sliding_window=sliding_window)
    attention.min_causal_block = SMALL_BLOCK
    q, k, v, mask = attention_inputs(21, num_key_value_heads)
    expected = attention.attend(q, k, v, mask, 0)[2]
    blocks = attention._attend_causal_blocks(q, k, v, mask)
    fused = fused_attention(q, k, v, mask, sliding_window, implementation="xla")
    np.testing.assert_allclose(blocks, expected, atol=1e-6)
    np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_causal_blocks_never_score_future_keys():
    """At T=256 the blocks are 64 queries over 64, 128, 192 and 256 keys: the
    compiled program holds no 256 x 256 score array, and half the key
    columns of the square are never computed."""
    attention = Phi3Attention(1, 32, 4, 2)
    q, k, v, mask = attention_inputs(256)
    hlo = jax.jit(attention._attend_causal_blocks).lower(q, k, v, mask).as_text()
    full = jax.jit(lambda *a: attention.attend(*a, 0)[2]).lower(q, k, v, mask).as_text()
    assert "x2x2x256x256xf32>" in full  # the explicit path's [b, k, g, t, s] scores
    assert "x256x256x" not in hlo
    for keys in (64, 128, 192, 256):
        assert f"x2x2x64x{keys}xf32>" in hlo, keys
