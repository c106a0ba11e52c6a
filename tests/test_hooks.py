"""Interventions: `hooks=` in `phi3lab.trace` and the ready-made
`phi3lab.hooks` (ablate_heads, patch, add, GQA helpers).

Oracles are exact identities: a value a hook sets is compared bit for bit
with the NumPy value it should be, and everything a hook cannot reach (other
heads, earlier layers) with the unhooked run. Those comparisons are exact
because the hooked program computes the untouched values with the same
float32 operations (checked here, not assumed).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

import phi3lab  # noqa: F401  (selects the JAX backend before keras loads)
from conftest import random_backbone, sizes
from phi3lab import hooks as H
from phi3lab.tracing import compiled_count

VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV = 64, 3, 32, 48, 4, 2
HEAD_DIM = HIDDEN // HQ


SIZES = sizes(VOCAB, LAYERS, HIDDEN, FFN, HQ, HKV, 64, 16)


def make_model(seed=0, **overrides):
    """A GQA Phi-3 (4 query heads over 2 key/value heads) with every weight
    random (`random_backbone`)."""
    return random_backbone(seed, rope=None, **{**SIZES, **overrides})


def random_ids(shape, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def ids():
    return random_ids((2, 10), seed=1)


@pytest.fixture(scope="module")
def clean(model, ids):
    return phi3lab.trace(model, ids)


def names_before(layer, site_in_layer, tr):
    """Captured names strictly upstream of `blocks.{layer}.{site_in_layer}`."""
    target = tr.names.index(f"blocks.{layer}.{site_in_layer}")
    return tr.names[:target]


def assert_same(a, b, names):
    different = [n for n in names if not np.array_equal(a[n], b[n])]
    assert not different, f"changed: {different[:5]}"


# === Head ablation ===


def test_zero_ablating_every_head_zeroes_the_layer_attention(model, ids, clean):
    tr = phi3lab.trace(model, ids, hooks=H.ablate_heads(1, range(HQ)))
    assert np.all(tr["blocks.1.attn.hook_z"] == 0.0)
    assert np.all(tr["blocks.1.hook_attn_out"] == 0.0)
    assert np.array_equal(tr.resid(1, "mid"), tr.resid(1, "pre"))
    assert_same(tr, clean, names_before(1, "attn.hook_z", clean))
    assert not np.allclose(tr.logits, clean.logits)


def test_ablating_one_query_head_leaves_its_group_mates(model, ids, clean):
    head = 2
    mate = [h for h in H.query_heads_sharing(model, H.key_value_head_of(model, head)) if h != head]
    assert mate == [3]
    tr = phi3lab.trace(model, ids, hooks=H.ablate_heads(1, [head]))
    z, z0 = tr["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"]
    assert np.all(z[:, :, head] == 0.0)
    assert np.any(z0[:, :, head] != 0.0)
    others = [h for h in range(HQ) if h != head]
    assert np.array_equal(z[:, :, others], z0[:, :, others])  # incl. the group mate
    # the shared key/value head and the mate's pattern are untouched
    for site in ("attn.hook_k", "attn.hook_v", "attn.hook_pattern"):
        assert np.array_equal(tr[f"blocks.1.{site}"], clean[f"blocks.1.{site}"]), site
    assert_same(tr, clean, names_before(1, "attn.hook_z", clean))
    # the output projection then sees the change, and downstream layers too
    assert not np.allclose(tr["blocks.1.hook_attn_out"], clean["blocks.1.hook_attn_out"])
    assert not np.allclose(tr["blocks.2.attn.hook_z"], clean["blocks.2.attn.hook_z"])


def test_mean_ablation_replaces_by_the_mean_over_batch_and_positions(model, ids, clean):
    tr = phi3lab.trace(model, ids, hooks=H.ablate_heads(2, [0, 3], mode="mean"))
    z, z0 = tr["blocks.2.attn.hook_z"], clean["blocks.2.attn.hook_z"]
    for head in (0, 3):
        mean = z0[:, :, head].astype(np.float64).mean(axis=(0, 1))
        np.testing.assert_allclose(z[:, :, head], np.broadcast_to(mean, z[:, :, head].shape), rtol=1e-6, atol=1e-6)
    assert np.array_equal(z[:, :, [1, 2]], z0[:, :, [1, 2]])


def test_ablate_heads_rejects_bad_arguments(model, ids):
    with pytest.raises(ValueError, match=r"`layer` must be an int in \[0, 3\)"):
        phi3lab.trace(model, ids, hooks=H.ablate_heads(LAYERS, 0))
    with pytest.raises(ValueError, match=r"`layer` must be an int in \[0, 3\)"):
        phi3lab.trace(model, ids, hooks=H.ablate_heads(-LAYERS - 1, 0))
    with pytest.raises(ValueError, match=r"`heads` must be an int in \[0, 4\)"):
        phi3lab.trace(model, ids, hooks=H.ablate_heads(0, [1, HQ]))
    with pytest.raises(ValueError, match="`heads`"):
        H.ablate_heads(0, [])
    with pytest.raises(ValueError, match="`mode`"):
        H.ablate_heads(0, 1, mode="resample")


# === Grouped-query helpers ===


def test_query_heads_sharing_and_key_value_head_of(model):
    assert H.query_heads_sharing(model, 0) == [0, 1]
    assert H.query_heads_sharing(model, 1) == [2, 3]
    assert [H.key_value_head_of(model, q) for q in range(HQ)] == [0, 0, 1, 1]
    for shape, groups in [
        ((8, 2), [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ((6, 6), [[h] for h in range(6)]),
        ((6, 1), [list(range(6))]),
    ]:
        stand_in = types.SimpleNamespace(num_query_heads=shape[0], num_key_value_heads=shape[1])
        assert [H.query_heads_sharing(stand_in, k) for k in range(shape[1])] == groups
        for k, group in enumerate(groups):
            assert all(H.key_value_head_of(stand_in, q) == k for q in group)
    with pytest.raises(ValueError, match="`key_value_head`"):
        H.query_heads_sharing(model, HKV)
    with pytest.raises(ValueError, match="`query_head`"):
        H.key_value_head_of(model, HQ)
    with pytest.raises(ValueError, match="`query_head`"):
        H.key_value_head_of(model, -HQ - 1)
    # One rule for indices everywhere: negative values count from the end.
    assert H.key_value_head_of(model, -1) == H.key_value_head_of(model, HQ - 1)
    assert H.query_heads_sharing(model, -1) == H.query_heads_sharing(model, HKV - 1)


def test_negative_layers_count_from_the_end(model, ids):
    last = phi3lab.trace(model, ids, names="blocks.-1.hook_resid_post", hooks=H.ablate_heads(-1, [0, -1]))
    named = phi3lab.trace(
        model, ids, names=f"blocks.{LAYERS - 1}.hook_resid_post", hooks=H.ablate_heads(LAYERS - 1, [0, HQ - 1])
    )
    assert last.names == named.names == [f"blocks.{LAYERS - 1}.hook_resid_post"]
    assert np.array_equal(last.resid(-1), named.resid(LAYERS - 1))


def test_gqa_helpers_describe_what_the_attention_computes(clean):
    """Each query head's scores are its rotated queries against the rotated
    keys of `key_value_head_of` that head, and of no other key/value head."""
    model_shape = types.SimpleNamespace(num_query_heads=HQ, num_key_value_heads=HKV)
    length = clean.token_ids.shape[1]
    future = np.triu(np.ones((length, length), bool), k=1)
    for layer in range(LAYERS):
        q = clean[f"blocks.{layer}.attn.hook_rot_q"].astype(np.float64)
        k = clean[f"blocks.{layer}.attn.hook_rot_k"].astype(np.float64)
        scores = clean[f"blocks.{layer}.attn.hook_attn_scores"]
        for head in range(HQ):
            for kv in range(HKV):
                expected = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(HEAD_DIM)
                match = np.allclose(scores[:, head][:, ~future], expected[:, ~future], atol=1e-4)
                assert match == (kv == H.key_value_head_of(model_shape, head)), (layer, head, kv)


# === Patching ===


def test_patching_every_site_from_itself_changes_nothing(model, ids, clean):
    tr = phi3lab.trace(model, ids, hooks=H.patch("*", clean))
    assert tr.names == clean.names
    assert_same(tr, clean, clean.names)
    assert np.array_equal(tr.output, clean.output)
    # patching only the residual streams: everything else is recomputed, and
    # comes out identical
    tr = phi3lab.trace(model, ids, hooks=H.patch("blocks.*.hook_resid_pre", clean))
    assert_same(tr, clean, clean.names)


def test_patching_the_first_residual_stream_restores_the_clean_run(model, ids, clean):
    corrupted_ids = random_ids(ids.shape, seed=2)
    corrupted = phi3lab.trace(model, corrupted_ids, names="hook_logits")
    assert not np.allclose(corrupted.logits, clean.logits)
    patched = phi3lab.trace(model, corrupted_ids, hooks=H.patch("blocks.0.hook_resid_pre", clean))
    assert np.array_equal(patched.logits, clean.logits)
    assert_same(patched, clean, clean.names[clean.names.index("blocks.0.hook_resid_pre") :])
    assert not np.array_equal(patched["hook_embed"], clean["hook_embed"])


def test_patching_some_positions(model, ids, clean):
    corrupted_ids = random_ids(ids.shape, seed=3)
    corrupted = phi3lab.trace(model, corrupted_ids)
    first = 4
    patched = phi3lab.trace(
        model, corrupted_ids, hooks=H.patch("blocks.0.hook_resid_pre", clean, positions=np.arange(first))
    )
    # causal: positions before `first` see only clean values; later ones mix
    assert np.array_equal(patched.logits[:, :first], clean.logits[:, :first])
    assert not np.allclose(patched.logits[:, first:], clean.logits[:, first:])
    assert not np.allclose(patched.logits[:, first:], corrupted.logits[:, first:])
    # attention sites are patched along the query axis
    patched = phi3lab.trace(model, corrupted_ids, hooks=H.patch("blocks.1.attn.hook_pattern", clean, positions=[6]))
    pattern, clean_pattern = patched.attention(1), clean.attention(1)
    assert np.array_equal(pattern[:, :, 6], clean_pattern[:, :, 6])
    rest = [t for t in range(ids.shape[1]) if t != 6]
    assert np.array_equal(pattern[:, :, rest], corrupted.attention(1)[:, :, rest])


def test_patch_needs_a_captured_name(model, ids):
    source = phi3lab.trace(model, ids, names="blocks.*.hook_resid_post")
    with pytest.raises(ValueError, match=r"(?s)`name`.*not captured"):
        H.patch("blocks.0.hook_resid_pre", source)


# === Steering ===


def test_add_steers_the_residual_stream(model, ids, clean):
    vector = np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32)
    tr = phi3lab.trace(model, ids, hooks=H.add("blocks.1.hook_resid_post", vector))
    assert np.array_equal(tr.resid(1, "post"), clean.resid(1, "post") + vector)
    assert np.array_equal(tr.resid(2, "pre"), tr.resid(1, "post"))
    assert_same(tr, clean, names_before(1, "hook_resid_post", clean))
    assert not np.allclose(tr.logits, clean.logits)

    scaled = phi3lab.trace(model, ids, hooks=H.add("blocks.1.hook_resid_post", vector, scale=-2.5))
    # Within one rounding of `scale * v`: XLA may fuse `x + scale * v` into a multiply-add.
    steer = np.float32(-2.5) * vector
    np.testing.assert_allclose(
        scaled.resid(1, "post"),
        clean.resid(1, "post") + steer,
        rtol=2**-23,
        atol=float(np.spacing(np.abs(steer).max())),
    )
    # a per-position vector [T, D] broadcasts over the batch
    per_position = np.random.default_rng(1).standard_normal((ids.shape[1], HIDDEN)).astype(np.float32)
    tr = phi3lab.trace(model, ids, hooks=H.add("blocks.0.hook_attn_out", per_position))
    assert np.array_equal(tr["blocks.0.hook_attn_out"], clean["blocks.0.hook_attn_out"] + per_position)
    assert np.array_equal(tr.resid(0, "mid"), tr.resid(0, "pre") + tr["blocks.0.hook_attn_out"])
    with pytest.raises(ValueError, match="`vector`"):
        H.add("blocks.0.hook_resid_post", np.ones(HIDDEN, np.int32))


# === User hooks ===


def double(x, ctx):
    return x * 2.0


def plus_one(x, ctx):
    return x + 1.0


def test_two_hooks_on_one_site_run_in_order(model, ids, clean):
    site = "blocks.1.hook_resid_post"
    base = clean[site]
    tr = phi3lab.trace(model, ids, hooks=H.Hooks({site: double}) | H.Hooks({site: plus_one}))
    assert np.array_equal(tr[site], base * np.float32(2) + np.float32(1))
    # the other order; plain dicts combine on either side, and two ready-made
    # hooks on one site are both kept
    hooks = {site: plus_one} | H.ablate_heads(2, [1]) | H.ablate_heads(2, [2]) | {site: double}
    assert isinstance(hooks, H.Hooks) and len(hooks) == 4
    tr = phi3lab.trace(model, ids, hooks=hooks)
    assert np.array_equal(tr[site], (base + np.float32(1)) * np.float32(2))
    z = tr["blocks.2.attn.hook_z"]
    assert np.all(z[:, :, [1, 2]] == 0.0) and np.all(z[:, :, [0, 3]] != 0.0)


def test_hooks_see_their_context_and_may_only_read(model, ids, clean):
    seen = []

    def record(x, ctx):
        seen.append((ctx.name, ctx.layer, x.shape, ctx.static))
        return None

    hooks = {"blocks.*.hook_resid_mid": record, "hook_embed": H.Hook(record, static=("tag",))}
    tr = phi3lab.trace(model, ids, hooks=hooks)
    assert_same(tr, clean, clean.names)
    batch, length = ids.shape
    assert sorted(seen, key=str) == sorted(
        [(f"blocks.{l}.hook_resid_mid", l, (batch, length, HIDDEN), ()) for l in range(LAYERS)]
        + [("hook_embed", None, (batch, length, HIDDEN), ("tag",))],
        key=str,
    )

    def use_data(x, ctx):
        return x * ctx.data["gain"]

    tr = phi3lab.trace(model, ids, hooks={"blocks.2.hook_mlp_out": H.Hook(use_data, data={"gain": np.float32(0.0)})})
    assert np.all(tr["blocks.2.hook_mlp_out"] == 0.0)
    assert np.array_equal(tr.resid(2, "post"), tr.resid(2, "mid"))


def wrong_shape(x, ctx):
    return x[..., :-1]


def test_hook_errors(model, ids):
    with pytest.raises(ValueError, match=r"(?s)blocks\.0\.hook_resid_post.*shape"):
        phi3lab.trace(model, ids, hooks={"blocks.0.hook_resid_post": wrong_shape})
    with pytest.raises(ValueError, match=r"(?s)`hooks`.*blocks\.0\.hook_resid_post"):
        phi3lab.trace(model, ids, hooks={"blocks.0.hook_resid_pots": double})
    with pytest.raises(ValueError, match="`hooks`"):
        phi3lab.trace(model, ids, hooks={f"blocks.{LAYERS}.hook_resid_post": double})
    with pytest.raises(TypeError, match="hooks"):
        phi3lab.trace(model, ids, hooks={"blocks.0.hook_resid_post": 3})


def python_float(x, ctx):
    return x * float(x[0, 0, 0])


def python_if(x, ctx):
    if x.sum() > 0:
        return -x
    return x


def python_index(x, ctx):
    return x * [1.0, 2.0][(x[0, 0, 0] > 0).astype("int32")]


def python_numpy(x, ctx):
    return np.asarray(x) * 2


@pytest.mark.parametrize(
    "hook, jax_error",
    [
        (python_float, "ConcretizationTypeError"),
        (python_if, "TracerBoolConversionError"),
        (python_index, "TracerIntegerConversionError"),
        (python_numpy, "TracerArrayConversionError"),
    ],
)
def test_python_side_work_in_a_hook_is_explained(model, ids, hook, jax_error):
    """A hook that asks a tracer for a value gets an error naming the hook and
    the site, saying why (the compiled program) and what to use instead,
    raised from phi3lab (JAX's error is its cause)."""
    before = compiled_count(model)
    with pytest.raises(TypeError) as caught:
        phi3lab.trace(model, ids, hooks={"blocks.1.hook_resid_mid": hook})
    error = caught.value
    assert type(error).__name__ == "HookTracingError" and type(error.__cause__).__name__ == jax_error
    message = str(error)
    for fragment in (
        hook.__name__,
        "'blocks.1.hook_resid_mid'",
        jax_error,
        "compiled program",
        "tracer",
        "jnp",
        "jax.debug.print",
        "jax.debug.callback",
    ):
        assert fragment in message, fragment
    assert "phi3lab" in caught.traceback[-1].path.parts
    assert compiled_count(model) == before  # nothing was compiled, and the model still traces
    assert np.array_equal(
        phi3lab.trace(model, ids, names="hook_embed")["hook_embed"], phi3lab.trace(model, ids)["hook_embed"]
    )


def test_the_advised_alternatives_work_in_a_hook(model, ids, clean):
    """What the error advises: `jnp` instead of `if`, and
    `jax.debug.callback` to see the values."""
    import jax
    from jax import numpy as jnp

    seen = []

    def look(x, ctx):
        jax.debug.callback(lambda value: seen.append(np.asarray(value)), x)
        return jnp.where(x.sum() > 0, -x, x)

    tr = phi3lab.trace(model, ids, names="blocks.1.hook_resid_mid", hooks={"blocks.1.hook_resid_mid": look})
    assert len(seen) == 1  # the values the hook saw: the unhooked run's (up to XLA's fusion)
    np.testing.assert_allclose(seen[0], clean["blocks.1.hook_resid_mid"], rtol=1e-5, atol=1e-5)
    expected = -seen[0] if seen[0].sum() > 0 else seen[0]
    np.testing.assert_array_equal(tr["blocks.1.hook_resid_mid"], expected)


# === Compile once ===


def test_new_hook_data_reuses_the_compiled_trace(ids):
    model = make_model(seed=5)
    rng = np.random.default_rng(0)
    names = ["blocks.0.hook_resid_pre", "blocks.*.hook_resid_post"]

    def source_of(token_ids):
        return phi3lab.trace(model, token_ids, names="blocks.0.hook_resid_pre")

    def run(token_ids, source, vector, scale):
        hooks = (
            H.patch("blocks.0.hook_resid_pre", source)
            | H.add("blocks.1.hook_resid_post", vector, scale=scale)
            | H.ablate_heads(2, [0, 3])
        )
        return phi3lab.trace(model, token_ids, names=names, hooks=hooks)

    run(ids, source_of(ids), rng.standard_normal(HIDDEN), 1.0)
    count = compiled_count(model)
    for seed in range(3):  # new tokens, new patch sources, new vectors and scales
        source = source_of(random_ids(ids.shape, seed + 10))
        v1, v2 = rng.standard_normal((2, HIDDEN)).astype(np.float32)
        one = run(random_ids(ids.shape, seed), source, v1, 0.5 + seed)
        two = run(random_ids(ids.shape, seed + 20), source, v2, -1.0 - seed)
        # the new data was used, not a baked-in copy of the first
        assert np.array_equal(one["blocks.0.hook_resid_pre"], source["blocks.0.hook_resid_pre"])
        np.testing.assert_allclose(
            two.resid(1, "post") - one.resid(1, "post"),
            np.broadcast_to((-1.0 - seed) * v2 - (0.5 + seed) * v1, one.resid(1, "post").shape),
            atol=1e-4,
        )
    assert compiled_count(model) == count
    longer = random_ids((ids.shape[0], ids.shape[1] + 2), 0)
    run(longer, source_of(longer), np.ones(HIDDEN, np.float32), 1.0)
    # The new length: a new hooked run (hooks see the real length); its
    # source trace shares the length bucket's program.
    assert compiled_count(model) == count + 1


def test_a_loop_over_heads_and_positions_reuses_one_program(ids):
    """Which heads and positions a `patch` or `ablate_heads` touches is hook
    data, not a compiled setting: a sweep over heads compiles once per site."""
    model = make_model(seed=6)
    clean = phi3lab.trace(model, ids, names="blocks.1.attn.hook_z")
    corrupted_ids = random_ids(ids.shape, seed=7)
    corrupted = phi3lab.trace(model, corrupted_ids, names="blocks.1.attn.hook_z")
    z = "blocks.1.attn.hook_z"

    def patched(**where):
        return phi3lab.trace(model, corrupted_ids, names=z, hooks=H.patch(z, clean, **where))[z]

    def ablated(heads):
        return phi3lab.trace(model, corrupted_ids, names=z, hooks=H.ablate_heads(1, heads))[z]

    patched(heads=[0])
    ablated(0)
    count = compiled_count(model)
    for head in range(HQ):
        for where in ({"heads": [head]}, {"heads": head, "positions": [head, -1]}):
            expected = corrupted[z].copy()
            rows = slice(None) if "positions" not in where else np.array(where["positions"])
            expected[:, rows, head] = clean[z][:, rows, head]
            assert np.array_equal(patched(**where), expected)
        expected = corrupted[z].copy()
        expected[:, :, head] = 0
        assert np.array_equal(ablated(head), expected)
    assert compiled_count(model) == count
