"""Evidence, measured on the shipped files, that `phi3lab_tiny_en` was really
trained and holds the circuits its corpus was built for: induction, and a
name-mover (IOI) circuit that finds the name said once in both name orders.

The criteria are the acceptance bar of issue 13; the circuit tests assert
what docs/tiny_model.md says each head does."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

import phi3lab
import phi3lab.presets
from phi3lab import tasks

PRESET = "phi3lab_tiny_en"
HELD_OUT_PERIODS = (7, 13, 23)  # never trained on (scripts/train_tiny.py)


@pytest.fixture(scope="module")
def scores(shipped_model):
    """The head detectors' scores on 8 random sequences of 20 tokens."""
    return phi3lab.analysis.head_scores(shipped_model, seq_len=20, num_sequences=8)


def token_losses(model, ids):
    tr = phi3lab.trace(model, ids, names=["hook_logits"])
    logits = tr.logits.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]


def run(model, batch, hooks=None, corrupted_batch=None):
    ids = batch.token_ids if corrupted_batch is None else corrupted_batch.token_ids
    tr = phi3lab.trace(model, ids, padding_mask=batch.padding_mask, names=["hook_logits"], hooks=hooks)
    return tasks.name_mover_metrics(tr.logits, batch)


def prompts(count, seed, **kwargs):
    return tasks.name_mover_prompts(count, seed=seed, names=tasks.HELD_OUT_NAMES, **kwargs)


def test_shipped_preset_is_small_and_complete():
    directory = Path(phi3lab.presets.resolve_preset_dir(PRESET))
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    for name in ("config.json", "model.weights.h5", "assets/tokenizer/vocabulary.spm"):
        assert (directory / name).is_file()


def test_architecture_shows_su_switch_within_a_few_hundred_tokens(shipped_model):
    assert shipped_model.rope_scaling_type == "su"
    assert shipped_model.num_key_value_heads < shipped_model.num_query_heads
    assert shipped_model.pretraining_sequence_length < shipped_model.max_sequence_length <= 1024


def training_script():
    spec = importlib.util.spec_from_file_location(
        "train_tiny", Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def template_pattern(template):
    fields = {name: rf"(?P<{name}>\w+)" for name in ("a", "b", "s", "place", "verb", "obj")}
    return re.compile(re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**fields))


def test_held_out_names_and_template_never_occur_in_a_training_name_mover_sentence():
    docs = training_script().documents(4000, seed=0)
    trained = [template_pattern(t) for t in tasks.TEMPLATES]
    held_out = [template_pattern(t) for t in tasks.HELD_OUT_TEMPLATES]
    task_docs = [doc for doc in docs if any(p.search(doc) for p in trained)]
    assert len(task_docs) > 500
    assert not [doc for doc in docs if any(p.search(doc) for p in held_out)]
    named = {name for doc in task_docs for name in re.findall(r"\w+", doc)}
    assert not named & set(tasks.HELD_OUT_NAMES)
    # ...while the held-out names are known tokens from other sentences.
    assert all(any(f" {name} " in doc for doc in docs) for name in tasks.HELD_OUT_NAMES)
    # Both orders are trained, in about equal measure.
    found = [match for doc in task_docs for match in (p.search(doc) for p in trained) if match]
    assert 0.4 < np.mean([match["s"] == match["a"] for match in found]) < 0.6


def test_held_out_loss_beats_unigram_baseline(shipped_model, shipped_tokenizer):
    """Cross-entropy on documents from seeds never trained on, against a
    unigram model fitted on another large sample of the same generator."""
    script = training_script()
    fit = script.token_stream(shipped_tokenizer, script.documents(3000, seed=101))
    held_out = script.token_stream(shipped_tokenizer, script.documents(200, seed=202))
    counts = np.bincount(fit, minlength=shipped_model.vocabulary_size) + 1.0
    unigram = -np.mean(np.log(counts / counts.sum())[held_out[1:]])
    windows = np.stack([held_out[i : i + 129] for i in range(0, len(held_out) - 129, 129)][:16])
    model_loss = token_losses(shipped_model, windows).mean()
    assert model_loss < 0.6 * unigram, (model_loss, unigram)


def induction_ratios(model, tokenizer) -> dict[int, float]:
    """Second-copy over first-copy loss of random token sequences repeated
    twice, on periods the model never saw."""
    vocab = tokenizer.vocabulary_size - len(tokenizer.special_tokens) + 3
    ratios = {}
    for period in HELD_OUT_PERIODS:
        losses = token_losses(model, tasks.repeated_tokens(vocab, period, num_sequences=8, seed=period, low=3))
        ratios[period] = losses[:, period + 1 :].mean() / losses[:, : period - 1].mean()
    return ratios


