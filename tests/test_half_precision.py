"""16-bit floats in buffers written one layer at a time (`phi3lab.model.stacked`).

XLA:CPU updates or reads one slice of a bfloat16 buffer that is being written
by converting all of it to float32 (a pass over every layer's slice for each
layer). phi3lab writes such buffers through their `uint16` bits instead: the
KV cache and generation's per-step buffers. Captures are not stacked at all:
each layer that captures runs alone.

Oracles: NumPy slice assignment for the helpers; for the programs, the
float32 run cast to bfloat16, the same layer run after a scan of the layers
before it and after those layers run alone, and the uncached forward. The
program tests read the compiled HLO: a float32 array of a whole stacked
buffer's shape is the pass being removed (it is there without the bitcasts).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
from conftest import random_backbone, token_batch
from phi3lab.model.kv_cache import KVCache
from phi3lab.model.stacked import from_bits, to_bits, update_slice
from phi3lab.tracing import forward_fn

LAYERS = 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_update_slice_and_bits_agree_with_numpy(dtype):
    rng = np.random.default_rng(0)
    buffer = rng.standard_normal((4, 3, 5)).astype(dtype)
    update = rng.standard_normal((1, 2, 5)).astype(dtype)
    expected = buffer.copy()
    expected[2, 1:3] = update[0]
    got = np.asarray(jax.jit(update_slice)(jnp.asarray(buffer), jnp.asarray(update), (2, 1, 0)))
    assert got.dtype == buffer.dtype
    np.testing.assert_array_equal(got.view(np.uint8), expected.view(np.uint8))  # bit for bit
    bits = to_bits(jnp.asarray(buffer))
    assert bits.dtype == (jnp.uint16 if dtype != "float32" else jnp.float32)
    np.testing.assert_array_equal(np.asarray(from_bits(bits, buffer.dtype)).view(np.uint8), buffer.view(np.uint8))


def _float32_arrays(hlo: str, shape) -> int:
    """How many instructions of `hlo` produce a float32 array of `shape`."""
    return hlo.count(f"= f32[{','.join(map(str, shape))}]")


def test_bfloat16_maps_leave_the_program_per_layer_without_a_float32_pass():
    """Each layer's bfloat16 maps are their own outputs: no buffer stacked
    over the layers exists in the program, in any dtype."""
    model = random_backbone(seed=3, num_layers=LAYERS)
    ids, mask = token_batch(16, seed=1)
    maps = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores"]
    fn = forward_fn(model, maps, capture_dtype="bfloat16")
    args = (model.params(), jnp.asarray(ids), jnp.asarray(mask.astype(bool)), ())
    hlo = jax.jit(fn.run).lower(*args).compile().as_text()
    stacked = f"[{LAYERS},3,{model.num_query_heads},16,16]"
    assert stacked not in hlo
    assert f"bf16[3,{model.num_query_heads},16,16]" in hlo  # one layer's map, as the program returns it
    half = phi3lab.trace(model, ids, padding_mask=mask, names=maps, capture_dtype="bfloat16")
    full = phi3lab.trace(model, ids, padding_mask=mask, names=maps)
    for name in half.names:
        assert half[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(half[name], full[name].astype(ml_dtypes.bfloat16), err_msg=name)


@pytest.fixture(scope="module")
def half_model():
    return random_backbone(seed=4, num_layers=LAYERS, dtype="bfloat16")


def test_bfloat16_stream_after_a_scan_matches_it_after_layers_run_alone(half_model):
    """Capturing only the last layer scans the layers before it (bfloat16
    carried through `lax.scan`); capturing every layer runs each alone. The
    last layer's residual stream agrees to bfloat16 rounding (the two
    programs fuse, and so round, differently: 2 ulps here; a wrong layer's
    weights in the scan is off by the stream's own size)."""
    ids, mask = token_batch(12, seed=2)
    last = f"blocks.{LAYERS - 1}."
    after_scan = phi3lab.trace(half_model, ids, padding_mask=mask, names=last + "*")
    alone = phi3lab.trace(half_model, ids, padding_mask=mask)
    assert after_scan.names == [n for n in alone.names if n.startswith(last)]
    for name in after_scan.names:
        assert after_scan[name].dtype == alone[name].dtype != np.uint16, name
    for where in ("pre", "mid", "post"):
        name = f"{last}hook_resid_{where}"
        got, expected = (a.astype(np.float32) for a in (after_scan[name], alone[name]))
        np.testing.assert_allclose(got, expected, rtol=0, atol=2**-5 * (1 + np.abs(expected).max()), err_msg=name)
    assert alone["blocks.1.hook_resid_post"].dtype == ml_dtypes.bfloat16


