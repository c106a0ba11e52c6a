"""Generation speed: phi3lab.generate (KV cache) against keras-hub's
`Phi3CausalLM.generate`, and the cost of capturing every attention pattern.

Both models have the same configuration and weights (keras-hub writes a
preset, phi3lab loads it). Greedy decoding of `--new` tokens after a
`--prompt`-token prompt, no stop token; each generator is warmed up (its
programs compiled), then timed in interleaved runs. Prints median seconds,
tokens/s and ratios, whether both produced the same tokens, phi3lab's
per-token time at positions 16 and 240 (a cache keeps it nearly flat), and
the weight-read bandwidth of a decode step (weight bytes per token / seconds
per token) as a fraction of a jitted matrix-vector product's, measured in the
same process, beside the same fraction for the step's matrix-vector products
run alone (`--bandwidth-only` prints just those, from `--runs` alternating
rounds).

Run: .venv/bin/python benchmarks/generate.py [--prompt 128] [--new 128] [--runs 3] [--dtype bfloat16]
     [--bandwidth-only]
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
    random_model,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_arguments(parser, kv_heads=False)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' dtype")
    parser.add_argument(
        "--bandwidth-only", action="store_true", help="only the weight-read bandwidth fraction, --runs times"
    )
    return parser.parse_args()


def main():
    args = parse_args()
    if args.bandwidth_only:
        import numpy as np

        model = random_model(config_from_arguments(args, dtype=args.dtype))
        prompt = np.random.default_rng(0).integers(3, args.vocabulary, args.prompt).astype("int32")
        print(machine())
        print(f"config: {describe_sizes(args)} {args.dtype}; prompt {args.prompt}, {args.new} new tokens, greedy")
        print_bandwidth(model, prompt, args.new, max(args.runs, 2))
        return
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
    print_bandwidth(model, prompt, args.new, max(args.runs, 2))


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one greedy decode step reads: every weight but the
    input embedding table, of which a step reads one row (the LM head is
    its own matrix unless tied, then it is read as the head)."""
    import numpy as np

    tied = not any(w.path.endswith("reverse_embeddings") for w in model.weights)
    return sum(
        int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize
        for w in model.weights
        if tied or not w.path.endswith("token_embedding/embeddings")
    )


