"""Resample ablation, per-head patching and ablating sets of heads:
exact identities against plain runs and NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import phi3lab
from conftest import random_backbone
from phi3lab import hooks as H

HEADS, KV_HEADS = 4, 2


@pytest.fixture(scope="module")
def model():
    return random_backbone(11)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(2).integers(0, 90, (2, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def other():
    return np.random.default_rng(3).integers(0, 90, (2, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def plain(model, ids):
    return phi3lab.trace(model, ids, names=["blocks.*.attn.hook_z", "hook_logits"])


def test_resample_from_the_run_itself_changes_nothing(model, ids, plain):
    for source in (plain, ids):
        tr = phi3lab.trace(
            model,
            ids,
            names="hook_logits",
            hooks=H.ablate_heads(0, [1, 3], mode="resample", source=source, model=model),
        )
        np.testing.assert_array_equal(tr.logits, plain.logits)


def test_resample_takes_the_other_runs_head_outputs(model, ids, other, plain):
    source = phi3lab.trace(model, other, names="blocks.*.attn.hook_z")
    tr = phi3lab.trace(
        model, ids, names="blocks.1.attn.hook_z", hooks=H.ablate_heads(1, [2], mode="resample", source=source)
    )
    z = tr["blocks.1.attn.hook_z"]
    np.testing.assert_array_equal(z[:, :, 2], source["blocks.1.attn.hook_z"][:, :, 2])
    np.testing.assert_array_equal(z[:, :, [0, 1, 3]], plain["blocks.1.attn.hook_z"][:, :, [0, 1, 3]])


def test_ablate_a_set_of_pairs_in_one_call(model, ids):
    together = phi3lab.trace(model, ids, names="hook_logits", hooks=H.ablate_heads({(0, 1), (1, 3), (1, 0)}))
    chained = phi3lab.trace(model, ids, names="hook_logits", hooks=H.ablate_heads(0, [1]) | H.ablate_heads(1, [0, 3]))
    np.testing.assert_array_equal(together.logits, chained.logits)
    zero = phi3lab.trace(model, ids, names="blocks.*.attn.hook_z", hooks=H.ablate_heads({(0, 1), (1, 3)}, mode="mean"))
    np.testing.assert_allclose(
        zero["blocks.1.attn.hook_z"][:, :, 3], zero["blocks.1.attn.hook_z"][:1, :1, 3].repeat(2, 0).repeat(6, 1)
    )


def test_per_head_patch_of_all_heads_is_patching_z_whole(model, ids, other, plain):
    source = phi3lab.trace(model, other, names=["blocks.1.attn.hook_z", "blocks.0.attn.hook_k"])
    whole = phi3lab.trace(model, ids, names="hook_logits", hooks=H.patch("blocks.1.attn.hook_z", source))
    heads = phi3lab.trace(
        model, ids, names="hook_logits", hooks=H.patch("blocks.1.attn.hook_z", source, heads=range(HEADS))
    )
    np.testing.assert_array_equal(heads.logits, whole.logits)
    both = phi3lab.trace(
        model,
        ids,
        names="blocks.1.attn.hook_z",
        hooks=H.patch("blocks.1.attn.hook_z", source, positions=[-1], heads=[2]),
    )
    expected = plain["blocks.1.attn.hook_z"].copy()
    expected[:, -1, 2] = source["blocks.1.attn.hook_z"][:, -1, 2]
    np.testing.assert_array_equal(both["blocks.1.attn.hook_z"], expected)
    k = phi3lab.trace(
        model, ids, names="blocks.0.attn.hook_k", hooks=H.patch("blocks.0.attn.hook_k", source, heads=[-1])
    )
    np.testing.assert_array_equal(k["blocks.0.attn.hook_k"][:, :, 1], source["blocks.0.attn.hook_k"][:, :, 1])


def test_bad_head_interventions_are_refused(model, ids, other):
    short = phi3lab.trace(model, other[:, :4], names="blocks.*.attn.hook_z")
    with pytest.raises(ValueError, match='`mode`="resample" needs `source`'):
        H.ablate_heads(0, 1, mode="resample")
    with pytest.raises(ValueError, match="`source`"):
        phi3lab.trace(model, ids, hooks=H.ablate_heads(0, 1, mode="resample", source=short))  # another shape
    with pytest.raises(ValueError, match="`source`"):
        H.ablate_heads(0, 1, mode="resample", source=phi3lab.trace(model, ids, names="blocks.0.hook_resid_pre"))
    with pytest.raises(ValueError, match="`layer`"):
        H.ablate_heads({(0, 1), (1, "a")})
    with pytest.raises(ValueError, match="`layer`"):
        H.ablate_heads(set())
    with pytest.raises(ValueError, match="`heads`"):
        H.ablate_heads(0)
    with pytest.raises(ValueError, match=r"`heads` must be an int in \[0, 4\)"):
        phi3lab.trace(model, ids, hooks=H.ablate_heads({(0, 4)}))
    full = phi3lab.trace(model, ids, names=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_v"])
    with pytest.raises(ValueError, match="`heads`.*head axis"):
        H.patch("blocks.0.hook_resid_pre", full, heads=[0])
    with pytest.raises(ValueError, match=r"`heads` must be an int in \[0, 2\)"):
        phi3lab.trace(model, ids, hooks=H.patch("blocks.0.attn.hook_v", full, heads=[KV_HEADS]))
