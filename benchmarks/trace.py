"""How much a trace costs next to the plain forward (run by hand).

    .venv/bin/python benchmarks/trace.py [--lengths 128 512] [--repeats 10]

Model: 12 layers, width 768, 12 heads, MLP 2048, vocabulary 32064, float32,
batch 1, random weights. Every timing is the median of `--repeats` runs
after a warm-up (compilation excluded); the variants are run round-robin,
so load that drifts during the run hits them alike.

Rows:
  plain forward          jax.jit(model.apply): final hidden states only
  plain forward + logits the same plus the output projection (a full trace
                         computes the logits too)
  trace: everything      phi3lab.trace(model, ids): every hook point, copied
                         to host NumPy arrays
  ..., bf16 maps         the same with capture_dtype="bfloat16"
  ... but scores         everything except hook_attn_scores (is it worth
                         making the scores opt-in?)
  trace: patterns only   names="blocks.*.attn.hook_pattern"
  trace: residual only   names="blocks.*.hook_resid_*"
and, when TransformerLens 4 is installed (`make bench-deps`), a
TransformerBridge of the same shapes on torch CPU (`_transformer_lens.py`):
its forward, run_with_cache (everything) and run_with_cache with a
names_filter for the patterns.

  fill of a full trace's arrays
                         a jitted program that only fills new arrays of the
                         shapes a full trace returns: the floor of writing
                         that many bytes into fresh memory on this machine

Also printed: the plain forward's achieved GFLOP/s next to a large jitted
matmul's (timed in the same round-robin), the memory of a full trace (peak RSS
growth while it runs, sampled every millisecond) next to the bytes of the
arrays it returns, and the minor page faults and kernel CPU time per call of
the full trace and of the fill (fresh memory is faulted in and zeroed by the
kernel, a cost no capture of that size avoids).
"""

from __future__ import annotations

import argparse
import gc
import threading
import time

import jax
import numpy as np
from _common import CONFIG, machine, median_times, print_ratio_rows, random_model
from _transformer_lens import bridge
from jax import numpy as jnp

import phi3lab  # noqa: F401  (selects the JAX backend)
from phi3lab.runtime.host_memory import release_freed_memory


def forward_flops(length: int, batch: int = 1, logits: bool = False) -> float:
    """Matmul flops of the forward: 2 * (matmul parameters) * tokens, plus
    attention's QK^T and PV over the full T x T square."""
    d, f, layers = CONFIG["hidden_dim"], CONFIG["intermediate_dim"], CONFIG["num_layers"]
    hq, hkv = CONFIG["num_query_heads"], CONFIG["num_key_value_heads"]
    dh = d // hq
    per_layer = d * (hq + 2 * hkv) * dh + hq * dh * d + 3 * d * f
    params = layers * per_layer + (d * CONFIG["vocabulary_size"] if logits else 0)
    attention = layers * 2 * (2 * batch * hq * length * length * dh)
    return 2.0 * params * batch * length + attention


MATMUL = 2048  # the reference matmul is MATMUL x MATMUL by MATMUL x MATMUL


