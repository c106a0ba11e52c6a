"""Sparse dictionaries: training throughput and the cost of splicing (run by hand).

    .venv/bin/python benchmarks/features.py [--d-in 768] [--width 4096] [--k 32] [--batch 1024] [--steps 20]

Rows (ratios measured side by side in one process; on a shared machine the
absolute times are noisy):

  training step    tokens/s of `phi3lab.features.train` on in-memory
                   activations (top-k, AuxK, Adam; the step compiled once)
                   next to SAELens' `TopKTrainingSAE.training_forward_pass`
                   + backward + `torch.optim.Adam` on the same activations,
                   same width and k, the same dead-feature window (so AuxK
                   runs alike), torch using as many threads as XLA has
                   CPUs. phi3lab's rate is the difference of two runs of
                   different lengths, so compilation is excluded.
  streaming        training tokens/s when the activations are computed by
                   the benchmark model as training goes (`data` = token ids)
                   next to the plain batched forward's tokens/s at the same
                   batch of sequences.
  spliced trace    `trace(model, ids, names=site, hooks=splice(sae,
                   error=True))` next to the same trace without the hook,
                   and with a JumpReLU SAE of the same width spliced (its
                   decode is the dense `[T, F] x [F, D]` product; the top-k
                   one gathers its `k` decoder rows per token).

Model: the benchmarks' 12-layer width-768 configuration with random weights
(`_common.CONFIG`); the SAE reads `blocks.6.hook_resid_post`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import machine, median_times, print_ratio_rows, random_model

SITE = "blocks.6.hook_resid_post"


def activations(rows: int, d_in: int, seed: int = 0) -> np.ndarray:
    """Sparse combinations of random directions: what an SAE is meant for."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((4 * d_in, d_in)).astype(np.float32) / np.sqrt(d_in)
    codes = (rng.random((rows, 4 * d_in)) < 8 / (4 * d_in)) * rng.uniform(1, 3, (rows, 4 * d_in))
    return (codes.astype(np.float32) @ directions).astype(np.float32)


def phi3lab_rate(model, data, args, **kwargs) -> float:
    """Training tokens/s from two runs whose lengths differ by `args.steps` steps."""
    import phi3lab.features as F

    settings = dict(site=SITE, kind="topk", width=args.width, k=args.k, batch_size=args.batch, lr=1e-4, **kwargs)
    seconds = []
    for steps in (2, 2 + args.steps):
        start = time.perf_counter()
        F.train(model, data, tokens=steps * args.batch, **settings)
        seconds.append(time.perf_counter() - start)
    return args.steps * args.batch / (seconds[1] - seconds[0])


def saelens_rate(x: np.ndarray, args) -> float:
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.set_num_threads(os.cpu_count())
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=args.width, k=args.k))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    batches = [torch.from_numpy(x[i * args.batch : (i + 1) * args.batch]) for i in range(len(x) // args.batch)]
    since_fired = torch.zeros(args.width)
    dead_after = max((2 + args.steps) * args.batch // 4, args.batch)  # phi3lab's default window

    def step(i):
        nonlocal since_fired
        batch = batches[i % len(batches)]
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=batch,
                coefficients={},
                dead_neuron_mask=since_fired >= dead_after,
                n_training_steps=i,
                is_logging_step=False,
            )
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired = torch.where((out.feature_acts > 0).any(0), 0, since_fired + len(batch))

    for i in range(2):
        step(i)
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    return args.steps * args.batch / (time.perf_counter() - start)


def forward_rate(model, ids) -> float:
    import jax
    from jax import numpy as jnp

    params, token_ids, mask = model.params(), jnp.asarray(ids), jnp.ones(ids.shape, bool)
    forward = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])
    seconds = median_times({"forward": lambda: forward(params, token_ids, mask).block_until_ready()}, repeats=5)
    return ids.size / seconds["forward"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--length", type=int, default=128, help="sequence length for streaming and traces")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax

    import phi3lab
    import phi3lab.features as F
    from phi3lab.features.data import ROWS_PER_RUN

    print(machine())
    print(f"d_in {args.d_in}, width {args.width}, k {args.k}, batch {args.batch} tokens, {args.steps} timed steps")
    x = activations(args.batch * 8, args.d_in)
    ours, theirs = phi3lab_rate(None, x, args), saelens_rate(x, args)
    print(f"\ntraining step (tokens/s)  phi3lab {ours:10.0f}   SAELens {theirs:10.0f}   ratio {ours / theirs:.2f}x")

    model = random_model()
    ids = np.random.default_rng(1).integers(0, model.vocabulary_size, (ROWS_PER_RUN * 4, args.length))
    streamed = phi3lab_rate(model, ids, args)
    plain = forward_rate(model, ids[:ROWS_PER_RUN])
    ratio = streamed / plain
    print(f"streaming (tokens/s)      training {streamed:10.0f}   plain forward {plain:10.0f}   ratio {ratio:.2f}")

    sae = F.SparseDictionary.init(
        jax.random.key(0), kind="topk", d_in=model.hidden_dim, d_sae=args.width, k=args.k, site=SITE
    )
    dense = F.SparseDictionary.init(
        jax.random.key(0), kind="jumprelu", d_in=model.hidden_dim, d_sae=args.width, threshold=0.3, site=SITE
    )
    one = ids[:1]
    hooks, dense_hooks = F.hooks.splice(sae, error=True), F.hooks.splice(dense, error=True)
    times = median_times(
        {
            "plain trace": lambda: phi3lab.trace(model, one, names=SITE),
            "spliced trace": lambda: phi3lab.trace(model, one, names=SITE, hooks=hooks),
            "spliced, dense decode": lambda: phi3lab.trace(model, one, names=SITE, hooks=dense_hooks),
        },
        repeats=args.repeats,
    )
    print(f"\ntrace of {SITE}, batch 1, {args.length} tokens")
    print_ratio_rows(times, "plain trace")


if __name__ == "__main__":
    main()
