"""Compile time: against depth, and cold vs warm on-disk cache in fresh processes.

    .venv/bin/python benchmarks/compile.py [--depth] [--disk] [--repeats 3]

`--depth` (default when no flag is given, with `--disk`): builds models of 2,
8 and 32 layers (the tiny model's width) and for each measures the first
`trace` (compile + run) of everything and of patterns only, then a second
call (run only); prints seconds and the ratio to 2 layers.

`--disk`: time to first trace in a fresh Python process (the shipped model,
one full trace of a 40-token prompt), with an empty on-disk compilation
cache ("cold") and then again with the cache the first process filled
("warm"); cold/warm pairs are interleaved, each pair with a new directory.
Prints the medians and warm / cold.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WIDTH = dict(vocabulary_size=1024, hidden_dim=128, intermediate_dim=384, num_query_heads=4, num_key_value_heads=2)

# Runs in the fresh process: seconds for import, model load, first trace.
CHILD = """
import json, time
start = time.perf_counter()
import numpy as np, phi3lab
imported = time.perf_counter()
model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
loaded = time.perf_counter()
phi3lab.trace(model, np.arange(40) % 1000)
done = time.perf_counter()
print(json.dumps({"import": imported - start, "load": loaded - imported, "first_trace": done - loaded,
                  "cache": str(phi3lab.runtime.disk_cache.default_directory())}))
"""


def first_and_second(model, ids, names):
    import phi3lab

    start = time.perf_counter()
    phi3lab.trace(model, ids, names=names)
    first = time.perf_counter() - start
    start = time.perf_counter()
    phi3lab.trace(model, ids, names=names)
    return first, time.perf_counter() - start


def depth():
    import phi3lab
    from phi3lab.tracing import compiled_count

    ids = np.random.default_rng(0).integers(0, 1024, (1, 128))
    rows = []
    for layers in (2, 8, 32):
        model = phi3lab.Phi3Backbone(num_layers=layers, **WIDTH)
        full = first_and_second(model, ids, None)
        patterns = first_and_second(model, ids, "blocks.*.attn.hook_pattern")
        plain = first_and_second(model, ids, ["hook_logits"])
        rows.append((layers, full, patterns, plain, compiled_count(model)))
    base = {name: rows[0][i][0] for i, name in ((1, "full"), (2, "patterns"), (3, "logits"))}
    print(
        f"{'layers':>6} | {'first full':>10} {'ratio':>6} | {'first patterns':>14} {'ratio':>6} | "
        f"{'first logits':>12} {'ratio':>6} | {'2nd full':>8}"
    )
    for layers, full, patterns, plain, _ in rows:
        print(
            f"{layers:>6} | {full[0]:>9.2f}s {full[0] / base['full']:>5.2f}x | {patterns[0]:>13.2f}s "
            f"{patterns[0] / base['patterns']:>5.2f}x | {plain[0]:>11.2f}s {plain[0] / base['logits']:>5.2f}x | "
            f"{full[1]:>7.3f}s"
        )


def fresh_process(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PHI3LAB_NO_DISK_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["PHI3LAB_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def disk(repeats: int):
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="phi3lab-bench-cache-") as directory:
            cold.append(fresh_process(directory))
            warm.append(fresh_process(directory))
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    print(
        f"fresh process, shipped model, full trace of 40 tokens; load average {os.getloadavg()[0]:.1f}; "
        f"{repeats} interleaved cold/warm pairs (medians)"
    )
    print(f"{'':>6} | {'import':>7} | {'load':>6} | {'first trace':>11}")
    for label, runs in (("cold", cold), ("warm", warm)):
        print(
            f"{label:>6} | {med(runs, 'import'):>6.2f}s | {med(runs, 'load'):>5.2f}s | "
            f"{med(runs, 'first_trace'):>10.2f}s"
        )
    ratio = med(warm, "first_trace") / med(cold, "first_trace")
    print(f"warm / cold time to first trace: {ratio:.2f} (target <= 0.33)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", action="store_true")
    parser.add_argument("--disk", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.depth or not args.disk:
        depth()
    if args.disk or not args.depth:
        disk(args.repeats)


if __name__ == "__main__":
    main()