def reference_matmul():
    """A large jitted float32 matmul: the machine's attainable GFLOP/s."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((MATMUL, MATMUL), dtype=np.float32))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((MATMUL, MATMUL), dtype=np.float32))
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b).block_until_ready()


def peak_rss_growth(fn) -> tuple[int, object]:
    """(largest RSS growth while `fn` runs, its result), sampled every ms."""
    import psutil

    gc.collect()
    release_freed_memory()  # RSS growth then measures what the run allocates
    process = psutil.Process()
    base = process.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    return peak[0] - base, result


def fill_of(arrays):
    """A jitted program that fills new arrays shaped and typed as `arrays`
    with one value (nothing else): the cost of writing them into fresh
    memory."""
    shapes = [(a.shape, a.dtype) for a in arrays]
    fill = jax.jit(lambda x: [jnp.full(shape, x, dtype) for shape, dtype in shapes])
    return lambda: jax.block_until_ready(fill(jnp.float32(1)))


def kernel_cost(fn, runs: int = 3) -> tuple[float, float]:
    """(minor page faults, kernel CPU ms) per call of `fn`, from getrusage."""
    import resource

    fn()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(runs):
        fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return (after.ru_minflt - before.ru_minflt) / runs, (after.ru_stime - before.ru_stime) / runs * 1e3


def phi3lab_variants(model, ids):
    params = model.params()
    token_ids = jnp.asarray(ids)
    mask = jnp.ones(ids.shape, bool)
    plain = jax.jit(lambda p, i, m: model.apply(p, i, m)[0])
    with_logits = jax.jit(
        lambda p, i, m: model.token_embedding.apply(p["token_embedding"], model.apply(p, i, m)[0], reverse=True)
    )
    return {
        "plain forward": lambda: plain(params, token_ids, mask).block_until_ready(),
        "plain forward + logits": lambda: with_logits(params, token_ids, mask).block_until_ready(),
        "trace: everything": lambda: phi3lab.trace(model, ids),
        "trace: everything, bf16 maps": lambda: phi3lab.trace(model, ids, capture_dtype="bfloat16"),
        "trace: everything but scores": lambda: phi3lab.trace(
            model, ids, names=lambda name: not name.endswith("hook_attn_scores")
        ),
        "trace: patterns only": lambda: phi3lab.trace(model, ids, names="blocks.*.attn.hook_pattern"),
        "trace: residual only": lambda: phi3lab.trace(model, ids, names="blocks.*.hook_resid_*"),
    }


def transformer_lens_variants(length: int, threads: int | None = None):
    """TransformerLens 4's forward and `run_with_cache` on the same shapes,
    or None when it is not installed (`make bench-deps`)."""
    peer = bridge(CONFIG, n_ctx=max(length, 512), threads=threads)
    if peer is None:
        return None
    torch, model = peer
    ids = torch.randint(0, CONFIG["vocabulary_size"], (1, length))
    patterns = lambda name: name.endswith("hook_pattern")

    def timed(fn):
        def run():
            with torch.no_grad():
                return fn()

        return run

    return {
        "TL forward": timed(lambda: model(ids)),
        "TL run_with_cache: everything": timed(lambda: model.run_with_cache(ids)),
        "TL run_with_cache: patterns only": timed(lambda: model.run_with_cache(ids, names_filter=patterns)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-transformer-lens", action="store_true")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for TransformerLens (default: torch's own)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    print(machine())
    model = random_model()
    for length in args.lengths:
        ids = np.random.default_rng(length).integers(0, CONFIG["vocabulary_size"], (1, length)).astype(np.int32)
        variants = phi3lab_variants(model, ids)
        full = phi3lab.trace(model, ids)
        variants["fill of a full trace's arrays"] = fill_of([full[name] for name in full.names] + [full.output])
        del full
        variants["reference matmul 2048^3"] = reference_matmul()
        tl = None if args.no_transformer_lens else transformer_lens_variants(length, args.torch_threads)
        if tl:
            variants.update(tl)
        times = median_times(variants, args.repeats)
        base = times["plain forward"]
        print(f"\nT={length}, batch 1, median of {args.repeats} interleaved rounds after 2 warm-up rounds")
        print_ratio_rows(times, "plain forward", width=36)
        if tl:
            for ours, theirs in (
                ("trace: everything", "TL run_with_cache: everything"),
                ("trace: patterns only", "TL run_with_cache: patterns only"),
                ("plain forward + logits", "TL forward"),
            ):
                print(f"speedup {theirs} / {ours}: {times[theirs] / times[ours]:.2f}x")
        achieved = forward_flops(length) / base / 1e9
        peak = 2.0 * MATMUL**3 / times["reference matmul 2048^3"] / 1e9
        print(
            f"plain forward: {forward_flops(length) / 1e9:.1f} GFLOP -> {achieved:.1f} GFLOP/s "
            f"= {achieved / peak:.0%} of a large jitted matmul's {peak:.1f} GFLOP/s (same rounds)"
        )

        growth, tr = peak_rss_growth(lambda: phi3lab.trace(model, ids))
        captured = sum(tr[name].nbytes for name in tr.names) + tr.output.nbytes
        print(
            f"full trace memory: peak RSS growth {growth / 2**20:.0f} MiB vs captured arrays "
            f"{captured / 2**20:.0f} MiB ({len(tr.names)} arrays); ratio {growth / captured:.2f}"
        )
        for name in ("trace: everything", "fill of a full trace's arrays"):
            faults, kernel_ms = kernel_cost(variants[name])
            print(f"{name}: {faults:.0f} minor page faults, {kernel_ms:.0f} ms kernel CPU per call")
        estimate = getattr(phi3lab, "estimate", None)
        if estimate is not None:
            print(f"phi3lab.estimate: {estimate(model, seq_len=length)}")
        del tr


if __name__ == "__main__":
    main()
