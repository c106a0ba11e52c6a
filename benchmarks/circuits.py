"""Circuit discovery: EAP-IG over every edge against exact edge patching (run by hand).

    .venv/bin/python benchmarks/circuits.py [--length 64] [--batch 1] [--steps 16] [--sample 32]

Model: 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064, float32,
random weights (`_common.CONFIG`), level `"heads+mlps"` (157 senders, 445
receivers). The clean prompt is random; the corrupted one differs at a
quarter of its positions. Printed, each timed after a warm-up call that
compiles it, in one process:

* EAP-IG (`--steps`) over every edge: one `edge_attribution` call;
* exact edge patching, one edge at a time: the median time of one run of
  the compiled edge-patching program (`faithfulness`' program, the edge mask
  its data) over `--sample` random edges, times the number of edges (an
  estimate: patching every edge would take that long);
* their ratio, and the Spearman rank correlation between the EAP-IG scores
  and the exact effects (patched metric minus clean) of the sampled edges.

The attribution-graph benchmark is `benchmarks/attribution_graph.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pandas as pd
from _common import add_size_arguments, config_from_arguments, describe_sizes, machine, random_model

import phi3lab.circuits as C
from phi3lab.circuits.edge_patching import EdgePatcher
from phi3lab.circuits.inputs import prepare


def random_pair(length: int, batch: int, vocabulary: int):
    rng = np.random.default_rng(length)
    clean = rng.integers(3, vocabulary, (batch, length)).astype(np.int32)
    corrupted = clean.copy()
    changed = rng.choice(length - 1, length // 4, replace=False)
    corrupted[:, changed] = rng.integers(3, vocabulary, (batch, len(changed)))
    answer, counter = rng.integers(3, vocabulary, 2)
    return clean, corrupted, int(answer), int(counter)


def eap_ig_section(args) -> None:
    """EAP-IG over every edge against one-at-a-time exact edge patching."""
    model = random_model(config_from_arguments(args))
    clean, corrupted, answer, counter = random_pair(args.length, args.batch, args.vocabulary)
    kwargs = dict(answer=answer, counterfactual=counter, level=args.level)

    def attribute():
        return C.edge_attribution(model, clean, corrupted, method="eap-ig", steps=args.steps, **kwargs)

    start = time.perf_counter()
    attribute()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = attribute()
    eap_seconds = time.perf_counter() - start

    graph = scores.graph
    ids, bad, mask, metric = prepare(model, clean, corrupted, None, None, answer, counter)
    patcher = EdgePatcher(model, graph, ids, bad, mask, metric, "corrupted")
    keep = patcher.keep_all()
    clean_metric = patcher(keep)  # compiles
    rng = np.random.default_rng(0)
    sample = rng.choice(len(scores), args.sample, replace=False)
    effects, seconds = [], []
    for row in sample:
        edge = scores.edges.iloc[row]
        where = graph.senders.index(edge.sender), graph.receivers.index(edge.receiver)
        trial = keep.copy()
        trial[where] = False
        start = time.perf_counter()
        effects.append(patcher(trial) - clean_metric)
        seconds.append(time.perf_counter() - start)
    per_edge = statistics.median(seconds)
    exhaustive = per_edge * len(scores)
    rho = pd.Series(scores.edges.score.to_numpy()[sample]).corr(pd.Series(effects), method="spearman")

    print(f"level={args.level} edges={len(scores)} T={args.length} batch={args.batch} steps={args.steps}")
    print(f"{'':44}{'seconds':>12}")
    print(f"{'EAP-IG, every edge (compile, first call)':44}{compile_seconds:12.2f}")
    print(f"{'EAP-IG, every edge':44}{eap_seconds:12.2f}")
    print(f"{'edge patching, one edge (median)':44}{per_edge:12.4f}")
    print(f"{'edge patching, every edge (est.)':44}{exhaustive:12.1f}")
    print(f"{'ratio (patching every edge / EAP-IG)':44}{exhaustive / eap_seconds:12.1f}x")
    print(f"{f'Spearman rank correlation ({args.sample} edges)':44}{rho:12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--sample", type=int, default=32, help="edges patched exactly")
    parser.add_argument("--level", default="heads+mlps", choices=C.LEVELS)
    args = parser.parse_args()
    print(machine())
    print(describe_sizes(args))
    eap_ig_section(args)


if __name__ == "__main__":
    main()
