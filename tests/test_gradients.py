"""`phi3lab.gradients` and differentiable runs through `phi3lab.tracing.forward_fn`.

Oracles: central finite differences of the metric, computed from
`phi3lab.trace` logits with NumPy (a float64 model in a subprocess with
`JAX_ENABLE_X64`), and exact identities of the chain rule (the gradient with
respect to a steering vector is the site's gradient summed over batch and
positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
from conftest import HIDDEN, random_backbone
from phi3lab import hooks as H

ANSWER, COUNTER = 7, 11
IDS = np.array([[1, 5, 9, 13, 17, 21], [2, 6, 10, 14, 18, 22]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], bool)  # row 1 left-padded
SITES = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_mid",
    "blocks.0.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.1.attn.hook_pattern",
    "blocks.0.attn.hook_attn_scores",
    "blocks.1.attn.hook_z",
    "blocks.0.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "ln_final.hook_normalized",
]


@pytest.fixture(scope="module")
def model():
    return random_backbone(3)


@pytest.fixture(scope="module")
def g(model):
    return phi3lab.gradients(model, IDS, answer=ANSWER, counterfactual=COUNTER, names=SITES, padding_mask=MASK)


def logit_diff_rows(logits, mask=MASK):
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    rows = np.arange(len(logits))
    return logits[rows, last, ANSWER] - logits[rows, last, COUNTER]


FINITE_DIFFERENCES = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, "tests")
    from conftest import random_backbone
    from test_gradients import ANSWER, COUNTER, IDS, MASK, SITES, logit_diff_rows
    import phi3lab
    from phi3lab import hooks as H

    model = random_backbone(3, dtype="float64")
    g = phi3lab.gradients(model, IDS, answer=ANSWER, counterfactual=COUNTER, names=SITES, padding_mask=MASK)
    rng = np.random.default_rng(0)
    eps, report = 4e-3, {}
    for name in SITES:
        grad = g.grad(name)
        direction = rng.standard_normal(grad.shape)
        if name.endswith("hook_attn_scores"):
            direction = np.where(np.isfinite(g[name]), direction, 0.0)  # masked scores are -inf
        finite = g[name][np.isfinite(g[name])]
        direction = direction * np.sqrt(np.mean(finite ** 2))  # steps relative to the activation's size
        def metric(step):
            tr = phi3lab.trace(model, IDS, padding_mask=MASK, names="hook_logits", hooks=H.add(name, step * direction))
            return logit_diff_rows(tr.logits.astype(np.float64)).sum()
        def central(h):
            return (metric(h) - metric(-h)) / (2 * h)
        numeric = (4 * central(eps / 2) - central(eps)) / 3  # Richardson: error O(eps^4)
        analytic = float(np.sum(grad * direction))
        report[name] = [analytic, numeric, str(grad.dtype)]
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_gradients_equal_central_finite_differences_in_float64():
    """Directional derivatives at every kind of site against central
    differences of the logit difference (Richardson-extrapolated from steps of
    4e-3 and 2e-3 of the activation's RMS, truncation error O(1e-10)), float64 weights and
    activations. Attention scores and patterns stay float32 in the model
    (`Phi3Attention.attend`), so each metric carries ~1e-7 relative
    rounding, ~1e-4 once divided by the step: sites after the last
    attention (the final norm) agree to 1e-8, the others to ~2e-4; the
    bound is 1e-3."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=root)
    done = subprocess.run(
        [sys.executable, "-c", FINITE_DIFFERENCES],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == set(SITES)
    errors = {}
    for name, (analytic, numeric, dtype) in report.items():
        errors[name] = abs(analytic - numeric) / max(abs(numeric), 1e-3)
        assert abs(analytic) > 1e-3, (name, analytic)  # a direction the metric depends on
    print({k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 1e-3, errors
    assert errors["ln_final.hook_normalized"] < 1e-6, errors
    assert report["blocks.1.hook_resid_mid"][2] == "float64"


def test_gradient_trace_holds_the_activations_and_the_metric(model, g):
    tr = phi3lab.trace(model, IDS, padding_mask=MASK, names=SITES + ["hook_logits"])
    for name in SITES:
        # Another compiled program: float32 sums in another order.
        finite = np.isfinite(tr[name])
        np.testing.assert_allclose(g[name][finite], tr[name][finite], atol=1e-5 * np.abs(tr[name][finite]).max())
        assert g.grad(name).shape == tr[name].shape
    np.testing.assert_allclose(g.metric, logit_diff_rows(tr.logits), rtol=1e-4, atol=1e-4)
    assert g.names == [n for n in tr.names if n in SITES]  # forward order
    with pytest.raises(KeyError, match="not captured"):
        g.grad("blocks.0.hook_resid_post")


def test_rows_do_not_interact(model, g):
    """Row 0's gradient is the gradient of row 0's metric alone."""
    alone = phi3lab.gradients(model, IDS[:1], answer=ANSWER, counterfactual=COUNTER, names="blocks.1.attn.hook_z")
    np.testing.assert_allclose(
        alone.grad("blocks.1.attn.hook_z")[0], g.grad("blocks.1.attn.hook_z")[0], rtol=1e-4, atol=1e-6
    )
    # The padded position of row 1 does not influence anything.
    assert np.all(g.grad("blocks.0.hook_resid_pre")[1, 0] == 0)


def test_grad_of_a_steering_vector_is_the_site_gradient_summed(model, g):
    """d metric / d v for `hooks.add(site, v)` is the site's gradient summed
    over batch and positions (chain rule through a broadcast), also under
    `jax.jit`, and `jax.jvp` / `jax.vmap` run through the same function."""
    site = "blocks.1.hook_resid_mid"
    params = model.params()

    def metric(vector):
        fn = phi3lab.tracing.forward_fn(model, names="hook_logits", hooks=H.add(site, vector))
        out = fn(params, jnp.asarray(IDS), jnp.asarray(MASK), fn.hook_data)
        logits = model.unembed(params, out.hidden)
        return jnp.sum(jnp.asarray(logit_diff_rows(logits)))

    zero = jnp.zeros(HIDDEN, jnp.float32)
    expected = g.grad(site).sum(axis=(0, 1))
    np.testing.assert_allclose(jax.grad(metric)(zero), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(metric))(zero), expected, rtol=1e-5, atol=1e-6)
    direction = jnp.asarray(np.random.default_rng(2).standard_normal(HIDDEN), jnp.float32)
    value, tangent = jax.jvp(metric, (zero,), (direction,))
    assert float(tangent) == pytest.approx(float(expected @ direction), rel=1e-4)
    assert float(value) == pytest.approx(float(g.metric.sum()), rel=1e-5)
    mapped = jax.vmap(metric)(jnp.stack([zero, direction]))
    assert float(mapped[0]) == pytest.approx(float(value), rel=1e-5)


def test_grad_with_respect_to_hook_data_of_a_pure_forward(model):
    """The documented pure entry: `jax.grad` of `fn(params, ids, mask,
    hook_data)` with respect to the hooks' data, jitted; the scale's
    gradient is <vector, site gradient>."""
    site = "blocks.0.hook_resid_post"
    vector = jnp.asarray(np.random.default_rng(3).standard_normal(HIDDEN), jnp.float32)
    fn = phi3lab.tracing.forward_fn(model, hooks=H.add(site, vector, scale=0.0))
    params = model.params()

    @jax.jit
    def grads(data):
        return jax.grad(lambda d: model.unembed(params, fn(params, jnp.asarray(IDS), None, d).hidden)[0, -1, ANSWER])(
            data
        )

    ((d_vector, d_scale),) = grads(fn.hook_data)
    g0 = phi3lab.gradients(model, IDS, metric=lambda logits: logits[0, -1, ANSWER], names=site)
    site_grad = g0.grad(site).sum(axis=(0, 1))
    assert float(d_scale) == pytest.approx(float(site_grad @ vector), rel=1e-4)
    np.testing.assert_array_equal(np.asarray(d_vector), 0.0)  # scale 0: v does not matter


def test_user_metric_with_the_batch_and_a_total(model, g):
    def per_row(logits, batch):
        last = batch["padding_mask"].shape[1] - 1 - jnp.argmax(batch["padding_mask"][:, ::-1], axis=1)
        rows = jnp.arange(logits.shape[0])
        return logits[rows, last, ANSWER] - logits[rows, last, COUNTER]

    mine = phi3lab.gradients(model, IDS, per_row, names="blocks.1.attn.hook_z", padding_mask=MASK)
    np.testing.assert_allclose(mine.grad("blocks.1.attn.hook_z"), g.grad("blocks.1.attn.hook_z"), rtol=1e-4, atol=1e-6)
    total = phi3lab.gradients(model, IDS, lambda logits: logits[:, -1, ANSWER].sum(), names="blocks.1.attn.hook_z")
    assert isinstance(total.metric, float)


def test_gradients_after_interventions(model):
    """Gradients are taken at the values downstream sees: after a zero
    ablation of every head of block 1, nothing flows to block 1's q."""
    ablated = phi3lab.gradients(
        model,
        IDS,
        answer=ANSWER,
        names=["blocks.1.attn.hook_q", "blocks.1.attn.hook_z"],
        hooks=H.ablate_heads(1, range(4)),
    )
    assert np.all(ablated.grad("blocks.1.attn.hook_q") == 0)
    assert np.all(ablated["blocks.1.attn.hook_z"] == 0)
    assert np.any(ablated.grad("blocks.1.attn.hook_z") != 0)


def test_one_compiled_program_per_sites_and_metric(model):
    from phi3lab.runtime import compile_cache

    before = compile_cache.size(model, "gradients")
    for seed in range(3):
        ids = np.random.default_rng(seed).integers(0, 90, (2, 6))
        phi3lab.gradients(model, ids, answer=ANSWER, counterfactual=COUNTER, names=SITES, padding_mask=MASK)
    assert compile_cache.size(model, "gradients") - before <= 1


def test_bad_metrics_and_sites_are_refused(model):
    with pytest.raises(ValueError, match="scalar or one value per batch row"):
        phi3lab.gradients(model, IDS, lambda logits: logits[:, -1], names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="non-finite"):
        phi3lab.gradients(model, IDS, lambda logits: jnp.log(logits[:, -1, 0] * 0.0), names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="a jax.numpy array"):
        phi3lab.gradients(model, IDS, lambda logits: {"a": 1}, names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="`metric` must be None or a function"):
        phi3lab.gradients(model, IDS, 3, names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="`answer` must be a token id"):
        phi3lab.gradients(model, IDS, names="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="matches no hook name"):
        phi3lab.gradients(model, IDS, answer=1, names="blocks.0.hook_nope")
    with pytest.raises(ValueError, match="hook_logits"):
        phi3lab.gradients(model, IDS, answer=1, names="hook_logits")
    with pytest.raises(ValueError, match="`answer`"):
        phi3lab.gradients(model, IDS, answer=10_000, names="blocks.0.hook_resid_pre")


def test_add_accepts_tracers_and_reports_the_inputs_batch_and_length(model):
    """`hooks.add` inside `jax.grad` (data are tracers): shape/dtype checks
    still run; the concrete-only finiteness check is skipped."""
    assert jax.grad(lambda s: H.add("blocks.0.hook_resid_post", jnp.ones(HIDDEN), s).entries[0][1].data[1])(1.0) == 1.0
    with pytest.raises(ValueError, match="a float array"):
        jax.grad(lambda v: H.add("blocks.0.hook_resid_post", v.astype(jnp.int32)).entries[0][1].data[1])(jnp.ones(3))
    with pytest.raises(ValueError, match="finite number"):
        H.add("blocks.0.hook_resid_post", np.ones(HIDDEN, np.float32), float("nan"))
    with pytest.raises(ValueError, match=r"\[B, T, D\] = \[B, T, 64\] \(B and T are the input's"):
        phi3lab.trace(model, IDS, hooks=H.add("blocks.0.hook_resid_post", np.ones(3, np.float32)))


def test_forward_output_is_a_pytree(model):
    """`ForwardOutput` is a pytree: a jitted (or vmapped) function may return
    it, and `jax.tree.leaves` finds the hidden states and every capture."""
    fn = phi3lab.tracing.forward_fn(model, names=["hook_logits", "blocks.0.hook_resid_post"])
    params = model.params()
    out = jax.jit(lambda ids: fn(params, ids, None))(jnp.asarray(IDS))
    assert isinstance(out, phi3lab.tracing.ForwardOutput)
    eager = fn(params, jnp.asarray(IDS), None)
    leaves = jax.tree.leaves(out)
    assert len(leaves) == 1 + len(eager.captures)
    for got, want in zip(leaves, jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert out.logits.shape == (*IDS.shape, model.vocabulary_size)
    rows = jax.vmap(lambda ids: fn(params, ids[None], None))(jnp.asarray(IDS))
    assert rows.hidden.shape == (IDS.shape[0], 1, *eager.hidden.shape[1:])
