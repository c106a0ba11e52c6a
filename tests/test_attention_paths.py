"""The attention paths of `Phi3Attention` against transformers' eager Phi-3.

The plain forward (no attention map captured) runs flash attention on GPUs
and `_attend_causal_blocks` elsewhere: a block of queries at a time over the
keys up to its last query. Long inputs run `_attend_in_chunks`: a chunk of
queries against a chunk of keys at a time with a running softmax, skipping
the key chunks no query of the chunk sees. `AttentionPaths(fused=False)`
forces the explicit scores -> softmax -> z of `attend` over every key. `fused_attention` (the
`jax.nn.dot_product_attention` call that flash attention goes through) runs
here with XLA's implementation. Each path is compared with the oracle on
GQA, "su" scaling below and above the pretraining window, a sliding window,
and left/right padding. The paths are one frozen value, `AttentionPaths`,
passed to `apply` and keying the compiled programs (the tests at the end).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from conftest import (
    LENGTHS,
    assert_matches_transformers,
    hf_config,
    hf_model,
    random_backbone,
    require,
    token_batch,
)
from phi3lab import Phi3Backbone
from phi3lab.model import AttentionPaths
from phi3lab.model.attention import Phi3Attention
from phi3lab.model.fused_attention import fused_attention
from phi3lab.model.kv_cache import KVCache

HF_TOLERANCE = 1e-4
# Blocks of 4 queries: the 13-token inputs are attended as 4 + 4 + 4 + 1.
SMALL_BLOCK = 4
# Chunks of 4 (13 > 2 * 4, so the "chunks" path runs): 4 query chunks
# against up to 4 key chunks, the last ones padded.
SMALL_CHUNK = 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    require("transformers")
    reference = hf_model(hf_config("longrope", 2, sliding_window=4), seed=7)
    directory = tmp_path_factory.mktemp("hf_paths")
    reference.save_pretrained(directory)
    return reference, Phi3Backbone.from_preset(str(directory))


PATHS = {  # query_chunk_size 1024: no chunks
    "blocks": AttentionPaths(fused=True, causal_block=SMALL_BLOCK, query_chunk_size=1024),
    "chunks": AttentionPaths(fused=True, causal_block=SMALL_BLOCK, query_chunk_size=SMALL_CHUNK),
    "explicit": AttentionPaths(fused=False, causal_block=SMALL_BLOCK, query_chunk_size=1024),
}


def run(model, ids, mask, path: str):
    # A fresh jit per path: the paths are static, read while tracing.
    forward = jax.jit(lambda p, i, m: model.apply(p, i, m, attention_paths=PATHS[path])[0])
    hidden = forward(model.params(), ids, mask)
    return np.asarray(hidden), np.asarray(model.unembed(model.params(), hidden))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("length", [LENGTHS["below"], LENGTHS["above"]])
def test_each_path_matches_transformers(pair, path, length):
    reference, model = pair
    assert_matches_transformers(model, reference, [length], HF_TOLERANCE, lambda m, i, k: run(m, i, k, path))


def test_paths_agree_everywhere_including_padding(pair):
    _, model = pair
    ids, mask = token_batch(LENGTHS["above"], seed=3, pad=5)
    explicit, _ = run(model, ids, mask, "explicit")
    # Left-padded queries have no key to attend to: every path gives them the
    # same (zero-attention) output, so even padded positions agree.
    for path in ("blocks", "chunks"):
        np.testing.assert_allclose(run(model, ids, mask, path)[0], explicit, atol=1e-5, err_msg=path)


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
    q, k, v, mask = attention_inputs(21, num_key_value_heads)
    expected = attention.attend(q, k, v, mask, 0)[2]
    blocks = attention._attend_causal_blocks(q, k, v, mask, SMALL_BLOCK)
    fused = fused_attention(q, k, v, mask, sliding_window, implementation="xla")
    np.testing.assert_allclose(blocks, expected, atol=1e-6)
    np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_causal_blocks_never_score_future_keys():
    """At T=256 the blocks are 64 queries over 64, 128, 192 and 256 keys: the
    compiled program holds no 256 x 256 score array, and half the key
    columns of the square are never computed."""
    attention = Phi3Attention(1, 32, 4, 2)
    q, k, v, mask = attention_inputs(256)
    hlo = jax.jit(lambda *a: attention._attend_causal_blocks(*a, 64)).lower(q, k, v, mask).as_text()
    full = jax.jit(lambda *a: attention.attend(*a, 0)[2]).lower(q, k, v, mask).as_text()
    assert "x2x2x256x256xf32>" in full  # the explicit path's [b, k, g, t, s] scores
    assert "x256x256x" not in hlo
    for keys in (64, 128, 192, 256):
        assert f"x2x2x64x{keys}xf32>" in hlo, keys


@pytest.mark.parametrize("sliding_window", [None, 5, 11])
@pytest.mark.parametrize("num_key_value_heads", [1, 2, 4])
@pytest.mark.parametrize(("length", "chunk"), [(21, 4), (40, 8)])
def test_chunks_equal_attend_with_their_gradients(sliding_window, num_key_value_heads, length, chunk):
    """The running softmax over chunks of keys gives `attend`'s `z` and the
    same gradients (the key-chunk loop is a scan with a cond): windows that
    skip whole key chunks (5 and 11 against chunks of 4 and 8) or none,
    grouped heads, padding on both sides, and a last chunk that is padded."""
    attention = Phi3Attention(1, 32, 4, num_key_value_heads, sliding_window=sliding_window)
    q, k, v, mask = attention_inputs(length, num_key_value_heads)
    np.testing.assert_allclose(
        attention._attend_in_chunks(q, k, v, mask, chunk), attention.attend(q, k, v, mask, 0)[2], atol=1e-6
    )

    def loss(path):
        return lambda q, k, v: jnp.sum(jnp.sin(path(q, k, v)))

    expected = jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, mask, 0)[2]), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(lambda q, k, v: attention._attend_in_chunks(q, k, v, mask, chunk)), argnums=(0, 1, 2))(
        q, k, v
    )
    for got, want, name in zip(chunked, expected, "qkv"):
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_chunks_never_hold_more_than_one_chunk_of_scores():
    """At T=64 in chunks of 8 the program scores 8 queries against 8 keys at
    a time: no score array spans more keys than a chunk."""
    attention = Phi3Attention(1, 32, 4, 2)
    q, k, v, mask = attention_inputs(64)
    hlo = jax.jit(lambda *a: attention._attend_in_chunks(*a, 8)).lower(q, k, v, mask).as_text()
    full = jax.jit(lambda *a: attention.attend(*a, 0)[2]).lower(q, k, v, mask).as_text()
    assert "x2x2x64x64xf32>" in full
    assert "x2x2x8x8xf32>" in hlo
    assert not any(f"x2x2x8x{keys}xf32>" in hlo for keys in (16, 32, 64))


def test_prefill_attends_over_the_prompt_not_the_whole_cache(pair):
    """A prefill from a static slot 0 attends over the prompt's own 13 keys,
    as the plain forward does: the 19 later slots of a 32-slot cache are
    every query's future. It gives the hidden states and the cache that the
    prefill from a traced slot 0 gives, which scores all 32 slots."""
    _, model = pair
    ids, mask = token_batch(LENGTHS["above"], seed=3, pad=5)
    batch, length = ids.shape
    slots = 32
    slot_mask = jnp.asarray(np.pad(mask, ((0, 0), (0, slots - length)), constant_values=1), bool)
    positions = jnp.asarray(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
    cache = KVCache.empty(model, batch, slots)

    def prefill(params, ids, slot_mask, positions, cache, index):
        return model.apply(params, ids, slot_mask, positions=positions, cache=cache, cache_index=index)[::2]

    args = (model.params(), jnp.asarray(ids), slot_mask, positions, cache)
    static = jax.jit(lambda *a: prefill(*a, 0))
    traced = jax.jit(prefill)
    (hidden, filled), (expected, expected_cache) = static(*args), traced(*args, np.int32(0))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[real], np.asarray(expected)[real], atol=1e-5)
    for got, want in zip(filled, expected_cache):
        np.testing.assert_allclose(got, want, atol=1e-5)
    scores_over_cache = f"x{length}x{slots}xf32>"
    assert scores_over_cache in traced.lower(*args, np.int32(0)).as_text()
    assert scores_over_cache not in static.lower(*args).as_text()


def test_chunk_gradients_recompute_scores_instead_of_keeping_them():
    """The backward pass of the chunked path recomputes each chunk pair's
    scores: the gradient program at T=256 (chunks of 64) needs less
    temporary memory than one `[B, Hq, T, T]` float32 array of scores
    (3 MiB), where keeping the 16 chunk pairs' scores and weights took 12."""
    attention = Phi3Attention(1, 32, 4, 2)
    q, k, v, mask = attention_inputs(256)
    gradient = jax.jit(jax.grad(lambda q: jnp.sum(attention._attend_in_chunks(q, k, v, mask, 64))))
    temporary = gradient.lower(q).compile().memory_analysis().temp_size_in_bytes
    assert temporary < q.shape[0] * 4 * 256 * 256 * 4


