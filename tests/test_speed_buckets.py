"""Length buckets, bfloat16 captures, the compile cache of `trace`, and how
its programs run the layers (a scan, or each layer alone).

Oracle for the padded runs: the same pure forward (`forward_fn`) jitted at the
input's own length, with no padding, on the same random weights. The rotary
switch is the sharp edge: lengths below the pretraining window padded past it
must keep the short "su" factors (a run that follows the padded length
differs by O(1), which the comparison would show).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import phi3lab
from conftest import PRETRAINING, backbone_kwargs, random_backbone, token_batch
from phi3lab.model import AttentionPaths
from phi3lab.runtime import compile_cache
from phi3lab.tracing import compiled_count, forward_fn


@pytest.fixture(scope="module")
def model():
    # max_sequence_length 32: every length pads to 32. Weights at 0.1 N(0, 1)
    # keep scores O(1): with larger ones, float32 rounding alone moves the
    # results by ~1e-5 whenever the program's shapes change (a batch of 4
    # instead of 3 does that too), padding or not.
    return random_backbone(seed=11, scale=0.1)


def unpadded(model, ids, mask):
    fn = forward_fn(model, None)
    captures, hidden = jax.jit(lambda *args: (fn(*args).captures, fn(*args).hidden))(model.params(), ids, mask)
    return {name: np.asarray(value) for name, value in captures.items()}, np.asarray(hidden)


def assert_close(got, expected, name):
    """Within 1e-6 of `expected`, relative to its scale (1 + max |value|);
    -inf scores exactly where they were."""
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(got)), name
    scale = 1.0 + float(np.abs(expected[finite]).max())
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-6 * scale, err_msg=name)


@pytest.mark.parametrize("length", [5, PRETRAINING, 13])  # below / at / above the pretraining window
def test_padded_trace_equals_unpadded_run(model, length):
    ids, mask = token_batch(length, seed=length)  # unpadded, left-padded and right-padded rows
    tr = phi3lab.trace(model, ids, padding_mask=mask)
    reference, hidden = unpadded(model, ids, mask)
    assert set(tr.names) == set(reference)
    for name, expected in reference.items():
        assert tr[name].shape == expected.shape, name
        assert_close(tr[name], expected, name)
    assert_close(tr.output, hidden, "output")
    assert tr.rope.factor_set == ("short" if length <= PRETRAINING else "long")


def test_padding_follows_real_length_for_rotary_factors(model):
    # Control: running the padded input with the factors of the padded length
    # (the mistake buckets must not make) visibly changes the queries.
    ids, mask = token_batch(5, seed=1)
    good = phi3lab.trace(model, ids, padding_mask=mask, names="blocks.0.attn.hook_rot_q")
    fn = forward_fn(model, "blocks.0.attn.hook_rot_q")
    padded = np.pad(ids, ((0, 0), (0, 27))), np.pad(mask, ((0, 0), (0, 27)))
    wrong = jax.jit(lambda *args: fn(*args).captures)(model.params(), *padded)["blocks.0.attn.hook_rot_q"][:, :5]
    assert np.abs(np.asarray(wrong) - good["blocks.0.attn.hook_rot_q"]).max() > 1e-2


def test_window_and_heads_are_cut_back(model):
    ids, mask = token_batch(13, seed=2)
    full = phi3lab.trace(model, ids, padding_mask=mask, names="blocks.1.attn.hook_pattern")
    part = phi3lab.trace(
        model, ids, padding_mask=mask, names="blocks.1.attn.hook_pattern", queries=slice(4, 9), heads=[2, 0]
    )
    np.testing.assert_allclose(
        part["blocks.1.attn.hook_pattern"], full["blocks.1.attn.hook_pattern"][:, [2, 0], 4:9], atol=1e-6
    )


def test_ten_lengths_compile_at_most_four_programs():
    model = random_backbone(seed=3, config=None, **{**backbone_kwargs(), "num_layers": 1, "max_sequence_length": 512})
    lengths = [20, 33, 40, 57, 64, 97, 150, 201, 256, 300]
    names = ["blocks.0.attn.hook_pattern", "hook_logits"]
    for length in lengths:
        tr = phi3lab.trace(model, np.arange(length) % 90, names=names)
        assert tr["blocks.0.attn.hook_pattern"].shape == (1, 4, length, length)
        assert tr.logits.shape == (1, length, 96)
    assert compile_cache.size(model, "trace") == compiled_count(model) <= 4
    assert [compile_cache.bucket_length(n, 512) for n in (33, 40, 57)] == [64, 64, 64]


def test_new_attention_paths_compile_a_new_program():
    """The attention paths are read while a program is traced, so the
    model's value is part of the compile-cache key: a chunked run after
    assigning a smaller `query_chunk_size` is a new program (the chunks add
    two loops to the layer scan); an equal value built anew reuses it, and
    the old value finds its old program again."""
    model = random_backbone(seed=11, scale=0.1)
    ids, mask = token_batch(30, seed=1)
    names = "ln_final.hook_normalized"

    def traced():
        tr = phi3lab.trace(model, ids, padding_mask=mask, names=names)
        return tr.output, {id(p): p for key, p in compile_cache.entries(model).items() if key[0] == "trace"}

    whole, programs = traced()
    (first,) = programs.values()
    default = model.attention_paths
    model.attention_paths = dataclasses.replace(default, query_chunk_size=4)  # 32 padded positions > 2 * 4: chunked
    chunked, programs = traced()
    (second,) = [p for key, p in programs.items() if p is not first]
    assert first.compiled.as_text().count("while(") == 1
    assert second.compiled.as_text().count("while(") == 3
    np.testing.assert_allclose(chunked[mask], whole[mask], atol=2e-5)
    model.attention_paths = AttentionPaths(query_chunk_size=4)  # equal, not the same object
    np.testing.assert_array_equal(traced()[0], chunked)
    model.attention_paths = default
    again, programs = traced()
    assert len(programs) == 2
    np.testing.assert_array_equal(again, whole)


def test_bucket_lengths():
    assert [compile_cache.bucket_length(n, 4096) for n in (1, 64, 65, 129, 257, 385, 512, 513, 3000)] == [
        64,
        64,
        128,
        256,
        384,
        512,
        512,
        1024,
        4096,
    ]
    assert compile_cache.bucket_length(20, 32) == 32  # capped at max_sequence_length
    assert compile_cache.bucket_length(32, 32) == 32


def test_hooks_see_the_real_positions(model):
    seen = []

    def last_position_plus_one(x, ctx):
        seen.append(x.shape)
        return x.at[:, -1].add(1.0)  # "-1" must mean the last real position, not the padding

    ids, mask = token_batch(7, seed=4)
    names = ["blocks.1.hook_resid_post", "blocks.1.attn.hook_pattern"]
    hooks = {"blocks.0.hook_resid_mid": last_position_plus_one, "blocks.0.attn.hook_pattern": lambda x, ctx: x * 0.5}
    tr = phi3lab.trace(model, ids, padding_mask=mask, names=names, hooks=hooks)
    assert seen and seen[0][1] == 7
    fn = forward_fn(model, names, hooks)
    expected = jax.jit(lambda *args: fn(*args).captures)(model.params(), ids, mask)  # the same hooks, unpadded
    for name in names:
        assert_close(tr[name], np.asarray(expected[name]), name)


def test_bfloat16_captures(model):
    ids, mask = token_batch(13, seed=5)
    names = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores", "blocks.0.hook_resid_post"]
    full = phi3lab.trace(model, ids, padding_mask=mask, names=names)
    half = phi3lab.trace(model, ids, padding_mask=mask, names=names, capture_dtype="bfloat16")
    pattern = half["blocks.1.attn.hook_pattern"]
    assert str(pattern.dtype) == "bfloat16"
    expected = full["blocks.1.attn.hook_pattern"]
    np.testing.assert_allclose(pattern.astype(np.float32), expected, rtol=2**-8, atol=1e-30)
    scores = half["blocks.0.attn.hook_attn_scores"].astype(np.float32)
    finite = np.isfinite(full["blocks.0.attn.hook_attn_scores"])
    assert np.array_equal(np.isfinite(scores), finite)
    np.testing.assert_allclose(scores[finite], full["blocks.0.attn.hook_attn_scores"][finite], rtol=2**-8)
    assert half["blocks.0.hook_resid_post"].dtype == np.float32  # only the attention maps are halved
    np.testing.assert_array_equal(half["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    maps = ["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_attn_scores"]
    est32 = phi3lab.estimate(model, 13, batch=3, names=maps)
    est16 = phi3lab.estimate(model, 13, batch=3, names=maps, capture_dtype="bfloat16")
    output = 3 * 32 * model.hidden_dim * 4  # the float32 hidden states every trace returns (padded to 32)
    assert est16.captured - output == pytest.approx((est32.captured - output) / 2, rel=1e-3)


def test_capture_dtype_is_checked(model):
    with pytest.raises(ValueError, match="capture_dtype"):
        phi3lab.trace(model, [1, 2, 3], capture_dtype="float16")


def test_layers_that_capture_or_hook_run_alone_and_the_rest_share_a_scan():
    model = random_backbone(seed=12, num_layers=6)
    segments = lambda names, hooks=None: forward_fn(model, names, hooks).plan.segments()
    assert segments(()) == [(0, 6)]
    assert segments("blocks.2.*") == [(0, 2), (2, 3), (3, 6)]
    assert segments("blocks.2.*", {"blocks.4.hook_resid_pre": lambda x, ctx: x}) == [
        (0, 2), (2, 3), (3, 4), (4, 5), (5, 6)
    ]  # fmt: skip
    assert segments(None) == [(layer, layer + 1) for layer in range(6)]
    assert segments("hook_logits") == [(0, 6)]  # model-level captures leave the layers in one scan

    ids, mask = token_batch(8, seed=3)
    args = (model.params(), jax.numpy.asarray(ids), jax.numpy.asarray(mask.astype(bool)))
    full = jax.jit(forward_fn(model, "blocks.*.attn.hook_pattern").run).lower(*args).compile().as_text()
    plain = jax.jit(forward_fn(model, ()).run).lower(*args).compile().as_text()
    assert " while(" not in full and " while(" in plain
    one_layer = f"f32[3,{model.num_query_heads},8,8]"
    assert f"[6,3,{model.num_query_heads},8,8]" not in full and one_layer in full  # no map stacked over layers
    tr = phi3lab.trace(model, ids, padding_mask=mask, names="blocks.*.attn.hook_pattern")
    got = np.stack([tr.attention(layer) for layer in range(6)])
    expected = np.stack(
        [
            phi3lab.trace(model, ids, padding_mask=mask, names=f"blocks.{layer}.attn.hook_pattern").attention(layer)
            for layer in range(6)
        ]
    )
    np.testing.assert_array_equal(got, expected)  # a layer alone after a scan = the same layer after layers alone


def test_layers_run_alone_hold_one_layers_weight_slices_at_a_time():
    """A trace that captures every layer copies each layer's weight slice
    when the layer runs, not all at the start (phi3lab compiles with XLA:CPU's
    memory-optimized scheduler, `compile_cache.compiler_options`): its
    temporaries stay below two layers' weights."""
    model = random_backbone(seed=13, scale=0.05, num_layers=8, hidden_dim=256, intermediate_dim=1024, num_query_heads=4)
    ids, mask = token_batch(8, seed=3)
    fn = forward_fn(model, "blocks.*.hook_resid_post")
    args = (model.params(), jax.numpy.asarray(ids), jax.numpy.asarray(mask.astype(bool)))
    layer_weights = sum(a.nbytes for a in jax.tree.leaves(model.params()["decoder"])) / model.num_layers
    traced = phi3lab.trace(model, ids, padding_mask=mask, names="blocks.*.hook_resid_post")["blocks.7.hook_resid_post"]
    (program,) = [p for key, p in compile_cache.entries(model).items() if key[0] == "trace"]
    ours = program.temporary_bytes
    xla_default = jax.jit(fn.run).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert ours < 2 * layer_weights < xla_default, (ours, layer_weights, xla_default)
    direct = np.asarray(fn(*args).captures["blocks.7.hook_resid_post"])  # unpadded, XLA's own scheduling
    np.testing.assert_allclose(traced, direct, rtol=0, atol=1e-5 * (1 + np.abs(direct).max()))
