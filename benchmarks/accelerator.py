"""phi3lab against keras-hub on whatever device JAX finds (GPU, TPU or CPU).

    python benchmarks/accelerator.py [--lengths 128 512 2048] [--dtype bfloat16] [--repeats 10]

Same configuration and weights for both models (keras-hub writes a preset,
phi3lab loads it); every variant compiled and warmed up, then timed
round-robin in one process so load drift hits all alike. Rows, each as a
ratio to keras-hub's jitted forward at the same length:

  phi3lab forward        jax.jit(model.apply): final hidden states (on GPUs
                         in 16-bit dtypes attention is cuDNN flash attention,
                         elsewhere causal query blocks)
  full trace             phi3lab.trace(model, ids): every hook point, to NumPy
  full trace, bf16 maps  the same with capture_dtype="bfloat16"
  patterns only          names="blocks.*.attn.hook_pattern"
and, after the lengths, greedy generation of `--new-tokens` tokens after a
128-token prompt: phi3lab.generate (also capturing every layer's patterns)
against keras-hub's Phi3CausalLM.generate, seconds, ms per new token and the
ratio to keras-hub's.

Defaults: 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064, batch 1,
bfloat16 on accelerators and float32 on CPU. Prints the device, the load
average and the largest output difference between the two forwards.
"""

from __future__ import annotations

import argparse
import os

from _common import (
    add_size_arguments,
    config_from_arguments,
    describe_sizes,
    generation_runners,
    jitted_forwards,
    keras_hub_pair,
    machine,
    median_times,
    print_ratio_rows,
)

# Prompt length of the generation rows.
PROMPT_TOKENS = 128


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    return parser.parse_args()


def main():
    args = parse_args()
    import jax
    import numpy as np

    import phi3lab

    device = jax.devices()[0]
    dtype = args.dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    config = config_from_arguments(args, max_sequence_length=max(4096, max(args.lengths)), dtype=dtype)
    reference, model = keras_hub_pair(config)
    ours, theirs = jitted_forwards(model, reference)

    print(machine())
    print(
        f"config: {describe_sizes(args)} {dtype}, batch 1; median of {args.repeats} interleaved rounds after 2 warm-up"
    )
    rng = np.random.default_rng(0)
    for length in args.lengths:
        ids = rng.integers(0, args.vocabulary, (1, length)).astype("int32")
        token_ids, mask = jax.numpy.asarray(ids), jax.numpy.ones((1, length), "int32")
        variants = {
            "keras-hub forward": lambda: theirs(token_ids, mask).block_until_ready(),
            "phi3lab forward": lambda: ours(token_ids, mask).block_until_ready(),
            "full trace": lambda: phi3lab.trace(model, ids),
            "full trace, bf16 maps": lambda: phi3lab.trace(model, ids, capture_dtype="bfloat16"),
            "patterns only": lambda: phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern"),
        }
        times = median_times(variants, args.repeats)
        a = np.asarray(ours(token_ids, mask), np.float64)
        b = np.asarray(theirs(token_ids, mask), np.float64)
        print(
            f"\nT={length}  (load average {os.getloadavg()[0]:.1f}; max |phi3lab - keras-hub| = "
            f"{np.abs(a - b).max():.2e} on outputs up to {np.abs(b).max():.2f})"
        )
        print_ratio_rows(times, "keras-hub forward")
    prompt = rng.integers(3, args.vocabulary, PROMPT_TOKENS).astype("int32")
    runners = generation_runners(reference, model, prompt, args.new_tokens)
    outputs = {name: np.asarray(run()) for name, run in runners.items()}  # compile
    seconds = median_times(runners, 3, warmup=0)
    print(f"\ngeneration: {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, greedy, median of 3")
    print(f"{'generator':28s} {'s':>7s} {'ms/token':>9s} {'x keras-hub':>12s} {'same tokens':>12s}")
    for name, value in seconds.items():
        same = np.array_equal(outputs[name], outputs["keras-hub"])
        print(
            f"{name:28s} {value:7.2f} {1e3 * value / args.new_tokens:9.1f} "
            f"{value / seconds['keras-hub']:12.2f} {str(same):>12s}"
        )


if __name__ == "__main__":
    main()
