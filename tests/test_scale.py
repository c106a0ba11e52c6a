"""Scale and safety: memory estimate and guard, long inputs, query windows,
sharding, no leaks (issue: scale and safety)."""

import gc
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import psutil
import pytest

import phi3lab
from conftest import sizes
from phi3lab.model import AttentionPaths
from phi3lab.tracing import CaptureTooLarge, compiled_count


def small_model(**overrides):
    """96 tokens, 3 layers, width 32, MLP 64, 4 query heads over 2, 4096 positions (64 pretraining)."""
    return phi3lab.Phi3Backbone(**sizes(96, 3, 32, 64, 4, 2, 4096, 64, **overrides))


@pytest.fixture(scope="module")
def model():
    return small_model()


def ids_of(length, batch=1, seed=0, vocab=96):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def test_estimate_counts_captured_bytes_exactly(model):
    names = ["blocks.1.attn.hook_pattern", "blocks.*.hook_resid_post"]
    # 40 positions run in the 64-position length bucket: the program (and its
    # estimate) is the one of 64 positions, whose arrays are returned whole.
    estimate = phi3lab.estimate(model, 40, batch=2, names=names)
    assert estimate == phi3lab.estimate(model, 64, batch=2, names=names)
    tr = phi3lab.trace(model, ids_of(64, batch=2), names=names)
    returned = sum(tr[n].nbytes for n in tr.names) + tr.output.nbytes
    # XLA adds a pointer table for the output tuple (8 bytes per output).
    assert returned <= estimate.captured <= returned + 8 * (len(tr.names) + 8)
    weights = sum(int(np.prod(w.shape)) * 4 for w in model.weights if "seed" not in w.path)
    assert estimate.weights == weights
    assert estimate.working > 0


def test_estimate_bounds_measured_peak(model):
    """The measured growth of resident memory during a full trace stays
    within the estimate (plus allocator slack)."""
    ids = ids_of(512)
    estimate = phi3lab.estimate(model, 512)
    phi3lab.trace(model, ids)  # compile and warm up
    gc.collect()
    before = psutil.Process().memory_info().rss
    tr = phi3lab.trace(model, ids)
    grown = psutil.Process().memory_info().rss - before
    captured = sum(tr[n].nbytes for n in tr.names)
    assert captured <= estimate.captured
    assert grown <= estimate.needed + 64 * 2**20


def test_guard_refuses_before_running(model):
    calls = []
    hook = {"hook_embed": lambda x, ctx: calls.append(1)}
    with pytest.raises(CaptureTooLarge, match=r"would need .* GiB.*names=.*queries="):
        phi3lab.trace(model, ids_of(256), hooks=hook, memory_budget=1_000_000)
    assert isinstance(CaptureTooLarge("x"), ValueError)
    # The model and the same request with a sufficient budget still work.
    tr = phi3lab.trace(model, ids_of(256), names=["hook_logits"], memory_budget=2**34)
    assert np.isfinite(tr.logits).all()


def test_query_window_rows_equal_full_pattern(model):
    ids = ids_of(50)
    full = phi3lab.trace(model, ids, names="blocks.*.attn.hook_*")
    window = phi3lab.trace(model, ids, names="blocks.*.attn.hook_*", queries=slice(30, 45), heads=[1, 3])
    for layer in range(model.num_layers):
        np.testing.assert_allclose(
            window.attention(layer, head=3)[0], full.attention(layer, head=3)[0, 30:45], atol=1e-6
        )
        np.testing.assert_array_equal(window[f"blocks.{layer}.attn.hook_pattern"].shape, (1, 2, 15, 50))
    with pytest.raises(ValueError, match="head"):
        window.attention(0, head=0)


@pytest.mark.parametrize("bad", [slice(10, 5), (0, 100), (3,), slice(0, 10, 2), slice(25, None)])
def test_bad_query_window_is_refused(model, bad):
    with pytest.raises(ValueError, match="queries"):
        phi3lab.trace(model, ids_of(20), queries=bad)


def test_hooks_on_windowed_maps_are_refused(model):
    with pytest.raises(ValueError, match="query window"):
        phi3lab.trace(model, ids_of(20), queries=slice(0, 4), hooks={"blocks.0.attn.hook_pattern": lambda x, ctx: x})


