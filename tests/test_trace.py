"""`phi3lab.trace`: hook names and shapes, exact identities, transformers
oracle, name selection, padding, compile-once, rotary description, text input.

Oracles: exact identities of the data flow in DESIGN.md, Hugging Face
transformers' eager Phi-3 on the same random weights (its internals read
through torch forward hooks), and independent NumPy formulas.

Exactness: sums and copies that the model computes with the same float32
operation as NumPy are compared with `np.array_equal`. One comparison cannot
be bitwise: a trace that captures `attn.hook_rot_q` / `attn.hook_rot_k`
materializes the rotated queries/keys, while a program that does not capture
them lets XLA fuse the rotation `x * cos + rotate_half(x) * sin` into its
consumers (fused multiply-adds round once instead of twice). That moves the
final hidden states by a few float32 ulps (~1e-6 relative), so a full trace
is compared with the plain jitted forward within 1e-5, and a trace that
captures only the output is compared bitwise.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import types

import jax
import numpy as np
import pandas as pd
import pytest
from jax import numpy as jnp

import phi3lab  # noqa: F401  (selects the JAX backend before keras loads)
from conftest import random_backbone, require, rope_factors, sizes
from phi3lab.tracing import compiled_count
from phi3lab.tracing.rope import MixedRotaryWarning

# === Small models with random weights ===

VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV = 64, 3, 32, 48, 4, 2
HEAD_DIM = HIDDEN // HQ
PRETRAINING, MAX_POSITIONS = 16, 64
BELOW, AT, ABOVE = 11, PRETRAINING, 23

# The hook names and shapes of DESIGN.md, transcribed (not imported) so the
# test fails if the implementation's catalogue drifts from the contract.
DESIGN_BLOCK_SITES = {
    "hook_resid_pre": "B T D",
    "ln1.hook_normalized": "B T D",
    "attn.hook_q": "B T Hq dh",
    "attn.hook_k": "B T Hkv dh",
    "attn.hook_v": "B T Hkv dh",
    "attn.hook_rot_q": "B T Hq dh",
    "attn.hook_rot_k": "B T Hkv dh",
    "attn.hook_attn_scores": "B Hq T T",
    "attn.hook_pattern": "B Hq T T",
    "attn.hook_z": "B T Hq dh",
    "hook_attn_out": "B T D",
    "hook_resid_mid": "B T D",
    "ln2.hook_normalized": "B T D",
    "mlp.hook_pre": "B T F",
    "mlp.hook_pre_linear": "B T F",
    "mlp.hook_post": "B T F",
    "hook_mlp_out": "B T D",
    "hook_resid_post": "B T D",
}
DESIGN_MODEL_SITES = {
    "hook_embed": "B T D",
    "ln_final.hook_normalized": "B T D",
    "hook_logits": "B T V",
}


def design_names(num_layers):
    names = ["hook_embed"]
    for layer in range(num_layers):
        names += [f"blocks.{layer}.{site}" for site in DESIGN_BLOCK_SITES]
    return names + ["ln_final.hook_normalized", "hook_logits"]


SIZES = sizes(VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV, MAX_POSITIONS, PRETRAINING)


def make_model(rope=None, seed=0, **overrides):
    """A GQA Phi-3 whose every weight is random (`random_backbone`), so no
    error can hide behind ones or zeros."""
    return random_backbone(seed, rope=rope, **{**SIZES, **overrides})


def random_ids(shape, seed, vocabulary_size=VOCAB):
    return np.random.default_rng(seed).integers(0, vocabulary_size, shape).astype(np.int32)


def max_error(actual, expected):
    """Largest absolute difference, relative to the reference's scale (>= 1)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def assert_close(actual, expected, tol, what=""):
    error = max_error(actual, expected)
    assert error <= tol, f"{what}: error {error:.3g} > {tol:g}"


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return random_ids((2, 12), seed=1)


@pytest.fixture(scope="module")
def full(model, ids):
    return phi3lab.trace(model, ids)


# === Names and shapes ===


def test_every_design_hook_name_is_captured_with_its_documented_shape(model, full, ids):
    batch, length = ids.shape
    sizes = {"B": batch, "T": length, "D": HIDDEN, "F": FFN, "Hq": HQ, "Hkv": HKV, "dh": HEAD_DIM, "V": VOCAB}
    expected_names = design_names(LAYERS)
    assert full.names == expected_names  # all of them, in forward order, nothing else
    assert list(full) == expected_names and len(full) == len(expected_names)
    for name in expected_names:
        site = name.split(".", 2)[2] if name.startswith("blocks.") else name
        symbols = (DESIGN_BLOCK_SITES.get(site) or DESIGN_MODEL_SITES[site]).split()
        value = full[name]
        assert isinstance(value, np.ndarray), name
        assert value.shape == tuple(sizes[s] for s in symbols), name
        assert value.dtype == np.float32, name
    assert full.output.shape == (batch, length, HIDDEN)
    np.testing.assert_array_equal(full.token_ids, ids)
    assert full.padding_mask.dtype == bool and full.padding_mask.all()


