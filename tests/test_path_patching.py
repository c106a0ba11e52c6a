"""`phi3lab.analysis.path_patching` (Wang et al. 2022, in activation
patching's orientation: corrupted base, clean senders).

Oracles: activation patching (with every path allowed and the final
residual stream as receiver, path patching is activation patching of the
senders), and the two steps of the method written out with public
`phi3lab.hooks` and `phi3lab.trace` runs.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax import numpy as jnp

import phi3lab
from conftest import corrupted_pair, random_backbone
from phi3lab import analysis
from phi3lab.hooks import Hook, Hooks

ANSWER, COUNTER = 7, 11
LAYERS, HEADS = 2, 4


@pytest.fixture(scope="module")
def model():
    return random_backbone(7, scale=0.25)


@pytest.fixture(scope="module")
def pair():
    return corrupted_pair(1, (2, 6), {1: 9, 3: 4})


def logit_diff(tr):
    logits = tr.logits[:, -1].astype(np.float64)
    return float(np.mean(logits[:, ANSWER] - logits[:, COUNTER]))


def test_every_path_to_the_final_stream_is_activation_patching(model, pair):
    clean, corrupted = pair
    exact = analysis.activation_patching(
        model, clean, corrupted, answer=ANSWER, counterfactual=COUNTER, sites="head_z", progress=False
    )
    sweep = analysis.path_patching(
        model, clean, corrupted, "heads", "resid_final", answer=ANSWER, counterfactual=COUNTER, freeze=False
    )
    np.testing.assert_allclose(sweep.raw, exact.raw, atol=1e-5)
    np.testing.assert_allclose(sweep.values, exact.values, atol=1e-5)
    one = analysis.path_patching(
        model, clean, corrupted, {(0, 2)}, "resid_final", answer=ANSWER, counterfactual=COUNTER, freeze=False
    )
    assert one.raw == pytest.approx(exact.raw[0, 2], abs=1e-5)
    assert one.clean_metric == pytest.approx(exact.clean_metric, abs=1e-5)
    assert one.corrupted_metric == pytest.approx(exact.corrupted_metric, abs=1e-5)


def _freeze(x, ctx):
    clean, corrupted = ctx.data
    out = jnp.asarray(corrupted)
    for head in ctx.static:
        out = out.at[:, :, head].set(clean[:, :, head])
    return out


def test_the_two_steps_written_out_with_hooks(model, pair):
    """Sender head (0, 1), receiver: the query of head (1, 2)."""
    clean, corrupted = pair
    names = ["blocks.*.attn.hook_z", "blocks.*.hook_mlp_out"]
    clean_tr, bad_tr = phi3lab.trace(model, clean, names=names), phi3lab.trace(model, corrupted, names=names)
    step1 = []
    for layer in range(LAYERS):
        z, mlp = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"
        step1.append((z, Hook(_freeze, data=(clean_tr[z], bad_tr[z]), static=(1,) if layer == 0 else ())))
        step1.append((mlp, Hook(_freeze, data=(clean_tr[mlp], bad_tr[mlp]))))
    recorded = phi3lab.trace(model, corrupted, names="blocks.1.attn.hook_q", hooks=Hooks(step1))
    step2 = phi3lab.hooks.patch("blocks.1.attn.hook_q", recorded, heads=[2])
    expected = logit_diff(phi3lab.trace(model, corrupted, names="hook_logits", hooks=step2))
    result = analysis.path_patching(
        model, clean, corrupted, {(0, 1)}, [(1, 2, "q")], answer=ANSWER, counterfactual=COUNTER
    )
    assert result.raw == pytest.approx(expected, abs=1e-5)
    assert result.raw != pytest.approx(result.corrupted_metric, abs=1e-4)  # the path carries something
    sweep = analysis.path_patching(
        model, clean, corrupted, "heads", [(1, 2, "q")], answer=ANSWER, counterfactual=COUNTER
    )
    assert sweep.raw[0, 1] == pytest.approx(expected, abs=1e-5)
    np.testing.assert_array_equal(sweep.raw[1], sweep.corrupted_metric)  # same-layer heads: no path to q


def test_mlp_senders_and_receivers(model, pair):
    clean, corrupted = pair
    mlp_in = analysis.path_patching(model, clean, corrupted, {(0, 0), (0, "mlp")}, [(1, "mlp")], answer=ANSWER)
    assert np.isfinite(mlp_in.value)
    same_block = analysis.path_patching(model, clean, corrupted, {(1, 0)}, [(1, "mlp")], answer=ANSWER)
    assert same_block.raw != pytest.approx(same_block.corrupted_metric, abs=1e-6)


def test_no_senders_give_zero_and_bad_paths_are_refused(model, pair):
    clean, corrupted = pair
    empty = analysis.path_patching(model, clean, corrupted, set(), "resid_final", answer=ANSWER, counterfactual=COUNTER)
    assert empty.value == 0.0 and empty.raw == empty.corrupted_metric
    with pytest.raises(ValueError, match="no path to the receivers"):
        analysis.path_patching(model, clean, corrupted, {(1, 0)}, [(0, 2, "q")], answer=ANSWER)
    with pytest.raises(ValueError, match="no path to the receivers"):
        analysis.path_patching(model, clean, corrupted, {(1, "mlp")}, [(1, "mlp")], answer=ANSWER)
    with pytest.raises(ValueError, match="`senders`"):
        analysis.path_patching(model, clean, corrupted, {(LAYERS, 0)}, "resid_final", answer=ANSWER)
    with pytest.raises(ValueError, match="`senders`"):
        analysis.path_patching(model, clean, corrupted, {(0, HEADS)}, "resid_final", answer=ANSWER)
    with pytest.raises(ValueError, match="`senders`"):
        analysis.path_patching(model, clean, corrupted, "all", "resid_final", answer=ANSWER)
    with pytest.raises(ValueError, match="`receivers`"):
        analysis.path_patching(model, clean, corrupted, {(0, 0)}, [(1, 2, "z")], answer=ANSWER)
    with pytest.raises(ValueError, match="`receivers`"):
        analysis.path_patching(model, clean, corrupted, {(0, 0)}, [(1, 2, "k")], answer=ANSWER)  # 2 kv heads
    with pytest.raises(ValueError, match="`receivers`"):
        analysis.path_patching(model, clean, corrupted, {(0, 0)}, "final", answer=ANSWER)
    with pytest.raises(ValueError, match="`receivers`"):
        analysis.path_patching(model, clean, corrupted, {(0, 0)}, [], answer=ANSWER)
    with pytest.raises(ValueError, match="scalar or one value per batch row"):
        analysis.path_patching(model, clean, corrupted, {(0, 0)}, "resid_final", metric=lambda logits: logits[:, -1])