def test_induction_on_unseen_periods(shipped_model, shipped_tokenizer):
    """The second copy of a random token sequence is predicted far better
    than the first, at periods never trained on."""
    ratios = induction_ratios(shipped_model, shipped_tokenizer)
    assert all(ratio < 0.3 for ratio in ratios.values()), ratios


def test_detectors_find_induction_above_a_previous_token_head(scores):
    best = scores.loc[scores.induction.idxmax()]
    previous = scores.loc[scores.previous_token.idxmax()]
    assert best.induction >= 0.8, best
    assert previous.previous_token >= 0.8, previous
    assert best.layer > previous.layer  # induction composes with an earlier previous-token head


@pytest.mark.parametrize("order", tasks.ORDERS)
def test_name_mover_on_held_out_names_in_each_order(shipped_model, shipped_tokenizer, order):
    metrics = run(shipped_model, tasks.name_mover_batch(shipped_tokenizer, prompts(80, seed=11, orders=(order,))))
    assert metrics["top1"] >= 0.8, metrics
    assert metrics["beats"] >= 0.95, metrics


def test_no_positional_shortcut(shipped_model, shipped_tokenizer):
    """The same accuracy whichever name is repeated: a model that says the
    first (or the last) name would be right in one order only. (A model
    near 0 top-1 in both orders has no gap in top-1, so the gap is also
    measured on "beats the repeated name".)"""
    metrics = [
        run(shipped_model, tasks.name_mover_batch(shipped_tokenizer, prompts(80, seed=11, orders=(order,))))
        for order in tasks.ORDERS
    ]
    for key in ("top1", "beats"):
        assert abs(metrics[0][key] - metrics[1][key]) <= 0.10, (key, metrics)


def test_name_mover_on_held_out_template_and_names(shipped_model, shipped_tokenizer):
    for order in tasks.ORDERS:
        batch = tasks.name_mover_batch(
            shipped_tokenizer, prompts(80, seed=12, templates=tasks.HELD_OUT_TEMPLATES, orders=(order,))
        )
        metrics = run(shipped_model, batch)
        assert metrics["beats"] >= 0.85, (order, metrics)


def test_name_mover_with_distractor_names(shipped_model, shipped_tokenizer):
    """A third name said twice in front: the answer is still the name said once."""
    names = tasks.HELD_OUT_NAMES
    batch = tasks.name_mover_batch(
        shipped_tokenizer, tasks.name_mover_prompts(80, seed=13, names=names, distractor_rate=1.0)
    )
    assert run(shipped_model, batch)["beats"] >= 0.85


@pytest.mark.parametrize(
    "text",
    [
        "When Mary and John went to the store, John gave a drink to",
        "When John and Mary went to the store, John gave a drink to",
    ],
)
def test_generate_completes_a_name_mover_prompt_in_either_order(shipped_model, shipped_tokenizer, text):
    assert (
        str(phi3lab.generate(shipped_model, text, tokenizer=shipped_tokenizer, max_new_tokens=3))
        .strip()
        .startswith("Mary")
    )


# The circuit docs/tiny_model.md names (found with 04_activation_patching.ipynb
# and 08_attribution_and_paths.ipynb): the name movers, which copy the answer
# to the last position (and are the induction heads too)...
NAME_MOVERS = {(3, 2), (3, 3)}
# ...the layer-0 head that attends each token to itself (the movers' values
# read the names' identity from it)...
TOKEN_HEAD = (0, 1)
# ...the duplicate-token heads (S2 attends S1)...
DUPLICATE_HEADS = {(1, 0), (1, 3)}
# ...and the S-inhibition head: the last position attends S2 and tells the
# movers' queries which name not to copy.
INHIBITION_HEAD = (2, 2)
# Under a name swap, which keeps S2 the repeated name, the inhibition head's
# output is unchanged, so these are the heads that carry the swap.
CIRCUIT = NAME_MOVERS | DUPLICATE_HEADS | {TOKEN_HEAD}


def end_attention(model, tokenizer, order):
    """Per prompt and head `[N, L, H]`: the last token's attention to the
    answer and to the repeated name's first mention, held-out names, one
    order."""
    batch = tasks.name_mover_batch(tokenizer, prompts(64, seed=14, orders=(order,)))
    tr = phi3lab.trace(model, batch.token_ids, padding_mask=batch.padding_mask, names="blocks.*.attn.hook_pattern")
    rows = np.arange(len(batch.last))
    answer = np.array([np.flatnonzero(row == a)[0] for row, a in zip(batch.token_ids, batch.answer)])
    repeated = np.array([np.flatnonzero(row == s)[0] for row, s in zip(batch.token_ids, batch.counterfactual)])
    patterns = [np.asarray(tr.attention(layer))[rows, :, batch.last] for layer in range(model.num_layers)]
    return (
        np.stack([p[rows, :, answer] for p in patterns], axis=1),
        np.stack([p[rows, :, repeated] for p in patterns], axis=1),
    )


