"""Attribution patching next to activation patching (run by hand).

    .venv/bin/python benchmarks/attribution.py [--lengths 64 256] [--sites head_z resid_pre] [--shipped]
        [--methods linear integrated]

Model: 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064, float32,
batch 1, random weights (the configuration of `benchmarks/trace.py`); with
`--shipped`, also the shipped `phi3lab_tiny_en` on a name-mover prompt.
For each length and site: `activation_patching` (one patched forward per
layer x unit, vmapped in chunks) and `attribution_patching` (linear: two
forwards and one backward for all units; integrated: `steps` of them per
layer), each timed after a warm-up call
that compiles it, in the same process. Printed: both times, the ratio and
the Pearson correlation of the two `[layers, units]` maps.

Sites with more units than `--sample` (the head x position site
`head_z_position` has layers x T x heads: 9,216 at T=64) time activation
patching on a random sample of that many units, through the same compiled
sweep, and print its time for every unit as the measured time per patched
run times the number of units (marked "est."); the correlation is then over
the sampled units.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import CONFIG, random_model

import phi3lab
from phi3lab import analysis, tasks
from phi3lab.analysis.patching import _sweep


def random_pair(length: int):
    rng = np.random.default_rng(length)
    clean = rng.integers(3, CONFIG["vocabulary_size"], (1, length)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[0, length // 3] = (corrupted[0, length // 3] + 17) % CONFIG["vocabulary_size"]
    return clean, corrupted, int(clean[0, length // 3]), int(corrupted[0, length // 3])


def name_mover_pair():
    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tokenizer = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    prompt = tasks.name_mover_prompts(1, seed=5)[0]
    clean = np.array([tokenizer.encode(prompt.text)])
    corrupted = np.array([tokenizer.encode(prompt.subject_flipped())])
    answer, counter = (tasks.name_token(tokenizer, name) for name in (prompt.answer, prompt.counterfactual))
    return model, clean, corrupted, answer, counter


def timed(fn):
    fn()  # compiles
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def sampled_patching(model, clean, corrupted, answer, counter, site, batch_size, sample):
    """Activation patching of `sample` random units: (seconds for all units,
    estimated from the time per patched run; flat indices; normalized values)."""
    sweep = _sweep(model, clean, corrupted, None, answer, counter, site, None, batch_size)
    shape = (model.num_layers, *sweep.units())
    picked = np.sort(np.random.default_rng(0).choice(int(np.prod(shape)), sample, replace=False))
    masks = np.zeros((sample + 2, int(np.prod(shape))), bool)
    masks[np.arange(sample) + 2, picked] = True
    ids = np.repeat(sweep.corrupted_ids[None], sample + 2, axis=0)
    ids[0] = sweep.clean_ids
    run = lambda: sweep.run(ids, masks.reshape(sample + 2, *shape))
    seconds, values = timed(run)
    normalized = (values[2:] - values[1]) / (values[0] - values[1])
    return seconds / (sample + 2) * np.prod(shape), picked, normalized


def compare(label, model, clean, corrupted, answer, counter, site, batch_size, sample, method="linear"):
    kwargs = {"answer": answer, "counterfactual": counter, "sites": site}
    fast_s, fast = timed(lambda: analysis.attribution_patching(model, clean, corrupted, method=method, **kwargs))
    units = fast.values.size
    if units > sample:
        exact_s, picked, exact = sampled_patching(model, clean, corrupted, answer, counter, site, batch_size, sample)
        r = float(np.corrcoef(exact, fast.values.ravel()[picked])[0, 1])
        shown = f"{exact_s:.0f} (est. from {sample} units)"
    else:
        exact_s, result = timed(
            lambda: analysis.activation_patching(
                model, clean, corrupted, progress=False, batch_size=batch_size, **kwargs
            )
        )
        r = float(np.corrcoef(result.values.ravel(), fast.values.ravel())[0, 1])
        shown = f"{exact_s:.2f}"
    print(
        f"| {label} | {site} ({units} units) | {method} | {shown} | {fast_s:.3f} | {exact_s / fast_s:.1f}x | {r:.3f} |",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="*", default=[64, 256])
    parser.add_argument("--sites", nargs="+", default=["head_z", "resid_pre"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sample", type=int, default=512, help="units timed when a site has more")
    parser.add_argument("--shipped", action="store_true")
    parser.add_argument("--methods", nargs="+", default=["linear"], choices=["linear", "integrated"])
    args = parser.parse_args()
    print("| model | site | method | activation patching s | attribution patching s | ratio | Pearson |")
    print("|---|---|---|---|---|---|---|")
    if args.shipped:
        model, clean, corrupted, answer, counter = name_mover_pair()
        label = f"phi3lab_tiny_en T={clean.shape[1]}"
        for site in args.sites:
            for method in args.methods:
                compare(label, model, clean, corrupted, answer, counter, site, args.batch_size, args.sample, method)
    model = random_model()
    for length in args.lengths:
        clean, corrupted, answer, counter = random_pair(length)
        label = f"12x768 T={length}"
        for site in args.sites:
            for method in args.methods:
                compare(label, model, clean, corrupted, answer, counter, site, args.batch_size, args.sample, method)


if __name__ == "__main__":
    main()
