"""Cached generation: token-for-token against transformers' `generate`,
cached logits against the uncached forward, sampling, hooks, traces, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import phi3lab
from conftest import MAX_POSITIONS, PRETRAINING, random_backbone, require
from phi3lab.generation import Sampler
from phi3lab.presets import save_hf_checkpoint
from phi3lab.runtime import compile_cache

EOS = 2  # the eos_token_id save_hf_checkpoint writes


@pytest.fixture(scope="module")
def models():
    """phi3lab models (random weights, small) by case, shared by the tests."""
    cache = {}

    def get(case):
        if case not in cache:
            kwargs = {
                "plain": {"rope": None},
                "su": {"rope": "su"},
                "mha": {"rope": "su", "num_key_value_heads": 4},
                "window": {"rope": None, "sliding_window": 5},
            }[case]
            cache[case] = random_backbone(seed=21, scale=0.3, **kwargs)
        return cache[case]

    return get


def hf_generate(reference, rows, max_new_tokens):
    """transformers' greedy `generate` over left-padded `rows`: new ids per row."""
    import torch

    longest = max(len(r) for r in rows)
    ids = np.zeros((len(rows), longest), np.int64)
    mask = np.zeros((len(rows), longest), np.int64)
    for i, row in enumerate(rows):
        ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            eos_token_id=EOS,
        )
    return [list(r) for r in out[:, longest:].numpy()]


def truncate_at_stop(tokens):
    """transformers pads a row after its eos; phi3lab's row ends with it."""
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


PROMPTS = {
    # (rows, max_new_tokens): the "su" prompts start below the pretraining
    # window (8) and the generation crosses it.
    "single": ([[5, 17, 33, 8, 60]], 12),
    "batch": ([[5, 17, 33, 8, 60], [41, 9, 71]], 10),
}