@pytest.mark.parametrize("order", tasks.ORDERS)
def test_name_movers_look_at_the_answer_in_either_order(shipped_model, shipped_tokenizer, order):
    to_answer, to_repeated = end_attention(shipped_model, shipped_tokenizer, order)
    for layer, head in NAME_MOVERS:
        assert to_answer[:, layer, head].mean() > 0.5, (layer, head, order)
        assert to_repeated[:, layer, head].mean() < 0.2, (layer, head, order)


def corrupted_pairs(tokenizer, kind):
    """Held-out prompts (both orders) and their corruptions: `"swap"` swaps
    the two names, `"flip"` turns S2 into the answer's name."""
    pairs = prompts(64, seed=21)
    clean = tasks.name_mover_batch(tokenizer, pairs)
    token_ids = tasks.name_mover_batch(tokenizer, pairs, corrupted=kind).token_ids
    assert token_ids.shape == clean.token_ids.shape
    return clean, token_ids


def logit_difference(clean):
    return dict(answer=clean.answer, counterfactual=clean.counterfactual, padding_mask=clean.padding_mask)


def test_patching_the_circuit_restores_the_logit_difference(shipped_model, shipped_tokenizer):
    """The named heads together carry the name swap; every other head alone
    carries almost none of it."""
    clean, corrupted = corrupted_pairs(shipped_tokenizer, "swap")
    metric = logit_difference(clean)
    together = phi3lab.analysis.path_patching(
        shipped_model, clean.token_ids, corrupted, CIRCUIT, ["resid_final"], freeze=False, **metric
    )
    assert together.value >= 0.7, together
    alone = phi3lab.analysis.activation_patching(
        shipped_model, clean.token_ids, corrupted, sites="head_z", progress=False, **metric
    ).values
    others = [
        alone[layer, head]
        for layer in range(shipped_model.num_layers)
        for head in range(shipped_model.num_query_heads)
        if (layer, head) not in CIRCUIT
    ]
    assert max(np.abs(others)) <= 0.1, others


def mover_inputs(model, part):
    """Path-patching receivers: the name movers' queries, or the key/value
    head they share."""
    if part == "q":
        return [(layer, head, "q") for layer, head in sorted(NAME_MOVERS)]
    return sorted({(layer, phi3lab.hooks.key_value_head_of(model, head), part) for layer, head in NAME_MOVERS})


def test_the_movers_copy_the_names_from_the_token_head(shipped_model, shipped_tokenizer, scores):
    """The token head attends each position to itself, and its output,
    read through the movers' values only, carries the name swap."""
    clean, corrupted = corrupted_pairs(shipped_tokenizer, "swap")
    tr = phi3lab.trace(
        shipped_model, clean.token_ids, padding_mask=clean.padding_mask, names="blocks.0.attn.hook_pattern"
    )
    pattern = np.asarray(tr.attention(TOKEN_HEAD[0]))[:, TOKEN_HEAD[1]]
    assert np.diagonal(pattern, axis1=1, axis2=2)[:, 1:12].mean() > 0.9
    assert scores.set_index(["layer", "head"]).loc[TOKEN_HEAD].previous_token < 0.1
    through_values = phi3lab.analysis.path_patching(
        shipped_model,
        clean.token_ids,
        corrupted,
        [TOKEN_HEAD],
        mover_inputs(shipped_model, "v"),
        **logit_difference(clean),
    )
    assert through_values.value >= 0.7, through_values


def test_duplicate_token_heads_find_the_repeated_name(shipped_model, shipped_tokenizer, scores):
    best = scores.loc[scores.duplicate_token.idxmax()]
    assert (int(best["layer"]), int(best["head"])) in DUPLICATE_HEADS and best.duplicate_token >= 0.8, best
    batch = tasks.name_mover_batch(shipped_tokenizer, prompts(64, seed=14))
    tr = phi3lab.trace(
        shipped_model, batch.token_ids, padding_mask=batch.padding_mask, names="blocks.1.attn.hook_pattern"
    )
    first, second = (
        np.array([np.flatnonzero(row == s)[k] for row, s in zip(batch.token_ids, batch.counterfactual)])
        for k in (0, -1)
    )
    rows = np.arange(len(first))
    layer, head = int(best["layer"]), int(best["head"])
    assert np.asarray(tr.attention(layer))[rows, head, second, first].mean() > 0.5