def test_bfloat16_cache_is_written_in_place_and_reads_back(half_model):
    ids, _ = token_batch(10, seed=3)
    ids = jnp.asarray(ids[:1])
    slots = 32
    mask = jnp.arange(slots)[None] < ids.shape[1]

    def prefill(params, ids, cache):
        hidden, _, cache = half_model.apply(params, ids, mask, cache=cache, cache_index=0)
        return hidden, cache

    cache = KVCache.empty(half_model, 1, slots)
    program = jax.jit(prefill).lower(half_model.params(), ids, cache).compile()
    heads, dh = (LAYERS, 1, half_model.num_key_value_heads), half_model.head_dim
    for whole in ((*heads, dh, slots), (*heads, slots, dh)):  # keys, values
        assert _float32_arrays(program.as_text(), whole) == 0
    hidden, cache = program(half_model.params(), ids, cache)
    assert cache.keys.dtype == jnp.bfloat16
    uncached = half_model.apply(half_model.params(), ids, jnp.ones(ids.shape, bool))[0]
    np.testing.assert_allclose(np.asarray(hidden, np.float32), np.asarray(uncached, np.float32), rtol=2**-6, atol=2**-6)
    # The trace runs each capturing layer alone, the prefill scans them: the
    # programs fuse, and so round, differently (0.07 on keys of size 7 by the
    # last layer); a key in the wrong slot or layer is off by its own size.
    rot_k = phi3lab.trace(half_model, np.asarray(ids), names="blocks.*.attn.hook_rot_k")
    for layer in range(LAYERS):
        stored = np.asarray(cache.keys[layer, 0, ..., : ids.shape[1]]).transpose(2, 0, 1)  # [T, Hkv, dh]
        expected = rot_k[f"blocks.{layer}.attn.hook_rot_k"][0].astype(np.float32)
        atol = 2**-5 * (1 + np.abs(expected).max())
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=0, atol=atol, err_msg=f"layer {layer}")
    assert not np.any(np.asarray(cache.keys[..., ids.shape[1] :], np.float32))  # untouched slots


def test_bfloat16_generation_buffers_are_written_in_place():
    """The decode loop writes each new token's captures into `[CHUNK, ...]`
    buffers; for a bfloat16 model no float32 copy of a whole buffer exists."""
    from phi3lab.generation.programs import CHUNK
    from phi3lab.runtime import compile_cache

    model = random_backbone(seed=5, num_layers=LAYERS, dtype="bfloat16")
    ids, _ = token_batch(6, seed=4)
    generation = phi3lab.generate(model, ids[0], max_new_tokens=3, names="blocks.*.hook_resid_post")
    resid = generation.trace["blocks.1.hook_resid_post"]
    assert str(resid.dtype) == "bfloat16" and resid.shape[1] == 6 + 3
    loops = [program for key, program in compile_cache.entries(model).items() if "loop" in key]
    assert loops
    for program in loops:
        hlo = program.compiled.as_text()
        # the residual streams' buffer: [CHUNK] steps of [L, B, 1, D] stacked layers
        assert _float32_arrays(hlo, (CHUNK, LAYERS, 1, 1, model.hidden_dim)) == 0


# === Reads through the bits keep their derivatives ===========================


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reads_through_the_bits_differentiate_as_the_plain_reads(dtype):
    """A bitcast has no derivative: through the bits alone, the gradient of
    a layer (`layer_of`) or of embedding rows (`rows`) with respect to the
    16-bit array, and of a write (`update_slice`) with respect to the
    update, is silently zero. Oracle: the gradient of the plain slice,
    gather and update, under `jit` with traced indices too."""
    from phi3lab.model.embedding import rows
    from phi3lab.model.stacked import layer_of

    rng = np.random.default_rng(0)
    stack = jnp.asarray(rng.standard_normal((3, 4, 5)), dtype)
    table = jnp.asarray(rng.standard_normal((9, 4)), dtype)
    ids = jnp.array([[1, 7, 1]])
    squares = lambda read: lambda array: jnp.sum(read(array).astype(jnp.float32) ** 2)
    cases = [
        (stack, lambda s: layer_of(s, 1), lambda s: s[1]),
        (stack, lambda s: layer_of(s, jnp.int32(2)), lambda s: s[2]),
        (table, lambda t: rows(t, ids), lambda t: t[ids]),
    ]
    for array, through_bits, plain in cases:
        got = jax.jit(jax.grad(squares(through_bits)))(array)
        expected = jax.grad(squares(plain))(array)
        assert np.abs(np.asarray(expected, np.float32)).sum() > 0
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    # Writes too (`update_slice`), with respect to the buffer and the update.
    update = jnp.asarray(rng.standard_normal((1, 2, 5)), dtype)
    written = lambda write: lambda buffer, update: jnp.sum(write(buffer, update).astype(jnp.float32) ** 3)
    start = (1, jnp.int32(2), 0)
    got = jax.jit(jax.grad(written(lambda b, u: update_slice(b, u, start)), argnums=(0, 1)))(stack, update)
    expected = jax.grad(written(lambda b, u: jax.lax.dynamic_update_slice(b, u, start)), argnums=(0, 1))(stack, update)
    for g, e in zip(got, expected):
        assert np.abs(np.asarray(e, np.float32)).sum() > 0
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def test_bfloat16_weights_get_the_gradients_of_their_float32_copy(half_model):
    """Every weight of a bfloat16 model has a gradient (through the layer
    scan and the embedding lookup, which read 16-bit weights through their
    bits), pointing where the gradient with respect to a float32 copy of
    the weights points (cosine over 0.99: they differ by bfloat16 rounding).
    Before the reads had derivatives, every decoder kernel's was zero."""
    ids, mask = token_batch(12, seed=5)
    params = half_model.params()

    def loss(params):
        hidden = half_model.apply(params, jnp.asarray(ids), jnp.asarray(mask))[0]
        return jnp.sum(half_model.unembed(params, hidden).astype(jnp.float32) ** 2)  # every weight counts

    got = jax.tree.leaves_with_path(jax.grad(loss)(params))
    expected = jax.tree.leaves(jax.grad(loss)(jax.tree.map(lambda a: a.astype(jnp.float32), params)))
    for (path, g), e in zip(got, expected):
        g, e = np.asarray(g, np.float64).ravel(), np.asarray(e, np.float64).ravel()
        cosine = g @ e / (np.linalg.norm(g) * np.linalg.norm(e) + 1e-30)
        assert cosine > 0.99, (jax.tree_util.keystr(path), cosine)
