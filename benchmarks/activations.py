"""Corpus collection: `phi3lab.activations.collect` against the plain batched forward.

    .venv/bin/python benchmarks/activations.py [--texts 2000] [--trace-texts 200] [--rounds 5]
        [--site blocks.6.hook_resid_post] [--no-transformer-lens]

Random token ids, `--texts` documents of 20-300 tokens, the 12-layer width-768
model (`_common.CONFIG`). After a first (compiling) collection, in one process,
the corpus is cut into `--rounds` slices and each round runs every variant
over its slice (the order rotating), so load that drifts during the run hits
all variants alike; a line per round shows the running totals:

- `plain forward`: the model's forward through the site's layer, the site
  left on the device (`forward_fn` jitted per bucket, returning only the site,
  so XLA drops the later layers, as in collect's programs) over the very
  batches `collect` runs (the same length buckets, batch sizes and filler
  rows), waiting for its output: collect / plain forward is what the host
  copy, row selection and store cost;
- `collect (memory)` and `collect (disk)`: one residual site, every real
  token, into memory and into a Zarr store in a temporary directory;
- `trace loop`: `phi3lab.trace(model, ids, names=site)` of one document
  at a time over the first `--trace-texts` documents (warmed on one
  document per bucket): the fastest per-text loop over `trace`;
- `trace loop (every site)`: the loop as a user first writes it,
  `phi3lab.trace(model, ids)` (every hook site kept, as by default) and the
  site read from the trace, over the same documents;
- `forward loop`: the plain forward of those documents one at a time (each
  padded to its bucket, as `trace` pads): plain forward / forward loop is
  what batching itself gains on this machine, the ceiling of collect /
  trace loop when both run the same layers;
- `TransformerLens 4` (when `make bench-deps` installed it): a
  `TransformerBridge` of the same shapes, `run_with_cache` with a
  `names_filter` for the site over the same padded batches with their
  attention mask, keeping the real tokens' rows (torch CPU).

Prints tokens/s of each, the ratios the issue asks for (collect / forward
>= 0.85, collect / either trace loop >= 3, disk / memory >= 0.8, collect / TransformerLens > 1), and the programs
collect compiled against the length buckets the corpus touches.
"""

import argparse
import collections
import functools
import tempfile
import time

import numpy as np
from _common import CONFIG, machine, random_model


def corpus(count: int, low: int, high: int, vocabulary: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocabulary, int(n)).astype(np.int32) for n in rng.integers(low, high + 1, count)]


def plain_forward(model, docs, sizes: dict, window: int, site: str, programs: dict):
    """A no-argument callable running the forward through `site`'s layer
    (the capture kept on the device: no host copy, no row selection, no
    store) over the batches `collect` forms with `sizes` (its chosen batch
    size per bucket). Like collect's programs, it returns only the site, so
    XLA drops the layers after it in both. `programs` (bucket key -> jitted
    forward) is shared by the callers, so each bucket compiles once."""
    import jax

    from phi3lab.activations import corpus as batching
    from phi3lab.tracing import forward_fn

    fn = forward_fn(model, site)
    params = model.params()

    def program(key):
        if key not in programs:
            programs[key] = jax.jit(lambda *args, n=key[1]: fn.run(*args, num_positions=n)[1])
        return programs[key]

    def run():
        stream = iter(enumerate(docs))
        for batch in batching.batches(stream, model, lambda key, _: sizes[f"{key[0]},{key[1]}"], window):
            jax.block_until_ready(program(batch.key)(params, batch.token_ids, batch.padding_mask))

    return run