def test_trace_accessors(full):
    np.testing.assert_array_equal(full.attention(1), full["blocks.1.attn.hook_pattern"])
    np.testing.assert_array_equal(full.attention(2, head=3), full["blocks.2.attn.hook_pattern"][:, 3])
    np.testing.assert_array_equal(full.attention(-1), full[f"blocks.{LAYERS - 1}.attn.hook_pattern"])
    for where in ("pre", "mid", "post"):
        np.testing.assert_array_equal(full.resid(1, where), full[f"blocks.1.hook_resid_{where}"])
    np.testing.assert_array_equal(full.logits, full["hook_logits"])
    with pytest.raises(ValueError, match="`layer`"):
        full.attention(LAYERS)
    with pytest.raises(ValueError, match="`head`"):
        full.attention(0, head=HQ)
    with pytest.raises(ValueError, match="`where`"):
        full.resid(0, "middle")


def test_to_pandas_tables(full, ids):
    length = ids.shape[1]
    table = full.to_pandas("blocks.0.attn.hook_pattern", batch=1)
    assert len(table) == HQ * length * length
    for index in (7, len(table) // 2, len(table) - 1):
        row = table.iloc[index]
        assert row["value"] == full.attention(0)[1, row["head"], row["query"], row["key"]]
    assert (table["value"] > 0).sum() == HQ * length * (length + 1) // 2
    resid = full.to_pandas("blocks.1.hook_resid_post")
    assert len(resid) == length
    np.testing.assert_allclose(resid["norm"], np.linalg.norm(full.resid(1)[0], axis=-1), rtol=1e-6)


# === Exact identities ===


def test_residual_stream_identities_are_exact(full):
    for layer in range(LAYERS):
        pre, mid, post = (full.resid(layer, w) for w in ("pre", "mid", "post"))
        assert np.array_equal(mid, pre + full[f"blocks.{layer}.hook_attn_out"]), layer
        assert np.array_equal(post, mid + full[f"blocks.{layer}.hook_mlp_out"]), layer
        if layer + 1 < LAYERS:
            assert np.array_equal(full.resid(layer + 1, "pre"), post), layer
    assert np.array_equal(full.resid(0, "pre"), full["hook_embed"])


def test_final_norm_is_the_output_and_the_plain_forward(model, full, ids):
    assert np.array_equal(full["ln_final.hook_normalized"], full.output)
    plain = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])
    expected = np.asarray(plain(model.params(), jnp.asarray(ids), jnp.ones(ids.shape, bool)))
    # Capturing rotated q/k changes XLA's fusion (see module docstring).
    assert_close(full.output, expected, 1e-5, "full trace vs plain forward")
    only_output = phi3lab.trace(model, ids, names="ln_final.hook_normalized")
    assert only_output.names == ["ln_final.hook_normalized"]
    # trace runs the input padded to its length bucket: the same program as
    # the plain forward on the padded input, bit for bit.
    extra = ((0, 0), (0, phi3lab.runtime.compile_cache.bucket_length(ids.shape[1], MAX_POSITIONS) - ids.shape[1]))
    padded = plain(
        model.params(), jnp.asarray(np.pad(ids, extra)), jnp.asarray(np.pad(np.ones(ids.shape, bool), extra))
    )
    expected = np.asarray(padded)[:, : ids.shape[1]]
    assert np.array_equal(only_output.output, expected)
    assert np.array_equal(only_output["ln_final.hook_normalized"], expected)


def test_logits_are_the_untied_output_embedding(model, full):
    expected = np.asarray(model.token_embedding(full.output, reverse=True))
    assert np.array_equal(full.logits, expected)
    # Untied: the input embedding would give something else.
    tied = full.output @ np.asarray(model.token_embedding.embeddings.value).T
    assert not np.allclose(full.logits, tied)