def test_chunked_attention_equals_full(model):
    """Long inputs attend a chunk of queries at a time; same result."""
    ids = ids_of(40, batch=2)
    mask = np.ones_like(ids, bool)
    mask[1, :5] = False
    reference = phi3lab.trace(model, ids, padding_mask=mask, names=["ln_final.hook_normalized"])
    chunked = small_model()
    chunked.set_weights(model.get_weights())
    chunked.attention_paths = AttentionPaths(query_chunk_size=8)  # 40 > 2 * 8: chunked path
    result = phi3lab.trace(chunked, ids, padding_mask=mask, names=["ln_final.hook_normalized"])
    np.testing.assert_allclose(result.output[mask], reference.output[mask], atol=2e-5)


@pytest.mark.slow
def test_32k_tokens_with_a_query_window_fit_in_memory():
    """The shipped model's architecture on a 32k-token input: patterns of one
    layer for the last 64 queries, without any T x T array for all heads."""
    model = small_model(
        vocabulary_size=1024,
        num_layers=2,
        hidden_dim=128,
        intermediate_dim=384,
        max_sequence_length=32768,
        pretraining_sequence_length=128,
        rope_scaling_type="su",
        rope_scaling_short_factor=[1.0] * 16,
        rope_scaling_long_factor=[4.0] * 16,
    )
    names = ["blocks.1.attn.hook_pattern", "hook_logits"]
    estimate = phi3lab.estimate(model, 32768, names=names, queries=slice(-64, None), heads=[0])
    full_maps = 2 * 4 * 32768 * 32768 * 4  # scores + pattern, 4 heads, float32: 32 GiB
    assert estimate.working < full_maps / 16
    tr = phi3lab.trace(model, ids_of(32768, vocab=1024), names=names, queries=slice(-64, None), heads=[0])
    pattern = tr["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (1, 1, 64, 32768)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-4)
    assert tr.rope.factor_set == "long"


def test_two_hundred_traces_keep_memory_flat(model):
    ids = ids_of(32)
    for _ in range(20):
        phi3lab.trace(model, ids)
    gc.collect()
    start = psutil.Process().memory_info().rss
    for step in range(200):
        tr = phi3lab.trace(model, ids + (step % 2))
    del tr
    gc.collect()
    grown = psutil.Process().memory_info().rss - start
    assert grown < 30 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 200 traces"


def test_failing_hook_leaves_model_usable(model):
    ids = ids_of(12)
    before = np.asarray(model({"token_ids": ids}))
    count = compiled_count(model)

    def broken(x, ctx):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        phi3lab.trace(model, ids, hooks={"blocks.0.hook_resid_mid": broken})
    np.testing.assert_array_equal(np.asarray(model({"token_ids": ids})), before)
    assert phi3lab.trace(model, ids, names=["hook_logits"]).logits.shape == (1, 12, 96)
    assert compiled_count(model) >= count


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import numpy as np, keras, jax, phi3lab
    from phi3lab.presets import save_preset
    from phi3lab.sharding import model_parallel
    assert len(jax.devices()) == 8
    config = dict(vocabulary_size=128, num_layers=3, hidden_dim=64, intermediate_dim=128,
                  num_query_heads=8, num_key_value_heads=4, rope_scaling_type="su",
                  rope_scaling_short_factor=[1.0] * 4, rope_scaling_long_factor=[3.0] * 4,
                  max_sequence_length=64, pretraining_sequence_length=8)
    keras.utils.set_random_seed(0)
    model = phi3lab.Phi3Backbone(**config)
    save_preset(model, sys.argv[1])
    ids = np.random.default_rng(0).integers(0, 128, (2, 12))
    reference = phi3lab.trace(model, ids)
    keras.distribution.set_distribution(model_parallel(model_axis=4, num_key_value_heads=4))
    sharded = phi3lab.Phi3Backbone.from_preset(sys.argv[1])
    spec = sharded.decoder.attention.query_kernel.value.sharding.spec
    assert tuple(spec) == (None, None, "model", None), spec
    assert len(sharded.decoder.mlp.gate_kernel.value.sharding.device_set) == 8
    tr = phi3lab.trace(sharded, ids)
    worst = max(float(np.nanmax(np.abs(np.where(np.isfinite(reference[n]), reference[n] - tr[n], 0))))
                for n in reference.names)
    print("max difference", worst)
    assert worst < 1e-4, worst
""")


@pytest.mark.slow
def test_sharded_trace_equals_unsharded(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path / "preset")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "max difference" in result.stdout


def _phi3_mini_estimates(
    dtype: str, requests: dict, preset: str = "phi3_mini_128k_instruct_en", quantization: str | None = None
) -> dict:
    """`phi3lab.estimate` of each request (its keyword arguments, or a
    function of the model giving an estimate) on Phi-3-mini's real
    architecture (128k or 4k), in `dtype` and `quantization`. The model is
    built inside `jax.eval_shape`, so its 3.8B weights are abstract shapes:
    nothing is allocated, XLA only compiles."""
    from phi3lab.presets.registry import BUILTIN

    config = dict(BUILTIN[preset]["config"])
    if config.get("rope_scaling_type"):
        # The factor values come with the download; only their count matters here.
        config.update(rope_scaling_short_factor=[1.0] * 48, rope_scaling_long_factor=[1.0] * 48)
    estimates = {}

    def build():
        model = phi3lab.Phi3Backbone(**config, dtype=dtype, quantization=quantization)
        for key, kwargs in requests.items():
            estimates[key] = kwargs(model) if callable(kwargs) else phi3lab.estimate(model, **kwargs)
        return model.params()

    jax.eval_shape(build)
    return estimates


def _gradient_estimate(model, length: int, names: tuple) -> phi3lab.tracing.MemoryEstimate:
    """XLA's memory analysis of the program `phi3lab.gradients(model, ids,
    answer=1, counterfactual=2, names=names)` runs for `length` tokens."""
    from phi3lab.tracing.gradient_trace import gradient_program, zero_probes
    from phi3lab.tracing.hook_types import Hooks
    from phi3lab.tracing.memory import tree_bytes
    from phi3lab.tracing.metrics import resolve_metric

    ids, mask = np.zeros((1, length), np.int32), np.ones((1, length), bool)
    metric = resolve_metric(model, None, 1, 2, mask)
    args = (model.params(), ids, mask, (), zero_probes(model, names, ids.shape), metric.data)
    program = gradient_program(model, names, Hooks(), metric, args, memory_budget=1 << 62)
    return phi3lab.tracing.MemoryEstimate(tree_bytes(args[0]), program.temporary_bytes, program.output_bytes)


# A 16-token trace of two layers' patterns and the logits, the plain forward,
# 32 tokens generated from 16 (the larger of prefill and decode loop), and
# gradients at two residual sites.
WORKING_SET_REQUESTS = {
    "trace": dict(seq_len=16, names=["blocks.0.attn.hook_pattern", "blocks.31.attn.hook_pattern", "hook_logits"]),
    "forward": dict(seq_len=16, names=[]),
    "generate": lambda model: phi3lab.generation.estimate(model, 16, 32, names=["hook_logits"]),
    "gradients": lambda model: _gradient_estimate(model, 16, ("blocks.0.hook_resid_pre", "blocks.31.hook_resid_pre")),
}


def test_phi3_mini_bfloat16_working_set_is_a_fraction_of_the_weights():
    """A 16-token trace of Phi-3-mini-4k in bfloat16 (two layers' patterns
    and the logits), its plain forward and a generation of 32 tokens from 16
    (the larger of its prefill and decode loop) need a working set of at most
    half the weights: one layer's weights are sliced (and widened to float32
    for XLA:CPU's matrix products) at a time. Slicing the stacked bfloat16
    weights directly made XLA:CPU convert the whole stack to float32 first
    (13.6 GiB beside 7.1 GiB of weights); generation held a per-layer copy
    of every weight beside the stack (7.1 GiB). `gradients` at two residual
    sites likewise, its backward pass reslicing each layer's weights: the
    scan kept every layer's slices for it (13.7 GiB)."""
    estimates = _phi3_mini_estimates("bfloat16", WORKING_SET_REQUESTS, preset="phi3_mini_4k_instruct_en")
    for estimate in estimates.values():
        assert 7.0e9 < estimate.weights < 8.0e9  # 3.8B parameters, 2 bytes each
        assert estimate.working <= 0.5 * estimate.weights, estimate


def test_phi3_mini_int8_working_set_is_a_fraction_of_the_int8_weights():
    """The same programs on Phi-3-mini-4k with int8 kernels (bfloat16
    otherwise): the working set stays at most half the int8 weights, so the
    kernels are dequantized one layer at a time inside the loop over layers,
    never as a bfloat16 or float32 copy of a whole stack (3.6 GB of int8
    kernels would make 7.2 GB of bfloat16)."""
    estimates = _phi3_mini_estimates(
        "bfloat16", WORKING_SET_REQUESTS, preset="phi3_mini_4k_instruct_en", quantization="int8"
    )
    # 3.6B kernel parameters in int8, plus the two bfloat16 embeddings (0.39 GB).
    int8_weights = 32 * (4 * 3072 * 3072 + 3 * 3072 * 8192) + 2 * 2 * 32064 * 3072
    for estimate in estimates.values():
        assert int8_weights <= estimate.weights < 1.01 * int8_weights  # + scales and norms
        assert estimate.working <= 0.5 * estimate.weights, estimate


def test_a_bfloat16_decode_loop_keeps_no_float32_copy_of_the_token_embeddings():
    """XLA:CPU gathers bfloat16 rows from a float32 copy of the whole token
    embedding table; in the decode loop that copy is made once and kept for
    the whole run, beside the LM head's float32 copy: 2 x V x D x 4 bytes of
    working set (at Phi-3-mini's size 0.79 GB). Gathered as `uint16` bits
    (`embedding.rows`), the table is read in place: what is left is the LM
    head's copy. A model whose vocabulary dominates its size makes the
    difference the working set."""
    vocabulary, width = 32768, 64
    model = phi3lab.Phi3Backbone(**sizes(vocabulary, 1, width, 128, 4, 4, 256), dtype="bfloat16")
    table = vocabulary * width * 4  # bytes of one float32 [V, D] copy
    working = phi3lab.generation.estimate(model, 16, 32).working
    assert working < 1.25 * table, (working, table)


@pytest.mark.slow
def test_phi3_mini_128k_window_capture_fits_16gb_in_bfloat16():
    """Two layers' patterns for the last 512 of 4096 queries plus the logits,
    beside the bfloat16 weights, fit a 16 GB accelerator; every layer's full
    patterns would not (the contrast: the estimate sees the request)."""
    window = dict(
        seq_len=4096,
        names=["blocks.0.attn.hook_pattern", "blocks.31.attn.hook_pattern", "hook_logits"],
        queries=slice(-512, None),
    )
    every_pattern = dict(seq_len=4096, names="blocks.*.attn.hook_pattern")
    bf16 = _phi3_mini_estimates("bfloat16", {"window": window, "every_pattern": every_pattern})
    assert 7.0e9 < bf16["window"].weights < 8.0e9  # 3.8B parameters, 2 bytes each
    # Patterns [1, 32, 512, 4096] x 2 layers and logits [1, 4096, 32064] (plus the
    # output [1, 4096, 3072]): at least 2, at most 4 bytes per value.
    values = 2 * 32 * 512 * 4096 + 4096 * 32064 + 4096 * 3072
    assert 2 * values <= bf16["window"].captured <= 4 * values + 2**20
    assert bf16["every_pattern"].captured > 32 * 32 * 4096 * 4096 * 2  # > 34 GB
    assert bf16["window"].weights + bf16["window"].working + 2 * bf16["window"].captured < 16e9 * 0.9
    assert bf16["window"].weights + bf16["every_pattern"].captured > 16e9


def test_windowed_trace_to_pandas_labels_true_positions_and_heads(model):
    ids = ids_of(20)
    full = phi3lab.trace(model, ids, names="blocks.0.attn.hook_pattern").to_pandas("blocks.0.attn.hook_pattern")
    window = phi3lab.trace(
        model, ids, names="blocks.0.attn.hook_pattern", queries=slice(10, 15), heads=[3, 1]
    ).to_pandas("blocks.0.attn.hook_pattern")
    assert sorted(window["head"].unique()) == [1, 3]
    assert (window["query"].min(), window["query"].max()) == (10, 14)
    merged = window.merge(full, on=["head", "query", "key"], suffixes=("_window", "_full"))
    assert len(merged) == len(window)
    np.testing.assert_allclose(merged.value_window, merged.value_full, atol=1e-6)