def test_attention_paths_are_a_checked_frozen_value():
    paths = AttentionPaths(causal_block=np.int64(128))
    assert paths == AttentionPaths(causal_block=128) and hash(paths) == hash(AttentionPaths(causal_block=128))
    assert type(paths.causal_block) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        paths.fused = False
    with pytest.raises(ValueError, match=r"`causal_block` must be a positive integer; received causal_block=0\."):
        AttentionPaths(causal_block=0)
    with pytest.raises(TypeError, match=r"`causal_block` must be a positive integer; received causal_block='64'"):
        AttentionPaths(causal_block="64")
    with pytest.raises(
        TypeError, match=r"`query_chunk_size` must be a positive integer; received query_chunk_size=2\.5"
    ):
        AttentionPaths(query_chunk_size=2.5)
    with pytest.raises(ValueError, match=r"`fused` must be True or False; received fused=1\."):
        AttentionPaths(fused=1)


def test_apply_runs_the_paths_it_is_given():
    """`apply(attention_paths=...)` picks the path, whatever the model holds:
    at T=13, chunks of 4 add two loops (a map over query chunks, a scan over
    key chunks) to the layer scan, blocks of 4 make four score matmuls of
    one, and the model's own paths (blocks of 256) make the explicit path's
    one. A value that is not an `AttentionPaths` is refused, naming it."""
    model = random_backbone(seed=2, scale=0.1)
    ids = jnp.asarray(token_batch(LENGTHS["above"], seed=1)[0])

    def text(paths):
        forward = jax.jit(lambda p, i: model.apply(p, i, attention_paths=paths)[0])
        return forward.lower(model.params(), ids).as_text()

    own = text(None)
    explicit, blocks, chunks = (text(PATHS[path]) for path in ("explicit", "blocks", "chunks"))
    assert own == explicit
    assert own.count("stablehlo.while") == 1 and chunks.count("stablehlo.while") == 3
    assert blocks.count("stablehlo.dot_general") == explicit.count("stablehlo.dot_general") + 2 * 3
    assert model.attention_paths == AttentionPaths()
    with pytest.raises(ValueError, match=r"`attention_paths` must be a phi3lab.model.AttentionPaths"):
        model.apply(model.params(), ids, attention_paths={"fused": False})
    with pytest.raises(ValueError, match=r"received attention_paths=\(True, 256, 512\)"):
        model.attention_paths = (True, 256, 512)


