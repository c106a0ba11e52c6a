"""The key/value cache's layout and its per-layer form, the per-layer weight
views of the decode loop, and generation through them against the stack."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
from conftest import random_backbone
from phi3lab.generation import programs
from phi3lab.model.kv_cache import KVCache, LayerCache
from phi3lab.model.stacked import from_bits, layer_views, to_bits


@pytest.fixture(scope="module")
def model():
    # Room for two runs of the decode loop (64 tokens each).
    room = {"max_sequence_length": 128, "pretraining_sequence_length": 128}
    return random_backbone(seed=5, scale=0.3, rope=None, num_key_value_heads=2, **room)


def test_cache_holds_the_rotated_keys_and_values_of_the_uncached_forward(model):
    ids = np.asarray([[5, 17, 33, 8, 60, 2], [41, 9, 71, 12, 3, 30]], np.int32)
    batch, length, slots = *ids.shape, 10
    cache = KVCache.empty(model, batch, slots)
    mask = jnp.ones((batch, slots), bool)
    positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
    _, _, cache = model.apply(model.params(), ids, mask, cache=cache, positions=positions)
    reference = phi3lab.trace(model, ids, names=["blocks.*.attn.hook_rot_k", "blocks.*.attn.hook_v"])
    heads, dh = model.num_key_value_heads, model.head_dim
    assert cache.keys.shape == (model.num_layers, batch, heads, dh, slots)
    assert cache.values.shape == (model.num_layers, batch, heads, slots, dh)
    for layer in range(model.num_layers):
        keys = reference[f"blocks.{layer}.attn.hook_rot_k"]  # [B, T, Hkv, dh]
        values = reference[f"blocks.{layer}.attn.hook_v"]
        np.testing.assert_allclose(cache.keys[layer, ..., :length], keys.transpose(0, 2, 3, 1), atol=1e-5)
        np.testing.assert_allclose(cache.values[layer, :, :, :length], values.transpose(0, 2, 1, 3), atol=1e-5)
        assert not np.asarray(cache.keys[layer, ..., length:]).any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_layer_writes_and_reads_the_same_slots_stacked_or_by_layer(dtype):
    rng = np.random.default_rng(0)
    layers, batch, heads, dh, slots = 3, 2, 2, 4, 7
    stacked = KVCache(
        jnp.asarray(rng.standard_normal((layers, batch, heads, dh, slots)), dtype),
        jnp.asarray(rng.standard_normal((layers, batch, heads, slots, dh)), dtype),
    )
    by_layer = stacked.by_layer()
    assert by_layer.keys[1].shape == (batch * heads, dh, slots)
    new_keys, new_values = (jnp.asarray(rng.standard_normal((batch, 2, heads, dh)), dtype) for _ in range(2))
    results = []
    for cache in (stacked, by_layer):  # held as bits, as the decoder holds them
        written = LayerCache(jax.tree.map(to_bits, cache), 1, jnp.dtype(dtype)).write(new_keys, new_values, 4)
        whole = jax.tree.map(lambda bits: from_bits(bits, jnp.dtype(dtype)), written.cache.stacked(batch))
        results.append((written.read(batch), whole))
    (read_stacked, whole_stacked), (read_by_layer, whole_by_layer) = results
    for ours, reference in zip((*read_by_layer, *whole_by_layer), (*read_stacked, *whole_stacked)):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(reference, np.float32))
    keys, values = read_stacked  # the numpy reference of a write at slots 4, 5
    np.testing.assert_array_equal(np.asarray(keys[:, :, :, 4:6]), np.asarray(new_keys.transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(np.asarray(values[:, :, 4:6]), np.asarray(new_values.transpose(0, 2, 1, 3)))
    np.testing.assert_array_equal(np.asarray(keys[:, :, :, :4]), np.asarray(stacked.keys[1, ..., :4]))


def test_layer_views_share_the_stacked_weights(model):
    decoder = model.params()["decoder"]
    views = layer_views(decoder)
    assert len(views) == model.num_layers
    for layer, view in enumerate(views):
        for ours, stacked in zip(jax.tree.leaves(view), jax.tree.leaves(decoder)):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(stacked[layer]))
            offset = layer * ours.size * ours.dtype.itemsize
            assert ours.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + offset  # no copy
    assert isinstance(programs.loop_weights(model.params())["decoder"], list)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params())
    assert programs.loop_weights(half) is half  # 16-bit weights keep the stack


def test_generation_through_layer_views_equals_generation_through_the_stack(model, monkeypatch):
    prompts = [[7, 3, 51, 9], [12, 40]]
    names = ["blocks.*.attn.hook_k", "blocks.1.attn.hook_pattern", "hook_logits"]
    assert isinstance(programs.loop_weights(model.params())["decoder"], list)
    views = phi3lab.generate(model, prompts, max_new_tokens=70, stop=[], names=names)  # two decode-loop runs
    monkeypatch.setattr("phi3lab.generation.decoding.loop_weights", lambda params: params)
    stack = phi3lab.generate(model, prompts, max_new_tokens=70, stop=[], names=names)
    for ours, reference in zip(views, stack):
        np.testing.assert_array_equal(ours.token_ids, reference.token_ids)
        np.testing.assert_allclose(ours.logprobs, reference.logprobs, atol=1e-5)
        for name in reference.trace.names:
            assert ours.trace[name].shape == reference.trace[name].shape, name
            np.testing.assert_allclose(ours.trace[name], reference.trace[name], rtol=1e-5, atol=1e-5, err_msg=name)
    length = len(views[0].token_ids)
    assert views[0].trace["blocks.0.attn.hook_k"].shape == (1, length, model.num_key_value_heads, model.head_dim)
