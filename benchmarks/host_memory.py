"""What keeping freed host memory (`PHI3LAB_HOST_MEMORY=reuse`) saves (run by hand).

    .venv/bin/python benchmarks/host_memory.py [--lengths 128 512] [--rounds 2] [--repeats 5]

The allocator settings bind a whole process before JAX starts, so the two
sides cannot share one process: each round starts one child process that
asks for phi3lab's settings with `PHI3LAB_HOST_MEMORY=reuse` (made first
thing at import, before any library starts threads) and one that keeps
glibc's defaults, in alternating order. Each child times the plain forward,
a full trace and a patterns-only trace of the 12-layer width-768 benchmark
model (random weights, float32, batch 1; median of `--repeats` calls after
two warm-up calls) and counts the minor page faults of a full trace.
Printed: the medians over rounds, each trace's ratio to its own process's
plain forward, and kept / default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import machine

CHILD = """
import json, resource, sys
sys.path.insert(0, {benchmarks!r})
import numpy as np
import jax
from jax import numpy as jnp
from _common import random_model, median_times
import phi3lab

model, length, repeats = random_model(), {length}, {repeats}
ids = np.random.default_rng(0).integers(0, model.vocabulary_size, (1, length))
params, token_ids, mask = model.params(), jnp.asarray(ids), jnp.ones((1, length), bool)
plain = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])
variants = {{
    "plain forward": lambda: plain(params, token_ids, mask).block_until_ready(),
    "trace: everything": lambda: phi3lab.trace(model, ids),
    "trace: everything, bf16 maps": lambda: phi3lab.trace(model, ids, capture_dtype="bfloat16"),
    "trace: patterns only": lambda: phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern"),
}}
times = median_times(variants, repeats)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
phi3lab.trace(model, ids)
times["full trace page faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps(times))
"""


def child(length: int, repeats: int, keep: bool) -> dict:
    env = dict(os.environ)
    env.pop("PHI3LAB_NO_HOST_MEMORY_REUSE", None)
    env.pop("PHI3LAB_HOST_MEMORY", None)
    if keep:
        env["PHI3LAB_HOST_MEMORY"] = "reuse"
    benchmarks = os.path.dirname(os.path.abspath(__file__))
    code = CHILD.format(benchmarks=benchmarks, length=length, repeats=repeats)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    for length in args.lengths:
        runs = {True: [], False: []}
        for round_ in range(args.rounds):
            for keep in (True, False) if round_ % 2 == 0 else (False, True):
                runs[keep].append(child(length, args.repeats, keep))
        medians = {keep: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for keep, rs in runs.items()}
        print(f"\nT={length}, batch 1: median of {args.rounds} processes per side, {args.repeats} calls each")
        print(f"{'variant':30s} {'kept ms':>9s} {'x fwd':>6s} {'default ms':>11s} {'x fwd':>6s} {'kept/default':>13s}")
        for name in medians[True]:
            kept, default = medians[True][name], medians[False][name]
            if name.endswith("page faults"):
                print(f"{name:30s} {kept:9.0f} {'':6s} {default:11.0f} {'':6s} {kept / max(default, 1):13.3f}")
                continue
            fwd_kept, fwd_default = medians[True]["plain forward"], medians[False]["plain forward"]
            print(
                f"{name:30s} {kept * 1e3:9.1f} {kept / fwd_kept:6.2f} {default * 1e3:11.1f} "
                f"{default / fwd_default:6.2f} {kept / default:13.2f}"
            )


if __name__ == "__main__":
    main()
