"""Evidence that the shipped `phi3lab_tiny_en` was really trained and that
the circuits its corpus was built for formed."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import phi3lab
import phi3lab.presets
from phi3lab import tasks

PRESET = "phi3lab_tiny_en"
HELD_OUT_PERIODS = (7, 13, 23)  # never trained on (scripts/train_tiny.py)


@pytest.fixture(scope="module")
def model():
    return phi3lab.Phi3Backbone.from_preset(PRESET)


@pytest.fixture(scope="module")
def tokenizer():
    return phi3lab.Phi3Tokenizer.from_preset(PRESET)


def token_losses(model, ids):
    tr = phi3lab.trace(model, ids, names=["hook_logits"])
    logits = tr.logits.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]


def test_shipped_preset_is_small_and_complete():
    directory = Path(phi3lab.presets.resolve_preset_dir(PRESET))
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    for name in ("config.json", "model.weights.h5", "assets/tokenizer/vocabulary.spm"):
        assert (directory / name).is_file()


def test_architecture_shows_su_switch_within_a_few_hundred_tokens(model):
    assert model.rope_scaling_type == "su"
    assert model.num_key_value_heads < model.num_query_heads
    assert model.pretraining_sequence_length < model.max_sequence_length <= 1024


def training_script():
    spec = importlib.util.spec_from_file_location(
        "train_tiny", Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_held_out_loss_beats_unigram_baseline(model, tokenizer):
    """Cross-entropy on documents from seeds never trained on, against a
    unigram model fitted on another large sample of the same generator."""
    script = training_script()
    fit = script.token_stream(tokenizer, script.documents(3000, seed=101))
    held_out = script.token_stream(tokenizer, script.documents(200, seed=202))
    counts = np.bincount(fit, minlength=model.vocabulary_size) + 1.0
    unigram = -np.mean(np.log(counts / counts.sum())[held_out[1:]])
    windows = np.stack([held_out[i:i + 129] for i in range(0, len(held_out) - 129, 129)][:16])
    model_loss = token_losses(model, windows).mean()
    assert model_loss < 0.6 * unigram, (model_loss, unigram)


def test_induction_on_unseen_periods(model, tokenizer):
    """Second copy of a random repeated sequence is predicted far better than
    the first, on periods the model never saw."""
    vocab = tokenizer.vocabulary_size - len(tokenizer.special_tokens) + 3
    for period in HELD_OUT_PERIODS:
        ids = tasks.repeated_tokens(vocab, period, batch=8, low=3, seed=period)
        losses = token_losses(model, ids)
        first = losses[:, : period - 1].mean()
        second = losses[:, period + 1:].mean()
        assert second < 0.5 * first, (period, first, second)


def test_detectors_find_induction_and_previous_token_heads(model):
    scores = phi3lab.analysis.head_scores(model, seq_len=20, num_sequences=8)
    assert scores.induction.max() > 0.4
    assert scores.previous_token.max() > 0.4
    best = scores.loc[scores.induction.idxmax()]
    previous = scores.loc[scores.previous_token.idxmax()]
    assert best.layer > previous.layer  # induction composes with an earlier previous-token head


def test_name_mover_on_held_out_names(model, tokenizer):
    prompts = tasks.name_mover_prompts(60, seed=11)
    correct = 0
    for prompt in prompts:
        ids = np.array([tokenizer.encode(prompt.text)])
        logits = phi3lab.trace(model, ids, names=["hook_logits"]).logits[0, -1]
        answer, other = tasks.name_token(tokenizer, prompt.answer), tasks.name_token(tokenizer, prompt.counterfactual)
        correct += logits[answer] > logits[other]
    assert correct / len(prompts) >= 0.8


def test_generate_completes_a_name_mover_prompt(model, tokenizer):
    text = str(phi3lab.generate(model, tokenizer, "When Mary and John went to the store, John gave a drink to", max_new_tokens=3))
    assert text.strip().startswith("Mary")