@pytest.mark.parametrize("case", ["plain", "su", "mha", "window"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_greedy_matches_transformers_generate(tmp_path, models, case, prompt):
    transformers = require("transformers")
    model = models(case)
    save_hf_checkpoint(model, tmp_path)
    reference = transformers.Phi3ForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype="float32"
    ).eval()
    rows, max_new = PROMPTS[prompt]
    assert max(map(len, rows)) < PRETRAINING < max(map(len, rows)) + max_new <= MAX_POSITIONS
    expected = hf_generate(reference, rows, max_new)
    ours = phi3lab.generate(model, rows, max_new_tokens=max_new, stop=[EOS])
    for row, (theirs, g) in enumerate(zip(expected, ours)):
        assert g.new_token_ids.tolist() == truncate_at_stop(theirs), f"row {row}"
        assert g.token_ids[: g.prompt_length].tolist() == rows[row]
        assert g.finish_reason == ("stop" if EOS in theirs else "length")


# === Cached steps against the uncached forward ==============================


def uncached_logits(model, ids, hooks=None):
    """Logits `[T, V]` of the uncached forward of `ids` (through `trace`)."""
    return phi3lab.trace(model, np.asarray([ids]), names="hook_logits", hooks=hooks).logits[0].astype(np.float64)


def relative_error(ours, reference) -> float:
    ours, reference = (np.nan_to_num(np.asarray(a, np.float64), neginf=0.0) for a in (ours, reference))
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


def test_every_step_equals_the_uncached_forward(models):
    # Below the rotary switch: 3 + 5 positions <= pretraining window 8.
    model = models("su")
    g = phi3lab.generate(model, [7, 3, 51], max_new_tokens=5, stop=[], names="hook_logits")
    reference = uncached_logits(model, g.token_ids.tolist())
    assert g.trace.logits.shape == (1, 8, model.vocabulary_size)
    assert relative_error(g.trace.logits[0], reference) < 1e-5
    steps = reference[g.prompt_length - 1 : -1]
    np.testing.assert_array_equal(g.new_token_ids, steps.argmax(-1))
    log_probs = (
        steps
        - np.log(np.exp(steps - steps.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - steps.max(-1, keepdims=True)
    )
    chosen = log_probs[np.arange(len(steps)), g.new_token_ids]
    np.testing.assert_allclose(g.logprobs, chosen, atol=1e-5)


def test_trace_equals_trace_of_the_final_sequence(models):
    model = models("su")
    g = phi3lab.generate(model, [7, 3, 51], max_new_tokens=4, stop=[], names="*")
    reference = phi3lab.trace(model, g.token_ids[None])
    assert g.trace.names == reference.names
    assert g.trace.prompt_length == 3
    for name in reference.names:
        assert g.trace[name].shape == reference[name].shape, name
        assert relative_error(g.trace[name], reference[name]) < 1e-5, name


def test_batched_rows_give_what_they_give_alone(models):
    model = models("window")  # no rotary scaling: rows are independent
    rows = [[5, 17, 33, 8, 60, 2, 9], [41, 9, 71]]
    together = phi3lab.generate(model, rows, max_new_tokens=6, stop=[], names="blocks.1.attn.hook_pattern")
    for row, g in zip(rows, together):
        alone = phi3lab.generate(model, row, max_new_tokens=6, stop=[], names="blocks.1.attn.hook_pattern")
        np.testing.assert_array_equal(g.token_ids, alone.token_ids)
        assert relative_error(g.trace["blocks.1.attn.hook_pattern"], alone.trace["blocks.1.attn.hook_pattern"]) < 1e-5


def test_capture_memory_guard_and_estimate(models):
    model = models("plain")
    with pytest.raises(phi3lab.tracing.CaptureTooLarge, match="memory_budget"):
        phi3lab.generate(model, [1, 2, 3], max_new_tokens=2, names="*", memory_budget=1000)
    est = phi3lab.generation.estimate(model, 3, 2, names="blocks.*.attn.hook_pattern")
    g = phi3lab.generate(model, [1, 2, 3], max_new_tokens=2, stop=[], names="blocks.*.attn.hook_pattern")
    assert est.captured == sum(g.trace[n].nbytes for n in g.trace.names)
    assert est.working > 0


# === Sampling ===============================================================


def test_sampling_is_reproducible_and_stays_in_the_allowed_set(models):
    model = models("plain")
    prompt = [4, 8, 15, 16]
    runs = [
        phi3lab.generate(model, prompt, max_new_tokens=6, temperature=1.5, top_k=3, seed=s, stop=[]) for s in (1, 1, 2)
    ]
    np.testing.assert_array_equal(runs[0].token_ids, runs[1].token_ids)
    assert not np.array_equal(runs[0].token_ids, runs[2].token_ids)
    for g in runs:
        steps = uncached_logits(model, g.token_ids.tolist())[g.prompt_length - 1 : -1]
        for logits, token in zip(steps, g.new_token_ids):
            assert token in np.argsort(logits)[-3:]
    nucleus = phi3lab.generate(model, prompt, max_new_tokens=6, temperature=0.7, top_p=0.6, seed=3, stop=[])
    steps = uncached_logits(model, nucleus.token_ids.tolist())[nucleus.prompt_length - 1 : -1]
    for logits, token in zip(steps, nucleus.new_token_ids):
        probs = np.exp((logits - logits.max()) / 0.7)
        probs /= probs.sum()
        # allowed: tokens whose more likely tokens hold less than top_p of the mass
        more_likely = probs[probs > probs[token]].sum()
        assert more_likely < 0.6
    greedy = phi3lab.generate(model, prompt, max_new_tokens=6, stop=[])
    zero = phi3lab.generate(model, prompt, max_new_tokens=6, temperature=0.0, top_k=2, seed=9, stop=[])
    np.testing.assert_array_equal(greedy.token_ids, zero.token_ids)


def test_tokens_depend_on_the_seed_not_on_how_the_loop_is_cut(models):
    # Streaming runs the decode loop one token at a time; without it the loop
    # runs chunks of many tokens. Both cross the rotary switch (a rebuilding
    # prefill), sample, and capture: the same seed gives the same run.
    model = models("su")
    prompt = [4, 8, 15, 16, 23]
    kwargs = dict(max_new_tokens=14, temperature=1.2, top_k=20, seed=7, stop=[], names="blocks.1.attn.hook_pattern")
    pieces = []
    streamed = phi3lab.generate(model, prompt, stream=pieces.append, **kwargs)
    chunked = phi3lab.generate(model, prompt, **kwargs)
    assert pieces == streamed.new_token_ids.tolist()
    np.testing.assert_array_equal(streamed.token_ids, chunked.token_ids)
    np.testing.assert_allclose(streamed.logprobs, chunked.logprobs, atol=1e-6)
    np.testing.assert_allclose(
        streamed.trace["blocks.1.attn.hook_pattern"], chunked.trace["blocks.1.attn.hook_pattern"], atol=1e-6
    )


def test_sampler_allowed_set_is_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    np.testing.assert_array_equal(Sampler(1.0, top_p=0.75).allowed(logits), [True, True, False, False])
    np.testing.assert_array_equal(Sampler(1.0, top_p=0.85).allowed(logits), [True, True, True, False])
    np.testing.assert_array_equal(Sampler(1.0, top_k=1).allowed(logits), [True, False, False, False])


# === Stop tokens, streaming, text ===========================================


def test_text_stream_stop_and_progress(shipped_model, shipped_tokenizer, capsys):
    model, tok = shipped_model, shipped_tokenizer
    pieces = []
    prompt = "When Mary and John went to the store, John gave a drink to"
    g = phi3lab.generate(model, prompt, tokenizer=tok, max_new_tokens=6, stream=pieces.append, progress=True)
    assert "".join(pieces) == g.text == str(g)
    assert g.text.strip().startswith("Mary")
    assert "generate" in capsys.readouterr().err  # the progress bar
    first = int(g.new_token_ids[0])
    stopped = phi3lab.generate(model, prompt, tokenizer=tok, max_new_tokens=6, stop=[first])
    assert stopped.finish_reason == "stop" and stopped.new_token_ids.tolist() == [first] and stopped.text == ""
    assert phi3lab.generate(model, prompt, tokenizer=tok, max_new_tokens=2, stop=[]).finish_reason == "length"
    batch = phi3lab.generate(model, [prompt, "John and Mary"], tokenizer=tok, max_new_tokens=3)
    assert batch[0].text == str(phi3lab.generate(model, prompt, tokenizer=tok, max_new_tokens=3))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": MAX_POSITIONS}, "max_new_tokens"),
        ({"prompt": list(range(1, MAX_POSITIONS + 1))}, "prompt"),
        ({"stop": [10_000]}, "stop"),
        ({"stop": ["<|end|>"]}, "stop"),  # a string needs a tokenizer
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": -0.5}, "temperature"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": "text"}, "tokenizer"),
        ({"stream": 3}, "stream"),
    ],
)
def test_bad_arguments(models, kwargs, fragment):
    args = {"prompt": [1, 2, 3], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        phi3lab.generate(models("plain"), **args)


def test_unknown_stop_token_string(shipped_model, shipped_tokenizer):
    model, tok = shipped_model, shipped_tokenizer
    with pytest.raises(ValueError, match="stop"):
        phi3lab.generate(model, "hello", tokenizer=tok, stop=["<|no-such-token|>"])


# === Hooks ==================================================================


def test_steered_generation_equals_the_naive_loop_and_reuses_programs(models):
    model = models("plain")
    rng = np.random.default_rng(0)
    prompt, name = [9, 2, 44, 13], "blocks.0.hook_resid_post"
    results = []
    for vector in (rng.standard_normal(model.hidden_dim), rng.standard_normal(model.hidden_dim)):
        hooks = phi3lab.hooks.add(name, vector.astype(np.float32), scale=2.0)
        g = phi3lab.generate(model, prompt, max_new_tokens=5, stop=[], hooks=hooks)
        ids = list(prompt)
        for _ in range(5):  # the naive loop: a hooked uncached forward per token
            ids.append(int(uncached_logits(model, ids, hooks)[-1].argmax()))
        assert g.token_ids.tolist() == ids
        results.append(g)
        if len(results) == 1:
            programs = compile_cache.size(model, "generate")
    assert compile_cache.size(model, "generate") == programs  # a new vector: no new program
    assert results[0].token_ids.tolist() != results[1].token_ids.tolist()
    unsteered = phi3lab.generate(model, prompt, max_new_tokens=5, stop=[])
    assert unsteered.token_ids.tolist() != results[0].token_ids.tolist()


def test_head_ablation_applies_at_every_step(models):
    model = models("su")
    hooks = phi3lab.hooks.ablate_heads(1, [0, 2])
    g = phi3lab.generate(model, [7, 3, 51], max_new_tokens=4, stop=[], hooks=hooks, names="blocks.1.attn.hook_z")
    reference = phi3lab.trace(model, g.token_ids[None], hooks=hooks, names="blocks.1.attn.hook_z")
    z = g.trace["blocks.1.attn.hook_z"]
    assert not z[:, :, [0, 2]].any()
    assert relative_error(z, reference["blocks.1.attn.hook_z"]) < 1e-5


def test_a_repeated_generation_traces_nothing(models):
    """A generation whose programs are cached runs them without tracing the
    model again: a hook's Python function runs only while a program is
    traced, so its call count stays put on the second and third runs."""
    model = models("plain")
    calls = []

    def count(x, ctx):
        calls.append(ctx.name)

    hooks = {"blocks.0.hook_resid_post": count}
    first = phi3lab.generate(model, [9, 2, 44, 13], max_new_tokens=4, stop=[], hooks=hooks)
    traced = len(calls)
    assert traced > 0
    for _ in range(2):
        again = phi3lab.generate(model, [9, 2, 44, 13], max_new_tokens=4, stop=[], hooks=hooks)
        assert again.token_ids.tolist() == first.token_ids.tolist()
    assert len(calls) == traced, f"traced {len(calls) - traced} more times"


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[1]}"
    import numpy as np, keras, jax, phi3lab
    from phi3lab.sharding import model_parallel
    devices = int(sys.argv[1])
    assert len(jax.devices()) == devices
    config = dict(vocabulary_size=96, num_layers=2, hidden_dim=32, intermediate_dim=64,
                  num_query_heads=8, num_key_value_heads=4, max_sequence_length=128)
    keras.utils.set_random_seed(0)
    model = phi3lab.Phi3Backbone(**config)
    weights = model.get_weights()
    prompts = np.random.default_rng(0).integers(0, 96, (2, 9))
    names, hooks = "blocks.1.attn.hook_pattern", phi3lab.hooks.ablate_heads(0, [1])
    # 70 new tokens: the decode loop runs twice, taking back the cache it returned.
    reference = phi3lab.generate(model, prompts, max_new_tokens=70, stop=[], names=names, hooks=hooks)
    keras.distribution.set_distribution(model_parallel(model_axis=min(devices, 4), num_key_value_heads=4))
    sharded = phi3lab.Phi3Backbone(**config)
    sharded.set_weights(weights)
    assert len(sharded.decoder.attention.query_kernel.value.sharding.device_set) == devices
    result = phi3lab.generate(sharded, prompts, max_new_tokens=70, stop=[], names=names, hooks=hooks)
    for want, got in zip(reference, result):
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_allclose(got.trace.attention(1), want.trace.attention(1), atol=1e-5)
    print("same tokens")
""")


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 8])
def test_generation_on_a_sharded_model(devices):
    """Generation carries the layouts of a model sharded over several
    (simulated) devices through its prefill and decode loop, and gives the
    unsharded model's tokens and captures."""
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(devices)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "same tokens" in result.stdout
