"""Time to first trace against depth: the scanned decoder compiles one block.

    .venv/bin/python benchmarks/compile.py

Builds models of 2, 8 and 32 layers (the tiny model's width), and for each
measures the first `trace` (compile + run) of everything and of patterns only,
then a second call (run only). Prints seconds and the ratio to 2 layers.
"""

import time

import numpy as np

import phi3lab
from phi3lab.tracing import compiled_count

WIDTH = dict(vocabulary_size=1024, hidden_dim=128, intermediate_dim=384, num_query_heads=4, num_key_value_heads=2)


def first_and_second(model, ids, names):
    start = time.perf_counter()
    phi3lab.trace(model, ids, names=names)
    first = time.perf_counter() - start
    start = time.perf_counter()
    phi3lab.trace(model, ids, names=names)
    return first, time.perf_counter() - start


def main():
    ids = np.random.default_rng(0).integers(0, 1024, (1, 128))
    rows = []
    for layers in (2, 8, 32):
        model = phi3lab.Phi3Backbone(num_layers=layers, **WIDTH)
        full = first_and_second(model, ids, None)
        patterns = first_and_second(model, ids, "blocks.*.attn.hook_pattern")
        plain = first_and_second(model, ids, ["hook_logits"])
        rows.append((layers, full, patterns, plain, compiled_count(model)))
    base = {name: rows[0][i][0] for i, name in ((1, "full"), (2, "patterns"), (3, "logits"))}
    print(f"{'layers':>6} | {'first full':>10} {'ratio':>6} | {'first patterns':>14} {'ratio':>6} | {'first logits':>12} {'ratio':>6} | {'2nd full':>8}")
    for layers, full, patterns, plain, _ in rows:
        print(f"{layers:>6} | {full[0]:>9.2f}s {full[0] / base['full']:>5.2f}x | {patterns[0]:>13.2f}s "
              f"{patterns[0] / base['patterns']:>5.2f}x | {plain[0]:>11.2f}s {plain[0] / base['logits']:>5.2f}x | {full[1]:>7.3f}s")


if __name__ == "__main__":
    main()
