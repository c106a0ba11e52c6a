"""Attribution patching next to activation patching (run by hand).

    .venv/bin/python benchmarks/attribution.py [--lengths 64 256] [--sites head_z resid_pre] [--shipped]

Model: 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064, float32,
batch 1, random weights (the configuration of `benchmarks/trace.py`); with
`--shipped`, also the shipped `phi3lab_tiny_en` on a name-mover prompt.
For each length and site: `activation_patching` (one patched forward per
layer x unit, vmapped in chunks) and `attribution_patching` (linear: two
forwards and one backward for all units), each timed after a warm-up call
that compiles it, in the same process. Printed: both times, the ratio and
the Pearson correlation of the two `[layers, units]` maps.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import CONFIG, random_model

import phi3lab
from phi3lab import analysis, tasks


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
    a, b = prompt.answer, prompt.counterfactual
    swapped = prompt.text.replace(a, "@").replace(b, a).replace("@", b)
    clean, corrupted = np.array([tokenizer.encode(prompt.text)]), np.array([tokenizer.encode(swapped)])
    return model, clean, corrupted, tasks.name_token(tokenizer, a), tasks.name_token(tokenizer, b)


def timed(fn):
    fn()  # compiles
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(label, model, clean, corrupted, answer, counter, site, batch_size):
    kwargs = {"answer": answer, "counterfactual": counter, "sites": site}
    exact_s, exact = timed(
        lambda: analysis.activation_patching(model, clean, corrupted, progress=False, batch_size=batch_size, **kwargs)
    )
    fast_s, fast = timed(lambda: analysis.attribution_patching(model, clean, corrupted, **kwargs))
    r = float(np.corrcoef(exact.values.ravel(), fast.values.ravel())[0, 1])
    units = exact.values.size
    print(
        f"| {label} | {site} ({units} units) | {exact_s:.2f} | {fast_s:.3f} | {exact_s / fast_s:.1f}x | {r:.3f} |",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sites", nargs="+", default=["head_z", "resid_pre"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shipped", action="store_true")
    args = parser.parse_args()
    print("| model | site | activation patching s | attribution patching s | ratio | Pearson |")
    print("|---|---|---|---|---|---|")
    if args.shipped:
        model, clean, corrupted, answer, counter = name_mover_pair()
        for site in args.sites:
            compare(
                f"phi3lab_tiny_en T={clean.shape[1]}", model, clean, corrupted, answer, counter, site, args.batch_size
            )
    model = random_model()
    for length in args.lengths:
        clean, corrupted, answer, counter = random_pair(length)
        for site in args.sites:
            compare(f"12x768 T={length}", model, clean, corrupted, answer, counter, site, args.batch_size)


if __name__ == "__main__":
    main()
