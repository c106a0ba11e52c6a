"""Both attention paths of `Phi3Attention` against transformers' eager Phi-3.

The plain forward (no attention map captured) runs `fused_attention`
(`jax.nn.dot_product_attention`: cuDNN flash attention on GPUs, XLA here);
`use_fused_attention = False` forces the explicit scores -> softmax -> z of
`attend`. Each path is compared with the oracle on GQA, "su" scaling below and
above the pretraining window, a sliding window, and left/right padding.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import (
    LENGTHS,
    assert_matches_transformers,
    hf_config,
    hf_model,
    require,
    token_batch,
)
from phi3lab import Phi3Backbone

HF_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    require("transformers")
    reference = hf_model(hf_config("longrope", 2, sliding_window=4), seed=7)
    directory = tmp_path_factory.mktemp("hf_paths")
    reference.save_pretrained(directory)
    return reference, Phi3Backbone.from_preset(str(directory))


def run(model, ids, mask, fused: bool):
    model.decoder.attention.use_fused_attention = fused
    try:
        # A fresh jit per path: the flag is read while tracing.
        hidden = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])(model.params(), ids, mask)
        return np.asarray(hidden), np.asarray(model.unembed(model.params(), hidden))
    finally:
        model.decoder.attention.use_fused_attention = True


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("length", [LENGTHS["below"], LENGTHS["above"]])
def test_each_path_matches_transformers(pair, fused, length):
    reference, model = pair
    assert_matches_transformers(model, reference, [length], HF_TOLERANCE, lambda m, i, k: run(m, i, k, fused))


def test_paths_agree_everywhere_including_padding(pair):
    _, model = pair
    ids, mask = token_batch(LENGTHS["above"], seed=3, pad=5)
    fused, _ = run(model, ids, mask, True)
    explicit, _ = run(model, ids, mask, False)
    # Left-padded queries have no key to attend to: both paths give them the
    # same (zero-attention) output, so even padded positions agree.
    np.testing.assert_allclose(fused, explicit, atol=1e-5)