def test_patterns_and_scores_are_masked_softmax(full, ids):
    length = ids.shape[1]
    future = np.triu(np.ones((length, length), bool), k=1)
    for layer in range(LAYERS):
        pattern = full.attention(layer)
        scores = full[f"blocks.{layer}.attn.hook_attn_scores"]
        assert np.all(pattern[..., future] == 0.0)
        assert np.all(np.isneginf(scores[..., future]))
        assert np.all(np.isfinite(scores[..., ~future]))
        assert np.all(pattern[..., ~future] > 0.0)
        np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-6)
        # softmax of the captured scores, in float64
        allowed = np.where(future, -np.inf, scores.astype(np.float64))
        expected = np.exp(allowed - allowed.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(pattern, expected, atol=1e-6)


# === Against transformers' eager Phi-3 ===


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """{variant: (phi3lab model, transformers model)} on the same random
    weights; variants: rope None, rope "su", and a 4-token sliding window."""
    torch = require("torch")
    transformers = require("transformers")
    from phi3lab.presets import save_hf_checkpoint

    pairs = {}
    for rope, seed, window in ((None, 11, None), ("su", 12, None), ("sliding", 13, 4)):
        ours = make_model(None if rope == "sliding" else rope, seed=seed, sliding_window=window)
        directory = tmp_path_factory.mktemp(f"hf_{rope}")
        save_hf_checkpoint(ours, directory)
        theirs = transformers.Phi3ForCausalLM.from_pretrained(
            directory, attn_implementation="eager", dtype=torch.float32
        ).eval()
        pairs[rope] = (ours, theirs)
    return pairs


def run_transformers(hf, ids):
    """Eager forward with torch hooks on every module whose input or output
    is one of our hook points. Returns (outputs, internals as NumPy)."""
    import torch
    from transformers.models.phi3 import modeling_phi3

    captured, handles = {}, []

    def keep_output(key, pick=lambda out: out):
        return lambda module, args, out: captured.__setitem__(key, pick(out))

    def keep_input(key):
        return lambda module, args: captured.__setitem__(key, args[0])

    first = lambda out: out[0] if isinstance(out, tuple) else out
    handles.append(hf.model.rotary_emb.register_forward_hook(keep_output("rope")))
    for l, layer in enumerate(hf.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        handles += [
            layer.input_layernorm.register_forward_hook(keep_output((l, "ln1"))),
            attn.qkv_proj.register_forward_hook(keep_output((l, "qkv"))),
            attn.o_proj.register_forward_pre_hook(keep_input((l, "z"))),
            attn.register_forward_hook(keep_output((l, "attn_out"), first)),
            layer.post_attention_layernorm.register_forward_hook(keep_output((l, "ln2"))),
            mlp.gate_up_proj.register_forward_hook(keep_output((l, "gate_up"))),
            mlp.down_proj.register_forward_pre_hook(keep_input((l, "post"))),
            mlp.register_forward_hook(keep_output((l, "mlp_out"))),
            layer.register_forward_hook(keep_output((l, "resid_post"), first)),
        ]
    try:
        with torch.no_grad():
            out = hf(torch.tensor(ids, dtype=torch.long), output_attentions=True, output_hidden_states=True)
            cos, sin = captured["rope"]
            batch, length = ids.shape
            heads, kv = hf.config.num_attention_heads, hf.config.num_key_value_heads
            dh = hf.config.hidden_size // heads
            for l in range(hf.config.num_hidden_layers):
                qkv = captured.pop((l, "qkv"))
                q = qkv[..., : heads * dh].view(batch, length, heads, dh)
                k = qkv[..., heads * dh : (heads + kv) * dh].view(batch, length, kv, dh)
                v = qkv[..., (heads + kv) * dh :].view(batch, length, kv, dh)
                rot_q, rot_k = modeling_phi3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
                scores = rot_q @ modeling_phi3.repeat_kv(rot_k, heads // kv).transpose(2, 3) * dh**-0.5
                gate, up = captured.pop((l, "gate_up")).chunk(2, dim=-1)
                captured.update(
                    {
                        (l, "q"): q,
                        (l, "k"): k,
                        (l, "v"): v,
                        (l, "rot_q"): rot_q.transpose(1, 2),
                        (l, "rot_k"): rot_k.transpose(1, 2),
                        (l, "scores"): scores,
                        (l, "pre"): gate,
                        (l, "pre_linear"): up,
                        (l, "z"): captured[(l, "z")].view(batch, length, heads, dh),
                    }
                )
    finally:
        for handle in handles:
            handle.remove()
    internals = {key: value.numpy() for key, value in captured.items() if key != "rope"}
    internals["cos"], internals["sin"] = captured["rope"][0][0].numpy(), captured["rope"][1][0].numpy()
    return out, internals


OURS_FOR = {
    "ln1": "ln1.hook_normalized",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "attn_out": "hook_attn_out",
    "ln2": "ln2.hook_normalized",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
}


def transformers_errors(model, hf, ids):
    """Relative max error of every hook point against transformers."""
    tr = phi3lab.trace(model, ids)
    out, internals = run_transformers(hf, ids)
    queries, keys = np.ogrid[: ids.shape[1], : ids.shape[1]]
    allowed = keys <= queries
    if model.sliding_window is not None:
        allowed &= keys > queries - model.sliding_window
    errors = {
        "hook_embed": max_error(tr["hook_embed"], out.hidden_states[0].numpy()),
        "ln_final.hook_normalized": max_error(tr.output, out.hidden_states[-1].numpy()),
        "hook_logits": max_error(tr.logits, out.logits.numpy()),
        "rope.cos": max_error(tr.rope.cos, internals["cos"]),
        "rope.sin": max_error(tr.rope.sin, internals["sin"]),
    }
    for l in range(model.num_layers):
        errors[f"blocks.{l}.hook_resid_pre"] = max_error(tr.resid(l, "pre"), out.hidden_states[l].numpy())
        errors[f"blocks.{l}.hook_resid_mid"] = max_error(
            tr.resid(l, "mid"), out.hidden_states[l].numpy() + internals[(l, "attn_out")]
        )
        errors[f"blocks.{l}.attn.hook_pattern"] = max_error(tr.attention(l), out.attentions[l].numpy())
        errors[f"blocks.{l}.attn.hook_attn_scores"] = max_error(
            tr[f"blocks.{l}.attn.hook_attn_scores"][..., allowed], internals[(l, "scores")][..., allowed]
        )
        for key, site in OURS_FOR.items():
            errors[f"blocks.{l}.{site}"] = max_error(tr[f"blocks.{l}.{site}"], internals[(l, key)])
    return tr, errors


CASES = {
    "no_rope_scaling": (None, BELOW),
    "su_below_pretraining": ("su", BELOW),
    "su_at_pretraining": ("su", AT),
    "su_above_pretraining": ("su", ABOVE),
    "sliding_window": ("sliding", BELOW),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_hook_matches_transformers(oracles, case):
    rope, length = CASES[case]
    model, hf = oracles[rope]
    ids = random_ids((2, length), seed=length)
    tr, errors = transformers_errors(model, hf, ids)
    # every hook point of the contract is compared
    compared = {n for n in errors if not n.startswith("rope.")}
    assert compared == set(design_names(model.num_layers))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{case}: {worst} differs by {errors[worst]:.3g}"
    expected_set = {None: "none", "sliding": "none", "su": "short" if length <= PRETRAINING else "long"}[rope]
    assert tr.rope.factor_set == expected_set


@pytest.mark.parametrize("rope, length", [("su", BELOW), ("su", ABOVE), (None, BELOW)])
def test_loss_matches_transformers(oracles, rope, length):
    """`Trace.loss` against `Phi3ForCausalLM(labels=...)` on the same weights
    (mean) and torch's cross-entropy of its logits (per token), on a batch
    with an unpadded, a left-padded and a right-padded row. A pair counts
    when both tokens are real, so the labels are -100 elsewhere."""
    torch = require("torch")
    model, hf = oracles[rope]
    ids = random_ids((3, length), seed=20 + length)
    mask = np.ones(ids.shape, bool)
    mask[1, :3] = mask[2, -4:] = False
    tr = phi3lab.trace(model, ids, padding_mask=mask, names="hook_logits")
    counts = mask[:, :-1] & mask[:, 1:]
    labels = np.full(ids.shape, -100, np.int64)
    labels[:, 1:] = np.where(counts, ids[:, 1:], -100)
    with torch.no_grad():
        out = hf(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            labels=torch.as_tensor(labels),
        )
        per_token = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].transpose(1, 2), torch.as_tensor(ids[:, 1:], dtype=torch.long), reduction="none"
        ).numpy()
    assert math.isclose(tr.loss(), float(out.loss), rel_tol=1e-5)
    ours = tr.loss(per_token=True)
    assert ours.shape == (3, length - 1)
    np.testing.assert_array_equal(np.isnan(ours), ~counts)
    np.testing.assert_allclose(ours[counts], per_token[counts], rtol=1e-5)


# === Name selection ===


def test_names_none_list_glob_and_predicate(model, full, ids):
    everything = design_names(LAYERS)
    assert full.names == everything  # names=None keeps everything

    chosen = ["blocks.2.hook_resid_post", "hook_embed", "blocks.0.attn.hook_z"]
    tr = phi3lab.trace(model, ids, names=chosen)
    assert tr.names == ["hook_embed", "blocks.0.attn.hook_z", "blocks.2.hook_resid_post"]
    assert set(tr) == set(chosen)

    tr = phi3lab.trace(model, ids, names=["blocks.1.*", "hook_logits"])
    assert tr.names == [n for n in everything if n.startswith("blocks.1.")] + ["hook_logits"]

    tr = phi3lab.trace(model, ids, names="blocks.*.mlp.hook_post")
    assert tr.names == [f"blocks.{l}.mlp.hook_post" for l in range(LAYERS)]
    assert tr.names == fnmatch.filter(everything, "blocks.*.mlp.hook_post")
    before = compiled_count(model)
    by_predicate = phi3lab.trace(model, ids, names=lambda n: n.endswith("mlp.hook_post"))
    assert by_predicate.names == tr.names
    assert compiled_count(model) == before  # the same selection reuses its program

    # a selection holds the same values as the full trace (up to XLA fusion)
    for name in tr.names:
        assert_close(tr[name], full[name], 1e-5, name)
    with pytest.raises(KeyError, match="blocks.0.mlp.hook_post"):
        tr["blocks.0.mlp.hook_pre"]


def test_unknown_names_list_close_matches(model, ids):
    with pytest.raises(ValueError, match=r"(?s)`names`.*blocks\.0\.attn\.hook_pattern"):
        phi3lab.trace(model, ids, names=["blocks.0.attn.hook_patern"])
    with pytest.raises(ValueError, match=r"(?s)matches no hook name.*hook_resid_post"):
        phi3lab.trace(model, ids, names="blocks.*.hook_resid_pots")
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_resid_post"):
        phi3lab.trace(model, ids, names=f"blocks.{LAYERS + 6}.hook_resid_post")
    with pytest.raises(TypeError, match="`names`"):
        phi3lab.trace(model, ids, names=[3])


# === Padding ===


def test_padding_matches_unpadded_runs(model):
    short, long = random_ids((7,), seed=3), random_ids((10,), seed=4)
    pad = 0
    right = np.concatenate([short, np.full(3, pad, np.int32)])
    left = np.concatenate([np.full(3, pad, np.int32), short])
    ids = np.stack([right, long, left])
    mask = np.stack([np.arange(10) < 7, np.ones(10, bool), np.arange(10) >= 3])
    tr = phi3lab.trace(model, ids, padding_mask=mask)
    np.testing.assert_array_equal(tr.padding_mask, mask)
    alone_short = phi3lab.trace(model, short)
    alone_long = phi3lab.trace(model, long)

    rows = {
        "right": (0, slice(0, 7), alone_short),
        "full": (1, slice(0, 10), alone_long),
        "left": (2, slice(3, 10), alone_short),
    }
    for label, (row, valid, alone) in rows.items():
        for name in tr.names:
            value = tr[name][row]
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                value = value[:, valid, valid]
                # keys at padded positions get exactly zero attention / -inf
                if name.endswith("hook_pattern"):
                    assert np.all(np.delete(tr[name][row], np.arange(10)[valid], axis=-1) == 0.0), name
                else:
                    assert np.all(np.isneginf(np.delete(tr[name][row], np.arange(10)[valid], axis=-1))), name
                expected = alone[name][0]
                finite = np.isfinite(expected)
                np.testing.assert_array_equal(np.isfinite(value), finite, err_msg=name)
                assert_close(value[finite], expected[finite], 1e-5, f"{label} {name}")
            elif label == "left" and name.endswith(("hook_rot_q", "hook_rot_k")):
                continue  # absolute positions differ; checked below
            else:
                assert_close(value[valid], alone[name][0], 1e-5, f"{label} {name}")
    # Left padding moves positions by 3: rotary depends only on differences,
    # so scores agree, but the rotated vectors themselves do not.
    rot = tr["blocks.0.attn.hook_rot_q"][2, 3:]
    assert max_error(rot, alone_short["blocks.0.attn.hook_rot_q"][0]) > 1e-2


def test_padding_mask_is_validated(model, ids):
    with pytest.raises(ValueError, match="`padding_mask`"):
        phi3lab.trace(model, ids, padding_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="`ids`"):
        phi3lab.trace(model, np.full((1, 3), VOCAB))


# === Batches that mix short and long prompts ===


@pytest.fixture(scope="module")
def su_model():
    return make_model("su", seed=9)


def test_a_batch_mixing_short_and_long_prompts_warns(su_model, recwarn):
    """A short row in a batch beyond the pretraining window gets the long
    rotary factors (as in transformers): its logits move, and trace says so,
    pointing at the caller's line."""
    model = su_model
    ids = random_ids((3, ABOVE), seed=9)
    mask = np.ones(ids.shape, bool)
    mask[1, BELOW:] = False  # 11 real tokens, right-padded
    mask[2, : ABOVE - AT] = False  # 16 real tokens, left-padded
    with pytest.warns(MixedRotaryWarning) as caught:
        batch = phi3lab.trace(model, ids, padding_mask=mask, names="hook_logits")
    assert len(caught) == 1 and caught[0].filename == __file__
    message = str(caught[0].message)
    assert "Rows [1, 2]" in message and f"({PRETRAINING})" in message and "separate batches" in message
    alone = phi3lab.trace(model, ids[1, :BELOW], names="hook_logits")
    assert alone.rope.factor_set == "short" and batch.rope.factor_set == "long"
    assert max_error(batch.logits[1, :BELOW], alone.logits[0]) > 1e-2  # why it warns

    recwarn.clear()
    phi3lab.trace(model, ids, names="hook_logits")  # every row beyond the window
    phi3lab.trace(model, ids[:, :AT], padding_mask=mask[:, :AT] | True)  # every row within it
    phi3lab.trace(make_model(seed=9), ids, padding_mask=mask, names="hook_logits")  # no rotary scaling
    assert not [w for w in recwarn if issubclass(w.category, MixedRotaryWarning)]


def test_activation_patching_warns_once_about_mixed_prompts(su_model):
    from phi3lab import analysis

    ids = random_ids((2, AT + 1), seed=10)
    mask = np.ones(ids.shape, bool)
    mask[1, BELOW:] = False
    with pytest.warns(MixedRotaryWarning) as caught:
        analysis.activation_patching(
            su_model, ids, ids[:, ::-1], answer=3, padding_mask=mask, sites="attn_out", progress=False
        )
    assert [w.category for w in caught if issubclass(w.category, MixedRotaryWarning)] == [MixedRotaryWarning]
    assert caught[0].filename == __file__


# === Compile once ===


def test_same_names_and_shapes_compile_once():
    model = make_model(seed=3)
    assert compiled_count(model) == 0
    names = "blocks.*.attn.hook_pattern"
    phi3lab.trace(model, random_ids((2, 9), seed=0), names=names)
    assert compiled_count(model) == 1
    for seed in range(1, 4):  # new token values, same shapes
        phi3lab.trace(model, random_ids((2, 9), seed=seed), names=names)
        phi3lab.trace(
            model, random_ids((2, 9), seed=seed), names=[f"blocks.{l}.attn.hook_pattern" for l in range(LAYERS)]
        )
    mask = np.stack([np.arange(9) < 6, np.arange(9) >= 2])
    phi3lab.trace(model, random_ids((2, 9), seed=5), padding_mask=mask, names=names)
    assert compiled_count(model) == 1
    phi3lab.trace(model, random_ids((2, 10), seed=0), names=names)  # a new length, same length bucket
    assert compiled_count(model) == 1
    phi3lab.trace(model, random_ids((3, 9), seed=0), names=names)  # a new shape
    assert compiled_count(model) == 2
    phi3lab.trace(model, random_ids((2, 9), seed=0), names="hook_logits")  # a new selection
    assert compiled_count(model) == 3


def test_plain_call_is_unchanged_by_traces(model, full, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones(ids.shape, bool)}
    before = np.asarray(model(inputs))
    hooks = phi3lab.hooks.ablate_heads(0, [0, 1]) | phi3lab.hooks.add(
        "blocks.1.hook_resid_post", np.ones(HIDDEN, np.float32)
    )
    traced = phi3lab.trace(model, ids, hooks=hooks)
    assert not np.allclose(traced.output, before)  # the hooks did act in the trace
    assert np.array_equal(phi3lab.trace(model, ids).output, full.output)
    after = np.asarray(model(inputs))
    assert np.array_equal(before, after)


def test_trace_documents_every_public_method():
    """`help(phi3lab.Trace)` shows Trace's own docs: no section comment as a
    method's doc, nothing inherited from `Mapping` (whose `get` doc keras
    overwrites with its LayoutMap's)."""
    import inspect
    import pydoc
    from collections.abc import Mapping

    text = pydoc.render_doc(phi3lab.Trace, renderer=pydoc.plaintext)
    assert "===" not in text and "LayoutMap" not in text
    public = [n for n in dir(phi3lab.Trace) if not n.startswith("_")]
    public += ["__getitem__", "__contains__", "__iter__", "__len__", "__repr__"]
    assert {
        "get",
        "keys",
        "values",
        "items",
        "attention",
        "resid",
        "logits",
        "loss",
        "to_pandas",
        "save",
        "load",
    } <= set(public)
    for name in public:
        member = inspect.getattr_static(phi3lab.Trace, name)
        assert name in vars(phi3lab.Trace), f"Trace.{name} is inherited"
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        doc = function.__doc__
        assert doc and doc.strip(), f"Trace.{name} has no docstring"
        assert doc != getattr(getattr(Mapping, name, None), "__doc__", None), f"Trace.{name} has Mapping's docstring"
    assert "not captured" in phi3lab.Trace.get.__doc__


# === Saving a trace ===


def assert_same_trace(loaded, saved):
    assert type(loaded) is phi3lab.Trace and loaded.names == saved.names
    for name in saved.names:
        assert loaded[name].dtype == saved[name].dtype, name
        np.testing.assert_array_equal(loaded[name], saved[name], err_msg=name)
    for attribute in ("token_ids", "padding_mask", "output"):
        value = getattr(loaded, attribute)
        assert value.dtype == getattr(saved, attribute).dtype, attribute
        np.testing.assert_array_equal(value, getattr(saved, attribute), err_msg=attribute)
    for attribute in (
        "tokens",
        "query_window",
        "attention_heads",
        "prompt_length",
        "num_layers",
        "num_query_heads",
        "num_key_value_heads",
    ):
        assert getattr(loaded, attribute) == getattr(saved, attribute), attribute
    for field in dataclasses.fields(saved.rope):
        ours, theirs = getattr(loaded.rope, field.name), getattr(saved.rope, field.name)
        if isinstance(theirs, np.ndarray):
            assert ours.dtype == theirs.dtype, field.name
            np.testing.assert_array_equal(ours, theirs, err_msg=field.name)
        else:
            assert ours == theirs and type(ours) is type(theirs), field.name


def test_save_and_load_round_trip(su_model, tmp_path, monkeypatch):
    """Every part of a trace survives `save`/`load`, and loading uses no
    pickle: a windowed, head-selected, padded trace beyond the pretraining
    window (long rotary factors), with display tokens and a prompt length."""
    import pickle

    ids = random_ids((2, ABOVE), seed=30)
    mask = np.ones(ids.shape, bool)
    mask[1, :2] = False
    tr = phi3lab.trace(
        su_model,
        ids,
        padding_mask=mask,
        names=["blocks.*.attn.hook_pattern", "hook_logits"],
        queries=slice(5, 20),
        heads=[3, 1],
    )
    tr.tokens = [[f"▁tok{t}é" if t % 3 else "" for t in row] for row in ids.tolist()]
    tr.prompt_length = 7
    path = tr.save(tmp_path / "trace")
    assert path == tmp_path / "trace.npz" and path.is_file()
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, lambda *a, name=name, **k: pytest.fail(f"pickle.{name} used"))
    loaded = phi3lab.Trace.load(path)
    assert_same_trace(loaded, tr)
    assert loaded.rope.factor_set == "long"
    np.testing.assert_array_equal(loaded.attention(2, head=1), tr.attention(2, head=1))
    pd.testing.assert_frame_equal(
        loaded.to_pandas("blocks.0.attn.hook_pattern", batch=1), tr.to_pandas("blocks.0.attn.hook_pattern", batch=1)
    )
    pd.testing.assert_frame_equal(loaded.rope.to_pandas(), tr.rope.to_pandas())
    assert loaded.loss() == tr.loss()
    with np.load(path, allow_pickle=False) as stored:  # plain NumPy reads it too
        np.testing.assert_array_equal(stored["activation/hook_logits"], tr.logits)


def test_save_and_load_keep_bfloat16_and_a_plain_trace(model, full, tmp_path):
    import ml_dtypes

    halved = phi3lab.Trace(
        {name: value.astype(ml_dtypes.bfloat16) for name, value in full.items()},
        token_ids=full.token_ids,
        padding_mask=full.padding_mask,
        tokens=None,
        output=full.output.astype(ml_dtypes.bfloat16),
        rope=full.rope,
        model=model,
    )
    for tr in (full, halved):
        assert_same_trace(phi3lab.Trace.load(tr.save(tmp_path / "t.npz")), tr)
    assert phi3lab.Trace.load(tmp_path / "t.npz")["hook_embed"].dtype == ml_dtypes.bfloat16


def test_loading_what_is_not_a_trace_fails_clearly(tmp_path):
    np.save(tmp_path / "array.npy", np.zeros(3))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("not a zip")
    for name in ("missing.npz", "array.npy", "other.npz", "text.npz"):
        with pytest.raises(ValueError, match=r"`path` must be a trace file written by Trace.save"):
            phi3lab.Trace.load(tmp_path / name)


# === Rotary description ===


def numpy_rotary(num_positions, factors, base, head_dim, max_len, pretraining, scaled):
    inverse = 1.0 / (np.asarray(factors, np.float64) * base ** (np.arange(0, head_dim, 2) / head_dim))
    angles = np.arange(num_positions)[:, None] * inverse[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    s = max_len / pretraining
    factor = math.sqrt(1 + math.log(s) / math.log(pretraining)) if scaled and s > 1 else 1.0
    return inverse, np.cos(angles) * factor, np.sin(angles) * factor, factor


@pytest.mark.parametrize(
    "rope,length,expected_set",
    [
        (None, ABOVE, "none"),
        ("su", BELOW, "short"),
        ("su", AT, "short"),
        ("su", AT + 1, "long"),
        ("su", MAX_POSITIONS, "long"),
    ],
)
def test_rope_description_matches_numpy_formulas(rope, length, expected_set):
    from phi3lab.tracing.rope import describe_rotary

    model = make_model(rope, seed=6)
    # `trace` builds `tr.rope` with this function from the model's own spec
    # (the transformers test checks `tr.rope` of real traces against its
    # rotary module); here every case is checked against NumPy.
    description = describe_rotary(model.rotary, length)
    assert description.factor_set == expected_set
    short, long = rope_factors(HEAD_DIM // 2)
    factors = {"none": np.ones(HEAD_DIM // 2), "short": short, "long": long}[expected_set]
    inverse, cos, sin, factor = numpy_rotary(
        length, factors, 10000.0, HEAD_DIM, MAX_POSITIONS, PRETRAINING, rope == "su"
    )
    assert description.num_positions == length
    assert math.isclose(description.attention_factor, factor, rel_tol=1e-12)
    if rope == "su":
        assert description.attention_factor > 1.0
    np.testing.assert_allclose(description.factors, factors, rtol=1e-6)
    np.testing.assert_allclose(description.inverse_frequencies, inverse, rtol=1e-6)
    np.testing.assert_allclose(description.wavelengths, 2 * np.pi / inverse, rtol=1e-6)
    assert description.cos.shape == description.sin.shape == (length, HEAD_DIM)
    np.testing.assert_allclose(description.cos, cos, atol=2e-5)
    np.testing.assert_allclose(description.sin, sin, atol=2e-5)
    assert description.pretraining_sequence_length == PRETRAINING
    assert description.max_sequence_length == MAX_POSITIONS
    assert str(PRETRAINING) in description.reason or expected_set == "none"

    table = description.to_pandas()
    assert len(table) == HEAD_DIM // 2
    np.testing.assert_array_equal(table["pair"], np.arange(HEAD_DIM // 2))
    np.testing.assert_allclose(table["factor"], factors, rtol=1e-6)
    np.testing.assert_allclose(table["inverse_frequency"], inverse, rtol=1e-6)
    np.testing.assert_allclose(table["wavelength"], 2 * np.pi / inverse, rtol=1e-6)
    assert table.attrs["factor_set"] == expected_set
    if rope == "su":
        np.testing.assert_allclose(table["short_factor"], short, rtol=1e-6)
        np.testing.assert_allclose(table["long_factor"], long, rtol=1e-6)


@pytest.mark.parametrize("length,expected_set", [(AT, "short"), (AT + 1, "long")])
def test_trace_rope_is_what_the_attention_applied(length, expected_set):
    model = make_model("su", seed=7)
    tr = phi3lab.trace(model, random_ids((1, length), seed=2), names="blocks.1.attn.hook_*q")
    assert tr.rope.factor_set == expected_set and tr.rope.num_positions == length
    short, long = rope_factors(HEAD_DIM // 2)
    _, cos, sin, _ = numpy_rotary(
        length, short if expected_set == "short" else long, 10000.0, HEAD_DIM, MAX_POSITIONS, PRETRAINING, True
    )
    np.testing.assert_allclose(tr.rope.cos, cos, atol=2e-5)
    np.testing.assert_allclose(tr.rope.sin, sin, atol=2e-5)
    q, rot_q = tr["blocks.1.attn.hook_q"][0], tr["blocks.1.attn.hook_rot_q"][0]
    half = HEAD_DIM // 2
    rotated = np.concatenate([-q[..., half:], q[..., :half]], axis=-1)
    expected = q * cos[:, None, :] + rotated * sin[:, None, :]
    assert_close(rot_q, expected, 1e-5, "rot_q from NumPy tables")


# === Text input ===


@pytest.fixture(scope="module")
def tokenizer():
    from phi3lab.tokenization.tokenizer import Phi3Tokenizer
    from phi3lab.tokenization.training import train_sentencepiece

    corpus = [
        "When Mary and John went to the store, John gave a drink to Mary.",
        "The quick brown fox jumps over the lazy dog.",
        "Attention heads read from and write to the residual stream.",
    ] * 20
    return Phi3Tokenizer(train_sentencepiece(corpus, vocab_size=300))


def test_text_input_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="`tokenizer`"):
        phi3lab.trace(model, "some text")
    with pytest.raises(ValueError, match="`tokenizer`"):
        phi3lab.trace(model, ["some text", "more"])


def test_text_input_with_a_tokenizer(tokenizer):
    model = make_model(seed=8, vocabulary_size=320)
    assert tokenizer.vocabulary_size <= 320
    texts = ["When Mary and John went", "The fox"]
    tr = phi3lab.trace(model, texts, tokenizer=tokenizer, names="hook_logits")
    ids, mask = tokenizer.encode_batch(texts)
    np.testing.assert_array_equal(tr.token_ids, ids)
    np.testing.assert_array_equal(tr.padding_mask, mask)
    assert len(tr.tokens) == 2 and len(tr.tokens[0]) == ids.shape[1]
    assert tr.tokens[0] == tokenizer.display_tokens(ids[0])
    alone = phi3lab.trace(model, texts[1], tokenizer=tokenizer, names="hook_logits")
    np.testing.assert_array_equal(alone.token_ids[0], tokenizer.encode(texts[1]))
    assert_close(tr.logits[1, mask[1]], alone.logits[0], 1e-5, "padded text row")


# === JAX transformations around trace ===


def test_jax_grad_jit_and_vmap_around_trace(model, ids, full):
    """Under `jax.grad`, `jax.jit` or `jax.vmap`, `trace` runs the pure
    forward (uncompiled) and returns a Trace of tracers."""
    vector = np.random.default_rng(3).standard_normal(HIDDEN).astype(np.float32)
    site, answer = "blocks.1.hook_resid_post", 5

    def logit(scale):
        hooks = phi3lab.hooks.add(site, vector, scale=scale)
        return phi3lab.trace(model, ids, names="hook_logits", hooks=hooks).logits[0, -1, answer]

    grad = float(jax.jit(jax.grad(logit))(0.5))
    step = 1e-2  # central differences of the compiled (concrete) runs
    finite = (float(logit(0.5 + step)) - float(logit(0.5 - step))) / (2 * step)
    assert grad == pytest.approx(finite, rel=2e-3, abs=1e-4)

    logits = jax.jit(lambda token_ids: phi3lab.trace(model, token_ids, names="hook_logits").logits)(ids)
    # unpadded (traced) and bucket-padded (compiled) runs sum in another order
    np.testing.assert_allclose(np.asarray(logits), full.logits, atol=1e-4)
    rows = jax.jit(jax.vmap(lambda row: phi3lab.trace(model, row, names="blocks.0.hook_resid_post").resid(0)[0]))(ids)
    np.testing.assert_allclose(np.asarray(rows), full.resid(0), atol=1e-4)


def test_trace_under_a_transformation_explains_what_cannot_run(model, ids):
    tokenizer = types.SimpleNamespace(encode_batch=None, display_tokens=lambda row: [str(t) for t in row])
    for kwargs in ({"tokenizer": tokenizer}, {"memory_budget": 1 << 30}):
        with pytest.raises(ValueError, match=r"(?s)phi3lab\.tracing\.forward_fn.*phi3lab\.gradients.*jax\.grad"):
            jax.jit(lambda token_ids: phi3lab.trace(model, token_ids, **kwargs).output)(ids)
