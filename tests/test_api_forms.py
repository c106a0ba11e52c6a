"""One API form everywhere: `model, inputs` first, settings by keyword, one
token-id rule. The forms before keep working for one release, with a
`DeprecationWarning` naming the new form, and give exactly what the new
form gives."""

from __future__ import annotations

import numpy as np
import pytest

import phi3lab
from conftest import VOCAB, random_backbone
from phi3lab import analysis
from phi3lab.deprecation import Phi3labDeprecationWarning, keyword_only_since
from phi3lab.widgets import LogitLensView

ANSWER, COUNTER = 5, 7


@pytest.fixture(scope="module")
def model():
    return random_backbone(seed=3, rope=None)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(2).integers(0, VOCAB, (2, 6)).astype(np.int32)


@pytest.fixture(scope="module")
def tr(model, ids):
    return phi3lab.trace(model, ids)


def test_keyword_only_since_moves_old_positional_settings():
    @keyword_only_since("b", "c")
    def f(x, *, b=1, c=2):
        return x, b, c

    assert f(0, c=5) == (0, 1, 5)
    with pytest.warns(
        Phi3labDeprecationWarning, match=r"passing b, c to f\(\) by position.*f\(\.\.\., b=\.\.\., c=\.\.\.\)"
    ):
        assert f(0, 3, 4) == (0, 3, 4)
    with pytest.warns(DeprecationWarning) as caught:
        f(0, 3)
    assert caught[0].filename == __file__  # points at the caller's line
    with pytest.raises(TypeError, match="at most 3 positional"):
        f(0, 1, 2, 3)
    with pytest.raises(TypeError, match="multiple values for 'b'"):
        f(0, 1, b=2)


def test_generate_takes_the_prompt_second(model, ids):
    new = phi3lab.generate(model, ids[0], max_new_tokens=3, stop=[])
    with pytest.warns(Phi3labDeprecationWarning, match=r"generate\(model, prompt, tokenizer=\.\.\.\)"):
        old = phi3lab.generate(model, None, ids[0], 3, stop=[])
    np.testing.assert_array_equal(old.token_ids, new.token_ids)
    with pytest.warns(Phi3labDeprecationWarning):
        named = phi3lab.generate(model, None, prompt=ids[0], max_new_tokens=3, stop=[])
    np.testing.assert_array_equal(named.token_ids, new.token_ids)


def test_analysis_settings_by_keyword(model, ids, tr):
    corrupted = ids[:, ::-1].copy()
    new = analysis.activation_patching(
        model, ids, corrupted, answer=ANSWER, counterfactual=COUNTER, sites="attn_out", progress=False
    )
    with pytest.warns(Phi3labDeprecationWarning, match=r"answer, counterfactual, sites, progress"):
        old = analysis.activation_patching(model, ids, corrupted, None, ANSWER, COUNTER, "attn_out", False)
    np.testing.assert_array_equal(old.values, new.values)
    new = analysis.attribution_patching(model, ids, corrupted, answer=ANSWER, sites="attn_out")
    with pytest.warns(Phi3labDeprecationWarning, match=r"attribution_patching\(\.\.\., answer=\.\.\., "):
        old = analysis.attribution_patching(model, ids, corrupted, None, ANSWER, None, "attn_out")
    np.testing.assert_array_equal(old.values, new.values)
    new = analysis.direct_logit_attribution(model, tr, ANSWER, COUNTER, position=-2, batch=1)
    with pytest.warns(Phi3labDeprecationWarning, match=r"position, batch"):
        old = analysis.direct_logit_attribution(model, tr, ANSWER, COUNTER, -2, 1)
    np.testing.assert_array_equal(old.attribution, new.attribution)
    new = analysis.logit_lens(model, tr, k=2, where="mid", batch=1)
    with pytest.warns(Phi3labDeprecationWarning, match=r"logit_lens\(\.\.\., k=\.\.\., where=\.\.\., batch=\.\.\.\)"):
        old = analysis.logit_lens(model, tr, 2, "mid", 1)
    assert old.equals(new)


def test_logit_lens_view_takes_the_model_first(model, ids, tr):
    new = LogitLensView(model, tr, k=2)
    with pytest.warns(Phi3labDeprecationWarning, match=r"LogitLensView\(model, trace, \.\.\.\)"):
        old = LogitLensView(tr, model, k=2)
    np.testing.assert_array_equal(old.top_ids, new.top_ids)
    g = phi3lab.generate(model, ids[0], max_new_tokens=2, stop=[], names="blocks.*.hook_resid_post")
    assert LogitLensView(model, g).length == 8  # what generate returns


def test_one_token_id_rule(model, ids, tr, shipped_tokenizer):
    """Every entry that takes token ids rejects the same bad id with the
    same message, naming its own argument."""
    tokenizer = shipped_tokenizer
    big = tokenizer.vocabulary_size
    calls = {
        "ids": lambda: phi3lab.trace(model, [[1, VOCAB]]),
        "token_ids": lambda: model({"token_ids": np.array([[1, VOCAB]])}),
        "answer": lambda: analysis.direct_logit_attribution(model, tr, VOCAB),
        "counterfactual": lambda: analysis.activation_patching(model, ids, ids, answer=1, counterfactual=VOCAB),
        "stop": lambda: phi3lab.generate(model, ids[0], max_new_tokens=1, stop=[VOCAB]),
        "bos_token": lambda: analysis.head_scores(model, seq_len=4, bos_token=VOCAB),
    }
    for name, call in calls.items():
        with pytest.raises(
            ValueError, match=rf"`{name}` must be token ids in \[0, {VOCAB}\).*out of range: \[{VOCAB}\]"
        ):
            call()
    with pytest.raises(ValueError, match=rf"`ids` must be token ids in \[0, {big}\).*out of range: \[{big}\]"):
        tokenizer.decode([1, big])
    for call in (lambda: analysis.direct_logit_attribution(model, tr, 2.0), lambda: tokenizer.decode([1.5])):
        with pytest.raises(TypeError, match=r"\(integer\).*dtype float"):
            call()