def matvec_bandwidth(total_bytes: int):
    """A no-argument callable returning the bytes/s a jitted float32
    matrix-vector product reads: a matrix of about `total_bytes` (the decode
    step's weights), 2,048 wide, times a vector on either side (`v @ M`, the
    layout of the model's `x @ W`, and `M @ v`), the faster of the two (so
    the fraction compares with the best a matrix-vector product reaches)."""
    import time

    import jax
    import numpy as np

    width = 2048
    rows = max(1, total_bytes // (4 * width))
    matrix = jax.device_put(np.random.default_rng(0).standard_normal((rows, width), np.float32))
    products = [
        (jax.jit(lambda v, m: v @ m), jax.device_put(np.ones((1, rows), np.float32))),
        (jax.jit(lambda v, m: m @ v), jax.device_put(np.ones((width,), np.float32))),
    ]
    for product, vector in products:
        product(vector, matrix).block_until_ready()

    def measure() -> float:
        best = float("inf")
        for product, vector in products:
            for _ in range(3):
                start = time.perf_counter()
                product(vector, matrix).block_until_ready()
                best = min(best, time.perf_counter() - start)
        return rows * width * 4 / best

    return measure


def products_alone(model, steps: int = 64):
    """A no-argument callable returning the seconds per step of a jitted
    `lax.while_loop` that runs, each step, only the matrix-vector products
    of a greedy decode step of `model`'s shapes, in its layout and dtype
    (`x @ W`, each layer's kernels their own arrays): per layer the query,
    key, value and output projections and the gate, up and down
    projections, each fed from the one before as in the layer, then the LM
    head, whose argmax picks the next step's embedding row. No attention,
    norms, cache or sampling: the fastest a decode step built from these
    products runs on this machine, the ceiling of its bandwidth fraction."""
    import time

    import jax
    import numpy as np
    from jax import numpy as jnp

    d, f, v = model.hidden_dim, model.intermediate_dim, model.vocabulary_size
    dh = d // model.num_query_heads
    q, kv = model.num_query_heads * dh, model.num_key_value_heads * dh
    dtype = next(w.dtype for w in model.weights if w.path.endswith("query_kernel"))
    rng = np.random.default_rng(0)
    array = lambda *shape: jnp.asarray(0.02 * rng.standard_normal(shape, np.float32), dtype)
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    layers = [{name: array(*shape) for name, shape in shapes.items()} for _ in range(model.num_layers)]
    embedding, head = array(v, d), array(d, v)

    def layer(x, w):
        attended = (x @ w["q"]) + jnp.mean(x @ w["k"]) + jnp.mean(x @ w["v"])
        x = x + attended @ w["o"]
        return x + (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]

    def run(layers, head, embedding, token):
        def body(carry):
            i, token = carry
            x = embedding[token][None]
            for w in layers:
                x = layer(x, w)
            return i + 1, jnp.argmax(x @ head, axis=-1)[0].astype(jnp.int32)

        return jax.lax.while_loop(lambda carry: carry[0] < steps, body, (jnp.int32(0), token))[1]

    program = jax.jit(run)
    program(layers, head, embedding, jnp.int32(1)).block_until_ready()

    def measure() -> float:
        start = time.perf_counter()
        program(layers, head, embedding, jnp.int32(1)).block_until_ready()
        return (time.perf_counter() - start) / steps

    return measure


def print_bandwidth(model, prompt, new_tokens: int, repeats: int) -> None:
    """Weight-read bandwidth of greedy decoding as a fraction of a jitted
    matrix-vector product's, measured in this process in alternating rounds
    (a decode of 1 and of `new_tokens` tokens, the matrix-vector product,
    then `products_alone`), so load drifting on a shared machine hits them
    alike. A decode step's time is the difference of the two generations
    over `new_tokens - 1`. Also prints the fraction of the step's products
    alone (the ceiling for a step made of them) and the decode step's time
    over theirs (what attention, norms, cache and sampling add)."""
    import statistics
    import time

    import phi3lab

    weights = weight_bytes_per_token(model)
    matvec = matvec_bandwidth(weights)
    alone = products_alone(model)
    generate = lambda n: phi3lab.generate(model, prompt, max_new_tokens=n, stop=[], progress=False)
    generate(1), generate(new_tokens)  # compiled
    steps, fractions, bandwidths, ceilings, overheads = [], [], [], [], []
    for _ in range(repeats):
        seconds = {}
        for n in (1, new_tokens):
            start = time.perf_counter()
            generate(n)
            seconds[n] = time.perf_counter() - start
        step = (seconds[new_tokens] - seconds[1]) / (new_tokens - 1)
        bandwidth = matvec()
        steps.append(step)
        bandwidths.append(bandwidth)
        fractions.append(weights / step / bandwidth)
        products = alone()
        ceilings.append(weights / products / bandwidth)
        overheads.append(step / products)
    step, bandwidth = statistics.median(steps), statistics.median(bandwidths)
    print(
        f"\nweights read per token {weights / 1e6:.0f} MB; decode step {1e3 * step:.1f} ms -> "
        f"{weights / step / 1e9:.1f} GB/s; jitted matvec {bandwidth / 1e9:.1f} GB/s; "
        f"fraction {statistics.median(fractions):.2f} (median of {repeats} alternating rounds; "
        f"quartiles {' '.join(f'{q:.2f}' for q in statistics.quantiles(fractions, n=4))})"
    )
    print(
        f"the step's matrix-vector products alone: fraction {statistics.median(ceilings):.2f} "
        f"(the ceiling for a step built from them); decode step / products alone "
        f"{statistics.median(overheads):.2f}x"
    )


if __name__ == "__main__":
    main()