def transformer_lens_collection(model, window: int, site: str, threads: int | None):
    """A function of a list of documents and batch sizes returning a no-argument callable
    that collects `site` over them with TransformerLens 4 (`run_with_cache`
    with a `names_filter`, batched as TL users batch: the very padded batches
    `collect` runs, with their attention mask) and keeps the real tokens'
    rows as NumPy arrays; None without TL 4. One bridge serves every call."""
    from _transformer_lens import bridge

    from phi3lab.activations import corpus as batching

    peer = bridge(CONFIG, n_ctx=model.max_sequence_length, threads=threads)
    if peer is None:
        return None
    torch, tl_model = peer

    def over(docs, sizes: dict):
        stream = iter(enumerate(docs))
        padded = [
            (torch.from_numpy(b.token_ids.astype(np.int64)), torch.from_numpy(b.padding_mask), b.docs >= 0)
            for b in batching.batches(stream, model, lambda key, _: sizes[f"{key[0]},{key[1]}"], window)
        ]

        def run():
            rows = []
            with torch.no_grad():
                for ids, mask, real in padded:
                    _, cache = tl_model.run_with_cache(ids, names_filter=[site], attention_mask=mask.long())
                    rows.append(cache[site][mask & torch.from_numpy(real)[:, None]].numpy())
            return rows

        return run

    return over


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--trace-texts", type=int, default=200)
    parser.add_argument("--min-tokens", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--site", default="blocks.6.hook_resid_post")
    parser.add_argument("--no-transformer-lens", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="slices of the corpus the variants alternate over")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads for TransformerLens")
    args = parser.parse_args()

    import phi3lab
    from phi3lab.activations import collect
    from phi3lab.activations.collect import WINDOW
    from phi3lab.runtime import compile_cache
    from phi3lab.tracing.tracer import padded_length

    model = random_model()
    docs = corpus(args.texts, args.min_tokens, args.max_tokens, CONFIG["vocabulary_size"])
    tokens = sum(len(d) for d in docs)
    print(machine())
    print(f"{len(docs)} documents of {args.min_tokens}-{args.max_tokens} tokens, {tokens} tokens, site {args.site}")

    start = time.perf_counter()
    first = collect(model, docs, args.site, progress=False)
    cold = time.perf_counter() - start
    sizes = first.metadata["batch_sizes"]
    buckets = {padded_length(model, len(d)) for d in docs}
    compiled = compile_cache.size(model, "collect")

    trace_docs = docs[: args.trace_texts]
    for length in sorted({padded_length(model, len(d))[0] for d in trace_docs}):
        one = next(d for d in trace_docs if padded_length(model, len(d))[0] == length)
        phi3lab.trace(model, one, names=args.site), phi3lab.trace(model, one)

    def trace_loop(some, names):
        for ids in some:
            np.asarray(phi3lab.trace(model, ids, names=names)[args.site])  # the rows, on the host

    rounds = max(1, min(args.rounds, len(docs)))
    chunks = [docs[i::rounds] for i in range(rounds)]
    # Each slice's own collect picks its batch sizes (a slice has fewer
    # documents per bucket than the corpus): a first collect of each slice
    # compiles what it needs, and the plain forward and TransformerLens run
    # the very batches it chose.
    programs = {}  # the plain forward's, per bucket
    slice_sizes = [collect(model, chunk, args.site, progress=False).metadata["batch_sizes"] for chunk in chunks]
    runners = {
        "plain forward": [plain_forward(model, c, z, WINDOW, args.site, programs) for c, z in zip(chunks, slice_sizes)],
        "collect (memory)": [functools.partial(collect, model, chunk, args.site, progress=False) for chunk in chunks],
    }
    directory = tempfile.TemporaryDirectory()
    runners["collect (disk)"] = [
        functools.partial(collect, model, chunk, args.site, progress=False, store=f"{directory.name}/{i}")
        for i, chunk in enumerate(chunks)
    ]
    for name, names in (("trace loop", args.site), ("trace loop (every site)", None)):
        runners[name] = [functools.partial(trace_loop, trace_docs[i::rounds], names) for i in range(rounds)]
    one_each = collections.defaultdict(lambda: 1)
    runners["forward loop"] = [
        plain_forward(model, trace_docs[i::rounds], one_each, WINDOW, args.site, programs) for i in range(rounds)
    ]
    if not args.no_transformer_lens:
        peer = transformer_lens_collection(model, WINDOW, args.site, args.torch_threads)
        if peer is not None:
            runners["TransformerLens 4"] = [peer(c, z) for c, z in zip(chunks, slice_sizes)]
            runners["TransformerLens 4"][0]()  # warm-up
    for run in runners["plain forward"] + runners["forward loop"]:
        run()  # compiles the plain programs (the corpus' buckets)
    # Round-robin: in round r every variant runs its r-th slice of the corpus
    # (the variants' order rotating), so load that drifts during the run hits
    # them alike.
    seconds = dict.fromkeys(runners, 0.0)
    before = compile_cache.size(model)
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds[name] += timed(runners[name][r])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {t:.0f} s" for n, t in seconds.items()), flush=True)
    directory.cleanup()
    rates = {name: tokens / value for name, value in seconds.items()}
    for name in ("trace loop", "trace loop (every site)", "forward loop"):
        rates[name] = sum(len(d) for d in trace_docs) / seconds[name]

    print(f"batch sizes per bucket (padded length, rotary): {sizes}")
    print(f"{'variant':24s} {'tokens/s':>10s}")
    for name, rate in rates.items():
        print(f"{name:24s} {rate:10.0f}")
    for top, bottom, target in (
        ("collect (memory)", "plain forward", 0.85),
        ("collect (memory)", "trace loop", 3.0),
        ("collect (memory)", "trace loop (every site)", 3.0),
        ("plain forward", "forward loop", None),
        ("collect (disk)", "collect (memory)", 0.8),
        ("collect (memory)", "TransformerLens 4", 1.0),
    ):
        if bottom in rates:
            note = f"(target >= {target})" if target else "(batching's own gain on this machine)"
            print(f"{top + ' / ' + bottom:36s} {rates[top] / rates[bottom]:6.2f}  {note}")
    print(f"programs compiled by collect: {compiled} for {len(buckets)} buckets touched; first run {cold:.1f} s")
    print(f"programs compiled during the timed rounds: {compile_cache.size(model) - before} (0: no compile timed)")


if __name__ == "__main__":
    main()
