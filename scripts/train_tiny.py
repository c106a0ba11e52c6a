"""Train `phi3lab_tiny_en`, the small Phi-3 shipped in `phi3lab/assets/`.

One command from scratch, seeded and reproducible, CPU only:

    .venv/bin/python scripts/train_tiny.py

The corpus is generated here from `phi3lab.tasks`: repeated random word
sequences and repeated random token sequences with varied periods (held-out
periods are never trained on, so induction cannot be a fixed-offset
shortcut); name-mover sentences in both orders (the repeated name introduced
first or second), over several templates, with distractor sentences, using
training names and training templates only (held-out names appear only in
other sentences, the held-out template nowhere); short chat turns in Phi-3's
format; and simple sentences. A SentencePiece vocabulary is trained on the
same corpus. The model is phi3lab's own `Phi3Backbone`, trained with AdamW
written in JAX. Every `--eval-every` steps the script measures the
name-mover task (held-out names, each order) and induction (held-out
periods) and writes these curves to `training_report.json`.

The defaults are the recipe of the shipped weights: 8,000 steps (a
1,800-step copy stage on random token repeats, then the full mix), peak rate
1e-3, answer weight 8, half the documents name movers, 80 % of those with
random token ids for names, half the name-mover sentences opened by one to
three other words, seed 1; 24 minutes on two quiet cores. What the shipped
weights do, measured from the shipped files, is in docs/tiny_model.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from jax import numpy as jnp

import phi3lab
from phi3lab import tasks
from phi3lab.presets import save_preset
from phi3lab.presets.weights import set_params
from phi3lab.tokenization.tokenizer import Phi3Tokenizer
from phi3lab.tokenization.training import train_sentencepiece

HELD_OUT_PERIODS = (7, 13, 23)
TRAIN_PERIODS = tuple(p for p in range(3, 33) if p not in HELD_OUT_PERIODS)
CONFIG = {
    "num_layers": 4,
    "hidden_dim": 128,
    "intermediate_dim": 384,
    "num_query_heads": 4,
    "num_key_value_heads": 2,
    "layer_norm_epsilon": 1e-5,
    "max_sequence_length": 512,
    "pretraining_sequence_length": 128,
    "rope_max_wavelength": 10000,
    "rope_scaling_type": "su",
    "rope_scaling_short_factor": [round(1.0 + 0.05 * i / 15, 4) for i in range(16)],
    "rope_scaling_long_factor": [round(1.0 + 3.0 * (i / 15) ** 2, 4) for i in range(16)],
}


class TokenNames(str):
    """A name-mover document whose names `token_stream` replaces by random
    token ids (the same id for every occurrence of a name)."""


def documents(
    count: int,
    seed: int,
    name_mover_share: float = 0.45,
    filler_share: float = 0.0,
    held_out_in_chat: bool = False,
    token_share: float = 0.0,
    opener_share: float = 0.0,
) -> list[str]:
    """The training documents (chat turns formatted with Phi-3's template):
    `name_mover_share` of them name-mover sentences, the rest repeated words,
    chat turns and simple sentences in the proportions 30 : 13 : 12. In
    `filler_share` of the name-mover documents common words stand in for the
    names ("When river and candle went to the park, candle gave a drink to
    river."), so the task is solved for any token, not for a list of names.
    With `held_out_in_chat`, the chat turns (a person's favourite colour,
    the name copied from question to answer) draw on the held-out names too,
    so the model has learned to say them somewhere; they still never occur
    in a name-mover sentence. In `token_share` of the name-mover documents
    the names become random token ids (`TokenNames`), so the answer can be
    any token and only copying it predicts it. In `opener_share` of the
    name-mover sentences one to three words and a comma come first (other
    training names in `TokenNames` documents, so random tokens; otherwise
    common words), so a token that occurs once outside the two name slots
    is not the answer."""
    rng = np.random.default_rng(seed)
    docs = []
    names = tasks.TRAIN_NAMES
    rest = (1 - name_mover_share) / 0.55
    chat_names = names + tasks.HELD_OUT_NAMES if held_out_in_chat else names
    for index in range(count):
        kind = rng.random()
        if kind < 0.3 * rest:
            period = int(rng.choice(TRAIN_PERIODS))
            docs.append(tasks.repeated_words(period, int(rng.integers(2, 5)), seed=seed * 100003 + index))
        elif kind < 0.3 * rest + name_mover_share:
            as_tokens = rng.random() < token_share
            fillers = names if as_tokens or rng.random() >= filler_share else tasks.WORDS
            for prompt in tasks.name_mover_prompts(3, seed=seed * 7919 + index, names=fillers, distractor_rate=0.3):
                text = f"{prompt.text} {prompt.answer}."
                if rng.random() < opener_share:
                    taken = {prompt.answer, prompt.counterfactual, *prompt.text.split()}
                    free = [word for word in (names if as_tokens else tasks.WORDS) if word not in taken]
                    text = " ".join(rng.choice(free, int(rng.integers(1, 4)), replace=False)) + ", " + text
                docs.append(TokenNames(text) if as_tokens else text)
        elif kind < 0.43 * rest + name_mover_share:
            # Every name, held-out ones too, is copied here from the question
            # to the answer: a task other than the name mover's.
            conv = tasks.chat_turns(1, seed=seed * 31 + index, names=chat_names)[0]
            docs.append("".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in conv))
        else:
            words = rng.choice(tasks.WORDS, 6)
            # Held-out names appear here (so they are known tokens) but
            # never in a name-mover sentence.
            everyone = names + tasks.HELD_OUT_NAMES
            docs.append(
                f"The {words[0]} {words[1]} is near the {rng.choice(tasks.PLACES)}. "
                f"{rng.choice(everyone)} saw a {words[2]} {words[3]} and a {words[4]} {words[5]}."
            )
    return docs


def token_stream(tokenizer: Phi3Tokenizer, docs: list[str], random_repeats: int = 0, seed: int = 0) -> np.ndarray:
    """Documents as one id stream, `<|endoftext|>` between them, with
    `random_repeats` extra documents of random token ids repeated 2-3 times
    (any token, so induction is learned as copying, not as word knowledge)."""
    rng = np.random.default_rng(seed)
    plain = len(tokenizer.special_tokens) - 3  # the added specials follow the pieces
    names = [tasks.name_token(tokenizer, name) for name in tasks.TRAIN_NAMES]
    pool = random_name_pool(tokenizer)
    pieces = []
    for doc in docs:
        ids = tokenizer.encode(doc)
        if isinstance(doc, TokenNames):
            renamed = dict(zip(names, rng.choice(pool, len(names), replace=False).tolist()))
            ids = [renamed.get(i, i) for i in ids]
        pieces.append(ids)
    for _ in range(random_repeats):
        period = int(rng.choice(TRAIN_PERIODS))
        pieces.append(rng.integers(3, tokenizer.vocabulary_size - plain, period).tolist() * int(rng.integers(2, 5)))
    order = rng.permutation(len(pieces))
    ids = []
    for index in order:
        ids += pieces[index] + [tokenizer.pad_token_id]
    return np.asarray(ids, np.int32)


def random_name_pool(tokenizer: Phi3Tokenizer) -> np.ndarray:
    """The ids `TokenNames` documents draw names from: every plain token
    except those of the task's sentences (so a name never looks like the
    template) and of the held-out names (kept out of the task)."""
    words = [*tasks.HELD_OUT_NAMES, *tasks.PLACES, *tasks.OBJECTS, *tasks.VERBS]
    prompts = tasks.name_mover_prompts(200, seed=0, names=tasks.TRAIN_NAMES, distractor_rate=0.5)
    taken = {i for text in [*words, *(f"{p.text} {p.answer}." for p in prompts)] for i in tokenizer.encode(text)}
    taken -= {tasks.name_token(tokenizer, name) for name in tasks.TRAIN_NAMES}
    plain = tokenizer.vocabulary_size - len(tokenizer.special_tokens) + 3
    return np.array([i for i in range(3, plain) if i not in taken])


def batches(stream: np.ndarray, batch: int, length: int, rng, weights: np.ndarray | None = None):
    """`batch` random windows of `length + 1` ids (and of `weights`, when given)."""
    starts = rng.integers(0, len(stream) - length - 1, batch)
    windows = np.stack([stream[s : s + length + 1] for s in starts])
    if weights is None:
        return windows
    return windows, np.stack([weights[s : s + length + 1] for s in starts])


def answer_positions(tokenizer: Phi3Tokenizer, stream: np.ndarray) -> np.ndarray:
    """Where a name-mover sentence's answer sits in `stream`: the token
    between "▁to" and "." (every template ends "... to {answer}.", and no
    other document has "to" one token before a full stop)."""
    to, stop = tokenizer.encode("to")[-1], tokenizer.encode("a.")[-1]
    found = np.zeros(len(stream), bool)
    found[1:-1] = (stream[:-2] == to) & (stream[2:] == stop)
    return found


def probes(tokenizer: Phi3Tokenizer, count: int = 64) -> dict:
    """Fixed evaluation sets for the training curves: name-mover prompts on
    held-out names per order (training templates, then the held-out
    template) and random token repeats of held-out periods."""
    sets = {}
    for label, templates in (("", tasks.TEMPLATES), ("held_out_template_", tasks.HELD_OUT_TEMPLATES)):
        for order in tasks.ORDERS:
            prompts = tasks.name_mover_prompts(count, seed=999, templates=templates, orders=(order,))
            sets[label + order] = tasks.name_mover_batch(tokenizer, prompts)
    plain = tokenizer.vocabulary_size - len(tokenizer.special_tokens) + 3
    repeats = {
        period: tasks.repeated_tokens(plain, period, num_sequences=16, seed=period, low=3)
        for period in HELD_OUT_PERIODS
    }
    return {"name_mover": sets, "induction": repeats}


def evaluate(logits_fn, probe_sets: dict) -> dict:
    """Name-mover top-1 / beats-the-repeated-name accuracy per set (the
    padding sits on the right, after every prompt's last token), and the
    ratio of second-copy to first-copy loss on the held-out periods."""
    row = {}
    for label, batch in probe_sets["name_mover"].items():
        metrics = tasks.name_mover_metrics(logits_fn(jnp.asarray(batch.token_ids)), batch)
        row[f"{label}_top1"], row[f"{label}_beats"] = round(metrics["top1"], 3), round(metrics["beats"], 3)
    ratios = []
    for period, ids in probe_sets["induction"].items():
        logp = np.asarray(jax.nn.log_softmax(logits_fn(jnp.asarray(ids)).astype(jnp.float32)))
        losses = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
        ratios.append(losses[:, period + 1 :].mean() / losses[:, : period - 1].mean())
    row["induction_ratio"] = round(float(np.mean(ratios)), 3)
    return row


def train(
    steps: int,
    out: Path,
    seed: int = 0,
    init_from: Path | None = None,
    peak_lr: float = 2e-3,
    eval_every: int = 100,
    copy_steps: int = 0,
    name_mover_share: float = 0.45,
    answer_weight: float = 1.0,
    filler_share: float = 0.0,
    held_out_in_chat: bool = False,
    token_share: float = 0.0,
    opener_share: float = 0.0,
) -> dict:
    started, cpu_started = time.time(), time.process_time()
    docs = documents(40000, seed, name_mover_share, filler_share, held_out_in_chat, token_share, opener_share)
    if init_from is None:
        tokenizer = Phi3Tokenizer(train_sentencepiece(documents(40000, 0)[:20000], vocab_size=1000))
    else:
        tokenizer = Phi3Tokenizer.from_preset(init_from)
    vocabulary_size = int(math.ceil(tokenizer.vocabulary_size / 64) * 64)
    stream = token_stream(tokenizer, docs, random_repeats=40000, seed=seed)
    # The first `copy_steps` steps read random token repeats only, so the
    # copying (induction) circuit forms before the text competes with it.
    copy_stream = token_stream(tokenizer, [], random_repeats=40000, seed=seed + 3)
    # The name-mover answer is one token in ~20 of its sentence: weigh its loss up.
    weights = np.where(answer_positions(tokenizer, stream), answer_weight, 1.0).astype(np.float32)
    copy_weights = np.ones(len(copy_stream), np.float32)
    held_out = token_stream(tokenizer, documents(800, seed + 1))
    import keras

    keras.utils.set_random_seed(seed)
    if init_from is None:
        model = phi3lab.Phi3Backbone(vocabulary_size=vocabulary_size, **CONFIG)
    else:
        model = phi3lab.Phi3Backbone.from_preset(init_from)
    params = model.params()

    def logits_of(params, ids):
        hidden, _ = model.apply(params, ids)
        return model.unembed(params, hidden)

    def loss_fn(params, window, weight=None):
        logp = jax.nn.log_softmax(logits_of(params, window[:, :-1]).astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]
        if weight is None:
            return jnp.mean(nll)
        return jnp.sum(nll * weight[:, 1:]) / jnp.sum(weight[:, 1:])

    logits_jit = jax.jit(logits_of)
    probe_sets = probes(tokenizer)
    curve = []

    def schedule(step):
        warm = jnp.minimum(1.0, (step + 1) / 100)
        return peak_lr * warm * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * step / steps)))

    @jax.jit
    def update(params, moments, step, window, weight):
        loss, grads = jax.value_and_grad(loss_fn)(params, window, weight)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / (norm + 1e-6)), grads)
        m, v = moments
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.98 * v + 0.02 * g * g, v, grads)
        t = step + 1
        lr = schedule(step)

        def step_one(p, m, v):
            decay = 0.01 * p if p.ndim >= 2 else 0.0
            return p - lr * ((m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.98**t)) + 1e-8) + decay)

        params = jax.tree.map(step_one, params, m, v)
        return params, (m, v), loss

    moments = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params))
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        # Every fourth batch is longer than the pretraining window, so the
        # long rotary factors are trained too.
        length = 256 if step % 4 == 3 else 128
        source, source_weights = (copy_stream, copy_weights) if step < copy_steps else (stream, weights)
        window, weight = batches(source, 16 if length == 128 else 8, length, rng, source_weights)
        params, moments, loss = update(params, moments, jnp.float32(step), jnp.asarray(window), jnp.asarray(weight))
        losses.append(float(loss))  # the curve's loss is the mean since the previous row
        if step % eval_every == 0 or step == steps - 1:
            row = {
                "step": step,
                "loss": round(float(np.mean(losses)), 4),
                "seconds": round(time.time() - started, 1),
                "cpu_seconds": round(time.process_time() - cpu_started, 1),
                **evaluate(functools.partial(logits_jit, params), probe_sets),
            }
            losses = []
            curve.append(row)
            print(json.dumps(row), flush=True)
    set_params(model, params)

    eval_rng = np.random.default_rng(seed + 2)
    held = [float(loss_fn(params, jnp.asarray(batches(held_out, 16, 128, eval_rng)))) for _ in range(8)]
    counts = np.bincount(stream, minlength=vocabulary_size) + 1
    unigram = -float(np.mean(np.log(counts / counts.sum())[held_out[1:]]))
    out.mkdir(parents=True, exist_ok=True)
    save_preset(model, out)
    tokenizer.save_assets(out)
    (out / "tokenizer.json").write_text(
        json.dumps(
            {
                "module": "keras_hub.src.models.phi3.phi3_tokenizer",
                "class_name": "Phi3Tokenizer",
                "config": {
                    "name": "phi3_tokenizer",
                    "trainable": True,
                    "dtype": "int32",
                    "proto": None,
                    "sequence_length": None,
                    "add_bos": False,
                    "add_eos": False,
                },
                "registered_name": "keras_hub>Phi3Tokenizer",
            },
            indent=4,
        )
    )
    stages = []
    if init_from is not None and (Path(init_from) / "training_report.json").is_file():
        stages = json.loads((Path(init_from) / "training_report.json").read_text()).get("stages", [])
    stages.append(
        {
            "steps": steps,
            "seed": seed,
            "peak_lr": peak_lr,
            "copy_steps": copy_steps,
            "name_mover_share": name_mover_share,
            "answer_weight": answer_weight,
            "filler_share": filler_share,
            "held_out_in_chat": held_out_in_chat,
            "token_share": token_share,
            "opener_share": opener_share,
            "seconds": round(time.time() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started, 1),
            "init_from": None if init_from is None else "previous stage",
            "curve": curve,
        }
    )
    report = {
        "stages": stages,
        "total_steps": sum(stage["steps"] for stage in stages),
        "total_seconds": round(sum(stage["seconds"] for stage in stages), 1),
        "held_out_loss": round(float(np.mean(held)), 4),
        "unigram_loss": round(unigram, 4),
        "held_out_periods": list(HELD_OUT_PERIODS),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--peak-lr", type=float, default=1e-3)
    parser.add_argument("--copy-steps", type=int, default=1800, help="first steps on random token repeats only")
    parser.add_argument("--name-mover-share", type=float, default=0.5, help="share of name-mover documents")
    parser.add_argument("--answer-weight", type=float, default=8.0, help="loss weight of name-mover answers")
    parser.add_argument("--filler-share", type=float, default=0.5, help="name-mover documents with words as names")
    parser.add_argument("--token-share", type=float, default=0.8, help="name-mover documents with random token names")
    parser.add_argument("--opener-share", type=float, default=0.5, help="name-mover sentences with words in front")
    parser.add_argument("--held-out-in-chat", action="store_true", help="chat turns use the held-out names too")
    parser.add_argument("--init-from", type=Path, default=None, help="continue training this preset")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "phi3lab/assets/phi3lab_tiny_en"
    )
    args = parser.parse_args()
    train(
        args.steps,
        args.out,
        args.seed,
        args.init_from,
        args.peak_lr,
        args.eval_every,
        args.copy_steps,
        args.name_mover_share,
        args.answer_weight,
        args.filler_share,
        args.held_out_in_chat,
        args.token_share,
        args.opener_share,
    )