def test_attention_paths_are_not_part_of_the_config():
    """The paths change speed and memory, never the function, and their best
    values depend on the machine: `get_config` leaves them out (so keras-hub
    reads phi3lab's configs as before) and a model from a config runs the
    defaults."""
    model = random_backbone(seed=2, scale=0.1)
    model.attention_paths = AttentionPaths(fused=False, causal_block=64)
    config = model.get_config()
    assert not {"attention_paths", "causal_block", "query_chunk_size", "use_fused_attention"} & set(config)
    assert Phi3Backbone.from_config(config).attention_paths == AttentionPaths()


def test_the_old_attribute_forms_warn_and_replace_the_value():
    model = random_backbone(seed=2, scale=0.1)
    attention = model.decoder.attention
    new_form = r"model\.attention_paths = dataclasses\.replace\(model\.attention_paths, "
    with pytest.warns(DeprecationWarning, match=new_form + "causal_block="):
        attention.causal_block = 64
    with pytest.warns(DeprecationWarning, match=new_form + "fused="):
        attention.use_fused_attention = False
    with pytest.warns(DeprecationWarning, match=new_form + "query_chunk_size="):
        attention.query_chunk_size = 8
    assert model.attention_paths == AttentionPaths(fused=False, causal_block=64, query_chunk_size=8)
    with pytest.warns(DeprecationWarning, match="causal_block"):
        assert attention.causal_block == 64
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="received causal_block=0"):
        attention.causal_block = 0
    with pytest.warns(DeprecationWarning, match="query_chunk_size="):
        layer = Phi3Attention(1, 32, 4, 2, query_chunk_size=16)
    assert layer.attention_paths == AttentionPaths(query_chunk_size=16)