@pytest.mark.parametrize("order", tasks.ORDERS)
def test_the_inhibition_head_attends_the_second_mention_of_the_subject(shipped_model, shipped_tokenizer, order):
    batch = tasks.name_mover_batch(shipped_tokenizer, prompts(64, seed=14, orders=(order,)))
    layer, head = INHIBITION_HEAD
    tr = phi3lab.trace(
        shipped_model, batch.token_ids, padding_mask=batch.padding_mask, names=f"blocks.{layer}.attn.hook_pattern"
    )
    second = np.array([np.flatnonzero(row == s)[-1] for row, s in zip(batch.token_ids, batch.counterfactual)])
    rows = np.arange(len(second))
    assert np.asarray(tr.attention(layer))[rows, head, batch.last, second].mean() > 0.5


def test_the_inhibition_head_steers_the_movers_queries(shipped_model, shipped_tokenizer):
    """Flipping S2 changes which name is repeated; the inhibition head's
    output, read through the movers' queries only, carries most of it, and
    ablating the head breaks the task."""
    clean, corrupted = corrupted_pairs(shipped_tokenizer, "flip")
    metric = logit_difference(clean)
    through_queries = phi3lab.analysis.path_patching(
        shipped_model, clean.token_ids, corrupted, [INHIBITION_HEAD], mover_inputs(shipped_model, "q"), **metric
    )
    assert through_queries.value >= 0.5, through_queries
    before = run(shipped_model, clean)["top1"]
    after = run(shipped_model, clean, hooks=phi3lab.hooks.ablate_heads([INHIBITION_HEAD], mode="mean"))["top1"]
    assert before - after >= 0.3, (before, after)


def test_the_duplicate_token_head_reaches_the_inhibition_head_through_mlp_1(shipped_model, shipped_tokenizer):
    """Under the subject flip the duplicate-token head's effect runs through
    MLP 1 into the inhibition head's values, and from there to the movers'
    queries; it reaches none of them directly."""
    clean, corrupted = corrupted_pairs(shipped_tokenizer, "flip")
    metric = logit_difference(clean)
    duplicate = [min(DUPLICATE_HEADS)]
    layer, head = INHIBITION_HEAD
    inhibition_values = [(layer, phi3lab.hooks.key_value_head_of(shipped_model, head), "v")]

    def through(receivers, freeze):
        return phi3lab.analysis.path_patching(
            shipped_model, clean.token_ids, corrupted, duplicate, receivers, freeze=freeze, **metric
        ).value

    assert through([(1, "mlp")], freeze=True) >= 0.4
    assert through(inhibition_values, freeze=False) >= 0.4
    assert through(mover_inputs(shipped_model, "q"), freeze=False) >= 0.4
    for receivers in (inhibition_values, mover_inputs(shipped_model, "q"), mover_inputs(shipped_model, "v")):
        assert abs(through(receivers, freeze=True)) < 0.1, receivers


def test_ablating_the_name_movers_drops_accuracy(shipped_model, shipped_tokenizer):
    clean, _ = corrupted_pairs(shipped_tokenizer, "swap")
    before = run(shipped_model, clean)["top1"]
    after = run(shipped_model, clean, hooks=phi3lab.hooks.ablate_heads(NAME_MOVERS, mode="mean"))["top1"]
    assert before - after >= 0.3, (before, after)


def test_name_mover_prompts_refuse_bad_arguments():
    with pytest.raises(ValueError, match="orders"):
        tasks.name_mover_prompts(2, orders=("ABAB",))
    with pytest.raises(ValueError, match="names"):
        tasks.name_mover_prompts(2, names=("Mary", "John"), distractor_rate=0.5)
    with pytest.raises(ValueError, match="corrupted"):
        tasks.name_mover_batch(None, tasks.name_mover_prompts(2), corrupted="shuffle")


def test_subject_flipped_prompt_changes_only_the_second_mention_of_the_subject():
    for prompt in tasks.name_mover_prompts(40, seed=5, distractor_rate=0.5):
        clean, flipped = prompt.text.split(" "), prompt.subject_flipped().split(" ")
        changed = [i for i, (a, b) in enumerate(zip(clean, flipped)) if a != b]
        assert len(clean) == len(flipped) and len(changed) == 1, (prompt.text, prompt.subject_flipped())
        mentions = [i for i, word in enumerate(clean) if word.rstrip(".,") == prompt.counterfactual]
        assert changed == [mentions[-1]] and len(mentions) >= 2
        assert flipped[changed[0]].rstrip(".,") == prompt.answer


def test_corrupted_prompt_swaps_the_two_names():
    prompt = tasks.name_mover_prompts(1, names=("Mary", "John"), templates=tasks.TEMPLATES[:1], orders=("BABA",))[0]
    swapped = tasks.NameMoverPrompt(prompt.corrupted(), prompt.counterfactual, prompt.answer)
    assert swapped.corrupted() == prompt.text
    assert prompt.text.split(" ")[1] == prompt.counterfactual  # BABA: the repeated name comes first
    assert prompt.corrupted().split(" ")[1] == prompt.answer
