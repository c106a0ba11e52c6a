"""Forward-pass speed: phi3lab's Phi3Backbone against keras-hub's.

Both models have the same configuration and the same weights (keras-hub
writes a preset, phi3lab loads it). Each forward is compiled with `jax.jit`
(keras-hub through `stateless_call` with its variables as inputs, phi3lab
through its pure `apply`), warmed up, then timed in interleaved runs so that
a change in machine load hits both alike. Prints the median milliseconds,
the ratio phi3lab / keras-hub and the largest output difference.

With `--causal-blocks 64 128 512`, phi3lab also runs with those query
blocks of its causal-block attention (`AttentionPaths.causal_block`, default
256), each ratio against keras-hub.

On one CPU device a row `phi3lab, layer views` runs the same `apply` on
each layer's own weights (`stacked.layer_views`, arrays sharing the stack's
memory; the layers then run unrolled, as the float32 decode loop runs them)
instead of the stack, from which XLA:CPU writes each layer's weights out
before using them (keras-hub's layers hold their own variables): the
difference is what the stacked layout costs a forward here.

Run: .venv/bin/python benchmarks/forward.py [--lengths 128 512] [--runs 15] [--causal-blocks 64 128]
"""

from __future__ import annotations

import argparse

from _common import (
    add_size_arguments,
    config_from_arguments,
    describe_sizes,
    jitted_forwards,
    keras_hub_pair,
    machine,
    median_times,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--causal-blocks", type=int, nargs="*", default=[], help="other causal_block values to time")
    return parser.parse_args()


def with_causal_block(model, block: int, ids, mask):
    """phi3lab's forward compiled (for these shapes) with the model's
    attention paths but blocks of `block` queries."""
    import dataclasses

    import jax

    paths = dataclasses.replace(model.attention_paths, causal_block=block)
    params = model.params()
    forward = jax.jit(lambda p, i, m: model.apply(p, i, m, attention_paths=paths)[0])
    compiled = forward.lower(params, ids, mask).compile()
    return lambda ids, mask: compiled(params, ids, mask)


def with_layer_views(model):
    """phi3lab's forward on `stacked.layer_views` of its weights, or None
    where the stack cannot be viewed per layer (not on one CPU device)."""
    import jax

    from phi3lab.model.stacked import layer_views

    params = model.params()
    layers = layer_views(params["decoder"])
    if layers is None:
        return None
    params = {**params, "decoder": layers}
    forward = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])
    return lambda ids, mask: forward(params, ids, mask)


def main():
    args = parse_args()
    import jax
    import numpy as np

    config = config_from_arguments(args, max_sequence_length=max(4096, max(args.lengths)))
    reference, model = keras_hub_pair(config)
    ours, theirs = jitted_forwards(model, reference)
    runners = {"phi3lab": ours, "keras-hub": theirs}
    views = with_layer_views(model)
    if views is not None:
        runners["phi3lab, layer views"] = views

    print(machine())
    print(
        f"config: {describe_sizes(args)} batch={args.batch} float32, {model.count_params() / 1e6:.1f}M parameters; "
        f"median of {args.runs} interleaved runs after {args.warmup} warm-up"
    )
    rows = []
    rng = np.random.default_rng(0)
    for length in args.lengths:
        ids = jax.numpy.asarray(rng.integers(0, args.vocabulary, (args.batch, length)), "int32")
        mask = jax.numpy.ones((args.batch, length), "int32")
        runs = dict(runners)
        for block in args.causal_blocks:
            runs[f"phi3lab, causal_block={block}"] = with_causal_block(model, block, ids, mask)
        outputs = {name: run(ids, mask).block_until_ready() for name, run in runs.items()}
        variants = {name: (lambda run=run: run(ids, mask).block_until_ready()) for name, run in runs.items()}
        ms = {name: 1e3 * seconds for name, seconds in median_times(variants, args.runs, args.warmup).items()}
        theirs = np.asarray(outputs["keras-hub"], np.float64)
        for name in runs:
            if name != "keras-hub":
                diff = float(np.abs(np.asarray(outputs[name], np.float64) - theirs).max())
                rows.append((length, name, ms[name], ms["keras-hub"], diff, float(np.abs(theirs).max())))

    print()
    print(f"{'seq':>5} {'':<28} {'ms':>8} {'keras-hub ms':>13} {'ratio':>6} {'max|diff|':>10} {'max|out|':>9}")
    for length, name, ours_ms, theirs_ms, diff, scale in rows:
        print(
            f"{length:>5} {name:<28} {ours_ms:>8.1f} {theirs_ms:>13.1f} {ours_ms / theirs_ms:>6.2f} "
            f"{diff:>10.2e} {scale:>9.2f}"
        )


if __name__ == "__main__":
    main()
