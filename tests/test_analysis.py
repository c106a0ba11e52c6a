"""Tests of phi3lab.analysis against independent references.

Oracles: the model's own `hook_logits` / `hook_attn_scores`, interventions
through the public `phi3lab.trace(..., hooks=...)` path, and plain NumPy
loops written separately from the vectorized code.
"""

import numpy as np
import pandas as pd
import pytest
from jax import numpy as jnp

import phi3lab
import phi3lab.analysis as analysis
from phi3lab.analysis.patching import _sweep
from phi3lab.hooks import Hook, Hooks

VOCAB, LAYERS, HEADS, KV_HEADS, HIDDEN = 64, 3, 4, 2, 32
ANSWER, COUNTER = 5, 7


@pytest.fixture(scope="module")
def model():
    """A small GQA model with "su" rotary scaling and O(1) random weights."""
    model = phi3lab.Phi3Backbone(
        vocabulary_size=VOCAB,
        num_layers=LAYERS,
        hidden_dim=HIDDEN,
        intermediate_dim=64,
        num_query_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_sequence_length=64,
        pretraining_sequence_length=32,
        rope_scaling_type="su",
        rope_scaling_short_factor=[1.0, 1.2, 1.5, 2.0],
        rope_scaling_long_factor=[1.0, 2.0, 4.0, 8.0],
    )
    rng = np.random.default_rng(0)
    for weight in model.weights:
        name, shape = weight.path.split("/")[-1], weight.shape
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embeddings":
            value = rng.standard_normal(shape)
        else:  # kernels: fan-in is the axis after the layer axis, or D for the output kernel
            fan_in = HIDDEN if name in ("output_kernel", "reverse_embeddings") else shape[1]
            value = 1.5 * rng.standard_normal(shape) / np.sqrt(fan_in)
        weight.assign(value.astype("float32"))
    return model


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, VOCAB, (2, 10)).astype(np.int32)


@pytest.fixture(scope="module")
def tr(model, ids):
    mask = np.ones(ids.shape, bool)
    mask[1, -2:] = False  # row 1 is right-padded
    return phi3lab.trace(model, ids, padding_mask=mask)


# === Logit lens ===


def test_logit_lens_last_post_is_the_models_logits(model, tr):
    logits = analysis.logit_lens_logits(model, tr, batch=1)
    assert logits.shape == (LAYERS, 3, 10, VOCAB)
    # The trace ran padded to its length bucket, the lens on the trace's
    # own shape: XLA may round differently per shape, never by more.
    np.testing.assert_allclose(logits[-1, -1], tr.logits[1], rtol=1e-5, atol=1e-5)
    only_post = analysis.logit_lens_logits(model, tr, where="post", batch=1)
    np.testing.assert_array_equal(only_post[:, 0], logits[:, 2])


def test_logit_lens_table(model, tr):
    table = analysis.logit_lens(model, tr, k=3, batch=1)
    assert list(table.columns) == ["layer", "where", "position", "top_tokens", "top_probs"]
    assert len(table) == LAYERS * 3 * 8  # padding positions are left out
    last = table[(table.layer == LAYERS - 1) & (table["where"] == "post") & (table.position == 7)].iloc[0]
    assert last.top_tokens == list(np.argsort(-tr.logits[1, 7])[:3])
    probs = np.exp(tr.logits[1, 7] - tr.logits[1, 7].max())
    np.testing.assert_allclose(last.top_probs, np.sort(probs / probs.sum())[::-1][:3], rtol=1e-5)
    assert all(np.all(np.diff(p) <= 0) for p in table.top_probs)


