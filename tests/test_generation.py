"""Cached generation: token-for-token against transformers' `generate`,
cached logits against the uncached forward, sampling, hooks, traces, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MAX_POSITIONS, PRETRAINING, random_backbone, require_oracle

import phi3lab
from phi3lab.presets import save_hf_checkpoint

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
        ids[i, longest - len(row):], mask[i, longest - len(row):] = row, 1
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=0, eos_token_id=EOS,
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
    transformers = require_oracle("transformers")
    model = models(case)
    save_hf_checkpoint(model, tmp_path)
    reference = transformers.Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                             dtype="float32").eval()
    rows, max_new = PROMPTS[prompt]
    assert max(map(len, rows)) < PRETRAINING < max(map(len, rows)) + max_new <= MAX_POSITIONS
    expected = hf_generate(reference, rows, max_new)
    ours = phi3lab.generate(model, None, rows, max_new_tokens=max_new, stop=[EOS])
    for row, (theirs, g) in enumerate(zip(expected, ours)):
        assert g.new_token_ids.tolist() == truncate_at_stop(theirs), f"row {row}"
        assert g.token_ids[: g.prompt_length].tolist() == rows[row]
        assert g.finish_reason == ("stop" if EOS in theirs else "length")
