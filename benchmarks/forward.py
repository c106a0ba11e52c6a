"""Forward-pass speed: phi3lab's Phi3Backbone against keras-hub's.

Both models have the same configuration and the same weights (keras-hub
writes a preset, phi3lab loads it). Each forward is compiled with `jax.jit`
(keras-hub through `stateless_call` with its variables as inputs, phi3lab
through its pure `apply`), warmed up, then timed in interleaved runs so that
a change in machine load hits both alike. Prints the median milliseconds,
the ratio phi3lab / keras-hub and the largest output difference.

Run: .venv/bin/python benchmarks/forward.py [--lengths 128 512] [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocabulary", type=int, default=32064)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    return parser.parse_args()


def main():
    args = parse_args()
    import jax
    import keras
    import keras_hub
    import numpy as np

    import phi3lab

    config = dict(
        vocabulary_size=args.vocabulary,
        num_layers=args.layers,
        hidden_dim=args.hidden,
        intermediate_dim=args.intermediate,
        num_query_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_sequence_length=max(4096, max(args.lengths)),
        dtype="float32",
    )
    keras.utils.set_random_seed(0)
    reference = keras_hub.models.Phi3Backbone(**config)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_to_preset(directory)
        model = phi3lab.Phi3Backbone.from_preset(directory)

    params = model.params()
    ours = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask)[0])
    trainable = [v.value for v in reference.trainable_variables]
    non_trainable = [v.value for v in reference.non_trainable_variables]
    theirs = jax.jit(lambda t, n, x: reference.stateless_call(t, n, x)[0])

    runners = {
        "phi3lab": lambda ids, mask: ours(params, ids, mask),
        "keras-hub": lambda ids, mask: theirs(trainable, non_trainable, {"token_ids": ids, "padding_mask": mask}),
    }

    print(
        f"devices: {jax.devices()}  cpu cores: {os.cpu_count()}  "
        f"load average: {os.getloadavg()[0]:.1f} (shared machine: absolute times are noisy)"
    )
    print(
        f"config: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} "
        f"intermediate={args.intermediate} vocabulary={args.vocabulary} batch={args.batch} "
        f"float32, {model.count_params() / 1e6:.1f}M parameters; "
        f"median of {args.runs} interleaved runs after {args.warmup} warm-up"
    )
    rows = []
    rng = np.random.default_rng(0)
    for length in args.lengths:
        ids = jax.numpy.asarray(rng.integers(0, args.vocabulary, (args.batch, length)), "int32")
        mask = jax.numpy.ones((args.batch, length), "int32")
        outputs = {}
        for name, run in runners.items():
            for _ in range(args.warmup):
                outputs[name] = run(ids, mask).block_until_ready()
        times = {name: [] for name in runners}
        for index in range(args.runs):
            order = list(runners) if index % 2 == 0 else list(runners)[::-1]
            for name in order:
                start = time.perf_counter()
                runners[name](ids, mask).block_until_ready()
                times[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        a, b = (np.asarray(outputs[name], np.float64) for name in runners)
        rows.append((length, ms["phi3lab"], ms["keras-hub"], float(np.abs(a - b).max()), float(np.abs(b).max())))

    print()
    print(f"{'seq':>5} {'phi3lab ms':>11} {'keras-hub ms':>13} {'ratio':>6} {'max|diff|':>10} {'max|out|':>9}")
    for length, ours_ms, theirs_ms, diff, scale in rows:
        print(
            f"{length:>5} {ours_ms:>11.1f} {theirs_ms:>13.1f} {ours_ms / theirs_ms:>6.2f} {diff:>10.2e} {scale:>9.2f}"
        )


if __name__ == "__main__":
    main()
