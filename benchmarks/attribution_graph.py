"""Attribution graph of a 32-token prompt on the shipped model (run by hand).

    .venv/bin/python benchmarks/attribution_graph.py [--length 32] [--repeats 3] [--batch-sizes 64 128 256]

The shipped `phi3lab_tiny_en` (4 layers, width 128) and its four shipped
top-k transcoders (width 1024, k 16); the prompt is name-mover text cut to
its last `--length` tokens, the target its top token. Rows:

  first call       `phi3lab.circuits.attribution_graph` in a fresh process:
                   loading the transcoders, the clean trace, compiling the
                   trace and the effects program, every receiver batch,
                   pruning (so it includes compilation)
  max_feature_nodes  features visited by influence, `batch_size` at a time
                   (the influence is recomputed after each batch)
  cached           the same call again (median of `--repeats`), per
                   `batch_size` (receivers per compiled backward pass)

and the graph's size, the process's peak resident memory (`ru_maxrss`) and
XLA's memory analysis of one effects program (temporary and output bytes at
the default batch). On a shared machine the absolute times are noisy.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from _common import machine


def prompt_ids(tokenizer, length: int) -> np.ndarray:
    """The last `length` tokens of name-mover prompts (held-out names) run together."""
    from phi3lab import tasks

    text = ". ".join(p.text for p in tasks.name_mover_prompts(6, seed=3000, distractor_rate=0.5))
    ids = np.asarray(tokenizer.encode(text))
    if len(ids) < length:
        raise SystemExit(f"the prompt has only {len(ids)} tokens; ask for --length <= {len(ids)}")
    return ids[-length:]


def effects_memory(model) -> tuple[int, int]:
    """(temporary, output) bytes of the effects program used last (the
    cache is in order of use), from XLA's memory analysis of it, read when
    the run pipeline compiled it ahead of time."""
    from phi3lab.runtime import compile_cache

    programs = [p for k, p in compile_cache.entries(model).items() if k[0] == "attribution_graph.effects"]
    return programs[-1].temporary_bytes, programs[-1].output_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()

    import phi3lab
    import phi3lab.circuits as C

    model = phi3lab.Phi3Backbone.from_preset("phi3lab_tiny_en")
    tokenizer = phi3lab.Phi3Tokenizer.from_preset("phi3lab_tiny_en")
    ids = prompt_ids(tokenizer, args.length)
    run = lambda batch_size, **kw: C.attribution_graph(model, ids, "phi3lab_tiny_en", batch_size=batch_size, **kw)

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    graph = run(128, node_threshold=None)
    first = time.perf_counter() - start
    pruned = graph.prune()
    rows = [("first call (batch 128, compiles)", first)]
    for limit in (256, 1024):
        start = time.perf_counter()
        run(128, max_feature_nodes=limit)
        rows.append((f"max_feature_nodes={limit} (by influence)", time.perf_counter() - start))
    for batch_size in args.batch_sizes:
        run(batch_size)  # compiles this batch's shapes
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(batch_size)
            times.append(time.perf_counter() - start)
        rows.append((f"cached, batch {batch_size}", float(np.median(times))))
    run(128)
    temporary, output = effects_memory(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    kinds = graph.node_table["kind"].value_counts().to_dict()
    print(machine())
    print(f"shipped phi3lab_tiny_en + transcoder_0..3, T={len(ids)}, target = top token")
    print(
        f"graph: {kinds}, {np.count_nonzero(graph.adjacency):,} edges; pruned (0.8, 0.98): "
        f"{len(pruned.node_table)} nodes, {np.count_nonzero(pruned.adjacency):,} edges"
    )
    print(f"{'':36s}{'seconds':>10s}")
    for name, seconds in rows:
        print(f"{name:36s}{seconds:10.2f}")
    print(f"{'peak RSS (process)':36s}{peak / 2**20:9.0f} MiB ({baseline / 2**20:.0f} MiB before the first graph)")
    print(f"{'effects program, batch 128: temp':36s}{temporary / 2**20:9.1f} MiB (output {output / 2**10:.0f} KiB)")


if __name__ == "__main__":
    main()
