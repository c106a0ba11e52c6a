"""Generation speed: phi3lab.generate (KV cache) against keras-hub's
`Phi3CausalLM.generate`, and the cost of capturing every attention pattern.

Both models have the same configuration and weights (keras-hub writes a
preset, phi3lab loads it). Greedy decoding of `--new` tokens after a
`--prompt`-token prompt, no stop token; each generator is warmed up (its
programs compiled), then timed in interleaved runs. Prints median seconds,
tokens/s and ratios, whether both produced the same tokens, and phi3lab's
per-token time at positions 16 and 240 (a cache keeps it nearly flat).

Run: .venv/bin/python benchmarks/generate.py [--prompt 128] [--new 128] [--runs 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

from _common import (
    add_size_arguments,
    config_from_arguments,
    describe_sizes,
    generation_runners,
    keras_hub_pair,
    machine,
    median_times,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, kv_heads=False)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' dtype")
    return parser.parse_args()


def main():
    args = parse_args()
    import numpy as np

    import phi3lab

    backbone, model = keras_hub_pair(config_from_arguments(args, dtype=args.dtype))
    prompt = np.random.default_rng(0).integers(3, args.vocabulary, args.prompt).astype("int32")
    runners = generation_runners(backbone, model, prompt, args.new)
    print(machine())
    print(
        f"config: {describe_sizes(args)} {args.dtype}, {model.count_params() / 1e6:.1f}M parameters; "
        f"prompt {args.prompt}, {args.new} new tokens, greedy; median of {args.runs} interleaved runs after a warm-up"
    )
    outputs = {name: np.asarray(run()) for name, run in runners.items()}
    seconds = median_times(runners, args.runs, warmup=0)
    print(f"\n{'generator':>24} {'s':>7} {'tokens/s':>9} {'same tokens as keras-hub':>25}")
    for name, value in seconds.items():
        same = np.array_equal(outputs[name], outputs["keras-hub"])
        print(f"{name:>24} {value:>7.2f} {args.new / value:>9.1f} {str(same):>25}")
    print(f"\ntokens/s phi3lab / keras-hub: {seconds['keras-hub'] / seconds['phi3lab']:.2f}x")
    print(
        f"time with every layer's patterns captured / without: "
        f"{seconds['phi3lab + all patterns'] / seconds['phi3lab']:.2f}x"
    )

    # Per-token time at positions 16 and 240: the time between stream callbacks.
    stamps = []
    short = prompt[:8]
    phi3lab.generate(model, short, max_new_tokens=248, stop=[], progress=False)
    phi3lab.generate(
        model, short, max_new_tokens=248, stop=[], progress=False, stream=lambda _: stamps.append(time.perf_counter())
    )
    steps = np.diff(stamps)  # steps[i]: the decode step that gives the token at position 8 + i + 1
    at = lambda position: 1e3 * float(np.median(steps[position - 11 : position - 6]))
    print(f"per-token ms at position 16: {at(16):.1f}, at position 240: {at(240):.1f} (ratio {at(240) / at(16):.2f})")


if __name__ == "__main__":
    main()