def test_logit_lens_errors(model, ids):
    partial = phi3lab.trace(model, ids, names="blocks.*.hook_resid_post")
    with pytest.raises(KeyError, match=r"phi3lab.trace\(model, ids, names=\['blocks.\*.hook_resid_pre'"):
        analysis.logit_lens(model, partial)
    assert analysis.logit_lens(model, partial, where="post", k=1).shape[0] == LAYERS * 10
    with pytest.raises(ValueError, match="`where`"):
        analysis.logit_lens(model, partial, where="after")
    with pytest.raises(ValueError, match="`k`"):
        analysis.logit_lens(model, partial, k=0, where="post")
    with pytest.raises(ValueError, match="`batch`"):
        analysis.logit_lens(model, partial, batch=5, where="post")


# === Decomposition and direct logit attribution ===


def test_decomposition_sums_to_the_residual(model, tr):
    parts = analysis.decompose_resid(model, tr)
    assert parts.head_out.shape == (LAYERS, HEADS, 2, 10, HIDDEN)
    for heads in (True, False):
        stacked = parts.stack(heads=heads)
        assert len(stacked) == len(parts.labels(heads=heads))
        np.testing.assert_allclose(stacked.sum(0), tr.resid(LAYERS - 1, "post"), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(parts.head_out.sum(1), parts.attn_out, atol=1e-5)
    one = analysis.decompose_resid(model, tr, batch=1, positions=[-1])
    np.testing.assert_array_equal(one.mlp_out[:, 0, 0], parts.mlp_out[:, 1, -1])


@pytest.mark.parametrize("counterfactual", [COUNTER, None])
def test_direct_logit_attribution_sums_to_the_logit_diff(model, tr, counterfactual):
    """At either level the rows partition the final residual stream: they
    sum to the model's logit (difference), so sorting or summing the table
    counts each component once; the heads of a layer sum to its block."""
    by_head = analysis.direct_logit_attribution(model, tr, ANSWER, counterfactual, batch=1)
    by_layer = analysis.direct_logit_attribution(model, tr, ANSWER, counterfactual, batch=1, level="layers")
    logits = tr.logits[1, 7].astype(np.float64)
    expected = logits[ANSWER] - (logits[counterfactual] if counterfactual is not None else 0.0)
    for table, kinds in ((by_head, ["embed", "head", "mlp"]), (by_layer, ["embed", "attn", "mlp"])):
        assert list(table.columns) == ["component", "layer", "head", "kind", "attribution"]
        assert sorted(set(table.kind)) == sorted(kinds)
        assert table.attrs["position"] == 7  # last real token of the padded row
        assert table.attribution.sum() == pytest.approx(expected, abs=1e-4)
        assert table.attrs["logit_diff"] == pytest.approx(expected, abs=1e-9)
    assert by_layer.attribution.sum() == pytest.approx(by_layer.attrs["total"], abs=1e-9)
    assert len(by_head) == 1 + LAYERS * (HEADS + 1) and len(by_layer) == 1 + 2 * LAYERS
    heads = by_head[by_head.kind == "head"].groupby("layer").attribution.sum()
    attn = by_layer[by_layer.kind == "attn"].set_index("layer").attribution
    np.testing.assert_allclose(heads.to_numpy(), attn.loc[heads.index].to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="`level`"):
        analysis.direct_logit_attribution(model, tr, ANSWER, level="both")


def test_next_token_attribution_sums_to_each_tokens_logit(model, tr, ids):
    table = analysis.next_token_attribution(model, tr, batch=1)
    positions = list(range(ids.shape[1]))
    assert list(table.component) == ["embed"] + [f"L{l}_{k}" for l in range(LAYERS) for k in ("attn", "mlp")]
    values = table[positions].to_numpy(np.float64)
    logits = tr.logits[1].astype(np.float64)
    expected = [logits[p - 1, ids[1, p]] for p in range(1, 8)]  # row 1 is real up to position 7
    np.testing.assert_allclose(values.sum(0)[1:8], expected, atol=1e-4)
    np.testing.assert_array_equal(table.attrs["logit"][1:8], expected)
    assert np.isnan(values[:, 0]).all() and np.isnan(values[:, 8:]).all()
    # Column p is direct_logit_attribution of token p at position p - 1, heads included.
    fine = analysis.next_token_attribution(model, tr, batch=1, heads=True)
    for heads, result in ((False, table), (True, fine)):
        level = "heads" if heads else "layers"
        dla = analysis.direct_logit_attribution(model, tr, int(ids[1, 5]), position=4, batch=1, level=level)
        dla = dla.set_index("component")
        np.testing.assert_allclose(result.set_index("component")[5], dla.attribution[result.component], atol=1e-6)


def test_attribution_without_hook_logits_reads_the_models_logits(model, tr, ids):
    """A trace without `hook_logits`: the model's own value comes from the
    final norm and LM head run on the captured last residual stream, and
    equals the full trace's `hook_logits`."""
    names = ["hook_embed", "blocks.*.hook_attn_out", "blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    lean = phi3lab.trace(model, ids, names=names + [f"blocks.{LAYERS - 1}.hook_resid_post"])
    assert "hook_logits" not in lean.names
    table = analysis.direct_logit_attribution(model, lean, ANSWER, COUNTER, batch=0, position=6)
    logits = tr.logits[0, 6].astype(np.float64)
    assert table.attrs["logit_diff"] == pytest.approx(logits[ANSWER] - logits[COUNTER], abs=1e-5)
    full = analysis.direct_logit_attribution(model, tr, ANSWER, COUNTER, batch=0, position=6)
    np.testing.assert_allclose(table.attribution, full.attribution, atol=1e-6)
    own = analysis.next_token_attribution(model, lean, batch=0).attrs["logit"]
    np.testing.assert_allclose(
        own[1:], [logits_p[ids[0, p + 1]] for p, logits_p in enumerate(tr.logits[0, :-1])], atol=1e-5
    )


def test_one_position_is_attributed_without_padding_to_a_length_bucket(model, tr):
    """A few rows pad to a power of two (`pipeline.row_bucket`), not to 64:
    the per-head products of one position are one position's
    `[L, Hq, 1, 1, D]` float32, however long the trace."""
    from phi3lab.runtime import compile_cache
    from phi3lab.tracing import pipeline

    assert [pipeline.row_bucket(model, n).padded for n in (1, 2, 3, 5, 16, 17, 40)] == [1, 2, 4, 8, 16, 64, 64]
    analysis.direct_logit_attribution(model, tr, ANSWER, COUNTER, batch=1)
    heads = [p for key, p in compile_cache.entries(model).items() if key[0] == "attribution.heads"]
    one_position = LAYERS * HEADS * HIDDEN * 4
    assert min(p.output_bytes for p in heads) == one_position


def test_frozen_scale_matches_the_rms(model, tr):
    final = tr.resid(LAYERS - 1, "post")[0, 3].astype(np.float64)
    inv_rms, _ = analysis.frozen_norm_scale(model, final)
    assert inv_rms == pytest.approx(1 / np.sqrt(np.mean(final**2) + model.layer_norm_epsilon), rel=1e-5)


def test_attribution_errors(model, tr, ids):
    with pytest.raises(ValueError, match="`answer`"):
        analysis.direct_logit_attribution(model, tr, VOCAB)
    with pytest.raises(ValueError, match="`position`"):
        analysis.direct_logit_attribution(model, tr, 1, position=10)
    partial = phi3lab.trace(model, ids, names="blocks.*.hook_*")
    with pytest.raises(KeyError, match="'hook_embed'.*names=\\['hook_embed'"):
        analysis.direct_logit_attribution(model, partial, 1)


# === Activation patching ===


def corrupt(ids):
    corrupted = ids.copy()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % VOCAB
    corrupted[:, 6] = (corrupted[:, 6] + 5) % VOCAB
    return corrupted


def logit_diff(model, ids, hooks=None):
    logits = phi3lab.trace(model, ids, names="hook_logits", hooks=hooks).logits[:, -1].astype(np.float64)
    return float(np.mean(logits[:, ANSWER] - logits[:, COUNTER]))


@pytest.mark.slow
def test_patching_resid_pre_matches_trace_hooks(model, ids):
    corrupted = corrupt(ids)
    result = analysis.activation_patching(model, ids, corrupted, answer=ANSWER, counterfactual=COUNTER, progress=False)
    assert result.values.shape == (LAYERS, 10) and result.axes == ("layer", "position")
    clean, bad = logit_diff(model, ids), logit_diff(model, corrupted)
    assert result.clean_metric == pytest.approx(clean, abs=1e-4)
    assert result.corrupted_metric == pytest.approx(bad, abs=1e-4)
    # Positions whose tokens agree cannot matter at layer 0.
    np.testing.assert_allclose(result.values[0, [0, 1, 2, 4, 5, 7, 8, 9]], 0.0, atol=1e-5)
    clean_tr = phi3lab.trace(model, ids, names="blocks.*.hook_resid_pre")
    for layer, position in [(1, 3), (2, 9)]:
        hooks = phi3lab.hooks.patch(f"blocks.{layer}.hook_resid_pre", clean_tr, positions=[position])
        direct = (logit_diff(model, corrupted, hooks) - bad) / (clean - bad)
        assert result.values[layer, position] == pytest.approx(direct, abs=1e-4)
    table = result.to_pandas()
    assert list(table.columns) == ["layer", "position", "clean_token", "corrupted_token", "value", "raw"]
    assert len(table) == LAYERS * 10


def test_patching_everything_or_nothing(model, ids):
    corrupted = corrupt(ids)
    sweep = _sweep(model, ids, corrupted, None, ANSWER, COUNTER, "resid_pre", None, batch_size=4)
    masks = np.zeros((3, LAYERS, 10), bool)
    masks[1, 0] = True  # every position at layer 0: the clean run
    masks[2, 2] = True  # every position at the last layer
    runs = np.repeat(corrupted[None], 3, axis=0)
    values = sweep.run(runs, masks)
    assert values[0] == pytest.approx(logit_diff(model, corrupted), abs=1e-5)
    assert values[1] == pytest.approx(logit_diff(model, ids), abs=1e-5)
    assert values[2] == pytest.approx(logit_diff(model, ids), abs=1e-5)


def put_head(x, ctx):
    source, head = ctx.data
    return x.at[:, :, head].set(source[:, :, head])


@pytest.mark.slow
@pytest.mark.parametrize("site, hook, units", [("head_z", "attn.hook_z", HEADS), ("head_v", "attn.hook_v", KV_HEADS)])
def test_head_patching_matches_trace_hooks(model, ids, site, hook, units):
    corrupted = corrupt(ids)
    result = analysis.activation_patching(
        model,
        ids,
        corrupted,
        answer=ANSWER,
        counterfactual=COUNTER,
        sites=site,
        progress=False,
        normalize=False,
    )
    assert result.values.shape == (LAYERS, units)
    clean_tr = phi3lab.trace(model, ids, names=f"blocks.*.{hook}")
    for layer, unit in [(0, units - 1), (LAYERS - 1, 0)]:
        name = f"blocks.{layer}.{hook}"
        hooks = Hooks({name: Hook(put_head, data=(jnp.asarray(clean_tr[name]), jnp.int32(unit)))})
        assert result.raw[layer, unit] == pytest.approx(logit_diff(model, corrupted, hooks), abs=1e-4)


def put_head_at(x, ctx):
    source, position, head = ctx.data
    return x.at[:, position, head].set(source[:, position, head])


@pytest.mark.slow
def test_head_by_position_patching(model, ids):
    corrupted = corrupt(ids)
    options = dict(answer=ANSWER, counterfactual=COUNTER, progress=False, normalize=False)
    result = analysis.activation_patching(model, ids, corrupted, sites="head_z_position", **options)
    assert result.values.shape == (LAYERS, 10, HEADS) and result.axes == ("layer", "position", "head")
    # Before the first corrupted token (3) clean and corrupted heads are equal: no effect.
    np.testing.assert_allclose(result.raw[:, :3], result.corrupted_metric, atol=1e-5)
    clean_tr = phi3lab.trace(model, ids, names="blocks.*.attn.hook_z")
    for layer, position, head in [(0, 3, HEADS - 1), (LAYERS - 1, 9, 0), (1, 6, 1)]:
        name = f"blocks.{layer}.attn.hook_z"
        data = (jnp.asarray(clean_tr[name]), jnp.int32(position), jnp.int32(head))
        hooks = Hooks({name: Hook(put_head_at, data=data)})
        assert result.raw[layer, position, head] == pytest.approx(logit_diff(model, corrupted, hooks), abs=1e-4)
    # Every position of one head at once is patching that head.
    sweep = _sweep(model, ids, corrupted, None, ANSWER, COUNTER, "head_z_position", None, batch_size=4)
    masks = np.zeros((2, LAYERS, 10, HEADS), bool)
    masks[0, 1, :, 2] = masks[1, 2, :, 0] = True
    whole = analysis.activation_patching(model, ids, corrupted, sites="head_z", **options)
    np.testing.assert_allclose(
        sweep.run(np.repeat(corrupted[None], 2, axis=0), masks), whole.raw[[1, 2], [2, 0]], atol=1e-5
    )
    table = result.to_pandas()
    assert list(table.columns) == ["layer", "position", "head", "clean_token", "corrupted_token", "value", "raw"]
    assert table.set_index(["layer", "position", "head"]).raw[(1, 6, 1)] == result.raw[1, 6, 1]
    view = phi3lab.widgets.PatchingView.from_result(result)
    assert view.values.shape == (LAYERS * HEADS, 10) and view.row_labels[HEADS + 1] == "L1H1"
    np.testing.assert_array_equal(view.values[HEADS + 1], result.values[1, :, 1])


def test_patching_user_metric_and_compile_once(model, ids):
    def metric(logits):
        return jnp.mean(logits[:, -1, ANSWER] - logits[:, -1, COUNTER])

    corrupted = corrupt(ids)
    default = analysis.activation_patching(model, ids, corrupted, answer=ANSWER, counterfactual=COUNTER, progress=False)
    custom = analysis.activation_patching(model, ids, corrupted, metric=metric, progress=False, batch_size=8)
    np.testing.assert_allclose(custom.values, default.values, atol=1e-4)
    from phi3lab.runtime import compile_cache

    # each program is compiled ahead of time for its shapes (one cache entry per compilation)
    sizes = {key for key in compile_cache.entries(model) if key[0] == "patching"}
    analysis.activation_patching(model, corrupted, ids, metric=metric, progress=True, batch_size=8)
    after = {key for key in compile_cache.entries(model) if key[0] == "patching"}
    # the two programs of this test (other tests' sites share the module's model); keys end
    # with the model's attention path settings
    assert {("patching", "resid_pre", "logit_diff"), ("patching", "resid_pre", metric)} <= {k[:3] for k in sizes}
    assert after == sizes


def test_patching_errors(model, ids):
    with pytest.raises(ValueError, match="`sites`"):
        analysis.activation_patching(model, ids, ids, answer=1, sites="resid")
    with pytest.raises(ValueError, match="`corrupted_ids`"):
        analysis.activation_patching(model, ids, ids[:, :5], answer=1)
    with pytest.raises(ValueError, match="`answer`"):
        analysis.activation_patching(model, ids, ids)
    with pytest.raises(ValueError, match="`metric`"):
        analysis.activation_patching(model, ids, ids, metric="logit_diff")


# === Heads ===


def reference_scores(pattern, ids, valid):
    """Plain loops: mean attention on the targets over queries that have any."""
    found = {"previous_token": [], "duplicate_token": [], "induction": []}
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if not valid[b, t]:
                continue
            keys = [s for s in range(t) if valid[b, s]]
            targets = {
                "previous_token": [s for s in keys if s == t - 1],
                "duplicate_token": [s for s in keys if ids[b, s] == ids[b, t]],
                "induction": [s for s in keys if s >= 1 and valid[b, s - 1] and ids[b, s - 1] == ids[b, t]],
            }
            for key, chosen in targets.items():
                if chosen:
                    found[key].append(pattern[b, :, t, chosen].sum(0))
    return {
        key: np.mean(values, axis=0) if values else np.full(pattern.shape[1], np.nan) for key, values in found.items()
    }


def test_head_scores_match_loops(model):
    scores = analysis.head_scores(model, seq_len=6, num_sequences=3, seed=3)
    assert list(scores.columns) == ["layer", "head", "kv_head", "previous_token", "duplicate_token", "induction"]
    assert scores.kv_head.tolist() == [0, 0, 1, 1] * LAYERS
    values = scores[["previous_token", "duplicate_token", "induction"]].to_numpy()
    assert np.all((values >= 0) & (values <= 1))
    ids = analysis.repeated_tokens(VOCAB, 6, 3, seed=3)
    assert ids.shape == (3, 13) and np.all(ids[:, 0] == 1) and np.array_equal(ids[:, 1:7], ids[:, 7:])
    assert analysis.repeated_tokens is phi3lab.tasks.repeated_tokens  # one function, one signature
    low = analysis.repeated_tokens(VOCAB, 6, 2, bos_token=None, low=3)
    assert low.shape == (2, 12) and low.min() >= 3 and all(len(set(row[:6])) == 6 for row in low)
    tr = phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern")
    for layer in range(LAYERS):
        expected = reference_scores(tr.attention(layer), ids, np.ones(ids.shape, bool))
        for key, value in expected.items():
            np.testing.assert_allclose(scores[scores.layer == layer][key], value, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_scores_on_a_padded_trace(model, side):
    """All three detectors, every layer, on repeated sequences padded on one
    side. The padding holds copies of the real tokens, so a detector that
    counted padded queries or keys would find extra duplicates and
    induction targets."""
    rng = np.random.default_rng(7)
    pad = 3
    rows = []
    for _ in range(3):
        tokens = rng.choice(np.arange(2, VOCAB), 4, replace=False)
        real, padding = [1, *tokens, *tokens], list(tokens[:pad])
        rows.append(padding + real if side == "left" else real + padding)
    ids = np.array(rows)
    mask = np.ones(ids.shape, bool)  # row 0 is all real (its copies count)
    if side == "left":
        mask[1:, :pad] = False
    else:
        mask[1:, -pad:] = False
    tr = phi3lab.trace(model, ids.astype(np.int32), padding_mask=mask, names="blocks.*.attn.hook_pattern")
    scores = analysis.head_scores(model, tr)
    for layer in range(LAYERS):
        expected = reference_scores(tr.attention(layer), ids, mask)
        for key, value in expected.items():
            assert np.isfinite(value).all(), key  # every detector has targets
            np.testing.assert_allclose(
                scores[scores.layer == layer][key], value, atol=1e-6, err_msg=f"{key}, layer {layer}"
            )
    unmasked = analysis.detector_scores(tr.attention(0), ids, np.ones(ids.shape, bool))
    assert not np.allclose(
        unmasked["duplicate_token"], scores[scores.layer == 0].duplicate_token
    )  # the padding matters


def test_detectors_on_handcrafted_patterns():
    ids = np.array([[1, 10, 11, 12, 10, 11, 12]])
    length = ids.shape[1]
    previous, induction = np.zeros((1, 2, length, length)), np.zeros((1, 2, length, length))
    previous[0, :, 0, 0] = induction[0, :, :4, 0] = 1
    for t in range(1, length):
        previous[0, :, t, t - 1] = 1
    for t in range(4, length):
        induction[0, :, t, t - 2] = 1  # the token after the earlier copy
    valid = np.ones_like(ids, bool)
    assert analysis.detector_scores(previous, ids, valid)["previous_token"].tolist() == [1.0, 1.0]
    scores = analysis.detector_scores(induction, ids, valid)
    assert scores["induction"].tolist() == [1.0, 1.0] and scores["duplicate_token"].tolist() == [0.0, 0.0]


def test_attention_stats_match_loops(tr):
    stats = analysis.attention_stats(tr)
    pattern = tr.attention(2).astype(np.float64)
    sums = {"entropy": 0.0, "bos_attention": 0.0, "mean_distance": 0.0}
    count = 0
    for b in range(2):
        for t in range(10):
            if tr.padding_mask[b, t]:
                p = pattern[b, :, t]
                nonzero = np.where(p > 0, p, 1.0)
                sums["entropy"] += -(p * np.log(nonzero)).sum(-1)
                sums["bos_attention"] += p[:, 0]
                sums["mean_distance"] += (p * (t - np.arange(10))).sum(-1)
                count += 1
    for key, total in sums.items():
        np.testing.assert_allclose(stats[stats.layer == 2][key], total / count, atol=1e-6)
    assert len(analysis.attention_stats(tr, batch=1)) == LAYERS * HEADS


def test_group_heads(model):
    assert analysis.group_heads(model) == {0: [0, 1], 1: [2, 3]}


def test_head_errors(model, ids):
    partial = phi3lab.trace(model, ids, names="blocks.*.hook_resid_post")
    with pytest.raises(KeyError, match="attn.hook_pattern"):
        analysis.head_scores(model, partial)
    with pytest.raises(ValueError, match="`seq_len`"):
        analysis.head_scores(model, seq_len=0)
    with pytest.raises(ValueError, match="`bos_token`"):
        analysis.head_scores(model, bos_token=VOCAB)


# === Rotary ===


def test_rotary_table(model):
    table = analysis.rotary_table(model, seq_len=16)
    assert isinstance(table, pd.DataFrame) and len(table) == HIDDEN // HEADS // 2
    np.testing.assert_allclose(table.short_factor, [1.0, 1.2, 1.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(table.long_factor, [1.0, 2.0, 4.0, 8.0], rtol=1e-6)
    assert table.attrs["factor_set"] == "short"
    assert table.attrs["attention_factor"] == pytest.approx(np.sqrt(1 + np.log(2) / np.log(32)))
    np.testing.assert_allclose(table.wavelength, table.short_wavelength)
    assert analysis.rotary_table(model, seq_len=40).attrs["factor_set"] == "long"
    np.testing.assert_allclose(
        table.long_wavelength / table.short_wavelength, table.long_factor / table.short_factor, rtol=1e-5
    )


def test_rotary_band_scores_sum_to_the_scores(model, tr):
    scores = tr["blocks.1.attn.hook_attn_scores"]
    for head in (0, 3):
        parts = analysis.rotary_band_scores(model, tr, layer=1, head=head, batch=1)
        assert parts.shape == (HIDDEN // HEADS // 2, 10, 10)
        allowed = np.isfinite(scores[1, head])
        np.testing.assert_array_equal(np.isfinite(parts[0]), allowed)
        np.testing.assert_allclose(parts.sum(0)[allowed], scores[1, head][allowed], atol=1e-5)
    bands = analysis.rotary_band_scores(model, tr, 1, 3, batch=1, bands=[slice(0, 2), [2, 3]])
    np.testing.assert_allclose(bands.sum(0), parts.sum(0), atol=1e-6)
    with pytest.raises(ValueError, match="`bands`"):
        analysis.rotary_band_scores(model, tr, 1, 3, bands=[[4]])
    with pytest.raises(ValueError, match="`head`"):
        analysis.rotary_band_scores(model, tr, 1, HEADS)
