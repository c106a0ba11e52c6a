"""`phi3lab.compare_with_transformers`: one row per hook site, and it must
catch a real disagreement (a perturbed weight shows up from its site on)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import phi3lab
from conftest import (
    LENGTHS,
    hf_config,
    hf_model,
    require,
    rope_factors,
    token_batch,
)
from phi3lab import Phi3Backbone
from phi3lab.tracing.names import all_names


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require("transformers")
    config = hf_config(
        num_key_value_heads=2,
        partial_rotary_factor=0.75,
        tie_word_embeddings=True,
        rope_scaling={"type": "longrope", "short_factor": rope_factors(6)[0], "long_factor": rope_factors(6)[1]},
    )
    reference = hf_model(config, seed=30)
    directory = tmp_path_factory.mktemp("phi4_mini_shaped")
    reference.save_pretrained(directory)
    return reference, directory


def test_every_site_matches(checkpoint):
    reference, directory = checkpoint
    model = Phi3Backbone.from_preset(str(directory))
    ids, mask = token_batch(LENGTHS["above"], seed=2)
    table = phi3lab.compare_with_transformers(model, reference, ids, padding_mask=mask)
    expected = [n for n in all_names(model.num_layers) if not n.endswith("hook_attn_scores")]
    assert table["name"].tolist() == expected
    assert table.attrs["all_passed"], table[~table.passed]
    # float32 rounding grows with the activations (up to ~70 here): 1e-4 plus 1e-5 of the scale.
    assert (table["max_abs_diff"] < 1e-4 + 1e-5 * table["reference_max_abs"]).all()
    assert (table["reference_max_abs"] > 0.5).all()
    assert table.loc[table.name == "hook_logits", "shape"].item() == (3, LENGTHS["above"], model.vocabulary_size)


def test_a_perturbed_weight_fails_from_its_site_on(checkpoint):
    """Negative control: change layer 1's value kernel only; everything
    before `blocks.1.attn.hook_v` still passes, that site and the logits fail."""
    _, directory = checkpoint
    model = Phi3Backbone.from_preset(str(directory))
    kernel = model.decoder.attention.value_kernel
    kernel.assign(kernel.value.at[1].multiply(1.1))
    ids = token_batch(LENGTHS["below"], seed=3)[0]
    table = phi3lab.compare_with_transformers(model, str(directory), ids, names=["blocks.*", "hook_logits"]).set_index(
        "name"
    )
    assert table.loc["blocks.1.attn.hook_k", "passed"] and table.loc["blocks.0.hook_resid_post", "passed"]
    assert not table.loc["blocks.1.attn.hook_v", "passed"] and not table.loc["hook_logits", "passed"]
    assert "hook_embed" not in table.index


def test_clear_errors(checkpoint, monkeypatch):
    reference, directory = checkpoint
    other = Phi3Backbone.from_preset(str(directory), load_weights=False, num_layers=1)
    with pytest.raises(ValueError, match="num_layers 2 .transformers. vs 1 .phi3lab."):
        phi3lab.compare_with_transformers(other, reference, np.zeros((1, 4), "int32"))
    with pytest.raises(ValueError, match="hf_model_or_dir"):
        phi3lab.compare_with_transformers(other, "/no/such/dir", np.zeros((1, 4), "int32"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"phi3lab\[oracle\]"):
        phi3lab.compare_with_transformers(other, reference, np.zeros((1, 4), "int32"))
