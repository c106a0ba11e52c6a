"""Real-size report: Phi-3-mini-4k's architecture with random bfloat16 weights.

    .venv/bin/python benchmarks/real_size.py [--workdir /tmp/phi3_real] [--steps build save load ...]
    .venv/bin/python benchmarks/real_size.py --scale mid --workdir /tmp/phi3_mid
    (the same report for 8 layers of width 1024, MLP 2816, vocabulary 8192: 0.24 GB of
    weights, ~1 minute; `--scale small` is a quick check of the script;
    --layers/--hidden/--intermediate/--vocabulary override single sizes)

Each step runs in a fresh process, so its peak resident memory is its own:

| step | what it does |
|---|---|
| baseline | imports phi3lab and starts JAX (what every other step's peak includes) |
| bandwidth | times copies of 256 MB arrays: the memory bandwidth generation is compared with |
| build | builds the model (random bfloat16 weights) |
| save | builds it and writes it with `save_hf_checkpoint` (sharded safetensors) |
| load | `Phi3Backbone.from_preset(dir, dtype="bfloat16")` |
| trace16, trace512 | load, then `trace` of 16 / 512 tokens capturing every pattern of two layers and the logits |
| generate32 | load, then 32 new tokens with the key/value cache (greedy) from a 16-token prompt |
| int8_trace16 | load with `quantization="int8"` (each kernel quantized as it is read), then the 16-token trace |
| int8_generate32 | the same load, then the 32 generated tokens |

For each step it prints the seconds of the step itself (after the load for
the traces), the process's peak resident memory, that peak above the
baseline step's (what the step itself added: at real size the baseline's
0.4 GB of libraries is 5% of the weights, at mid size it is more than the
weights) as x the step's own weight bytes (bfloat16, or int8 kernels for
the int8 steps), and beside it phi3lab's own
estimate of the same (weights plus `phi3lab.estimate` /
`phi3lab.generation.estimate`'s working set and captures). Targets (issue 40):
every step <= 1.5x the weights, `load` <= 1.2x, the int8 trace <= 6 GB.
Without `save` among the steps the checkpoint already in `--workdir` is
reused (`--steps load trace16 int8_trace16` after one full run).
`--host-memory reuse` runs every step with `PHI3LAB_HOST_MEMORY=reuse`
(phi3lab's opt-in allocator settings; glibc's defaults otherwise). At real
size it needs about 8 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Sizes other than Phi-3-mini-4k's, keeping its shape: layers of width w
# with an MLP of ~2.7 w, a vocabulary small beside the layers (5% of the weights at real size).
SCALES = {
    "real": {},
    "mid": {"num_layers": 8, "hidden_dim": 1024, "intermediate_dim": 2816, "vocabulary_size": 8192},
    "tiny": {"num_layers": 8, "hidden_dim": 128, "intermediate_dim": 352, "vocabulary_size": 1024},  # mid / 8
    "small": {"num_layers": 2, "hidden_dim": 256, "intermediate_dim": 512, "vocabulary_size": 2048},
}
STEPS = (
    "baseline",
    "bandwidth",
    "build",
    "save",
    "load",
    "trace16",
    "trace512",
    "generate32",
    "int8_trace16",
    "int8_generate32",
)

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import jax
import numpy as np
import phi3lab
from phi3lab.presets import save_hf_checkpoint

step, workdir, config = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
result = {}


def bytes_of(model):
    return sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)


def load(**kwargs):
    start = time.time()
    model = phi3lab.Phi3Backbone.from_preset(str(workdir), dtype="bfloat16", **kwargs)
    result["load_seconds"] = time.time() - start
    result["weights"] = bytes_of(model)
    return model


def trace(model, length):
    last = model.num_layers - 1
    names = [f"blocks.{layer}.attn.hook_*" for layer in (0, last)] + ["hook_logits"]
    estimate = phi3lab.estimate(model, length, names=names)
    ids = np.random.default_rng(0).integers(1, model.vocabulary_size, (1, length))
    start = time.time()
    tr = phi3lab.trace(model, ids, names=names)
    result["seconds"] = time.time() - start
    result["estimate"] = bytes_of(model) + estimate.needed
    result["finite"] = bool(np.isfinite(tr.logits).all())


def generate(model):
    prompt = np.random.default_rng(0).integers(1, model.vocabulary_size, 16)
    estimate = phi3lab.generation.estimate(model, len(prompt), 32)
    start = time.time()
    generation = phi3lab.generate(model, None, prompt, max_new_tokens=32)
    result["seconds"] = time.time() - start
    result["tokens_per_second"] = len(generation.new_token_ids) / result["seconds"]
    result["estimate"] = bytes_of(model) + estimate.needed


start = time.time()
if step == "baseline":
    jax.block_until_ready(jax.numpy.zeros(1))
    result["seconds"] = time.time() - start
elif step == "bandwidth":
    source = np.ones(2**26, np.float32)
    target = np.empty_like(source)
    np.copyto(target, source)
    start = time.time()
    for _ in range(5):
        np.copyto(target, source)
    result["seconds"] = time.time() - start
    result["bytes_per_second"] = 5 * 2 * source.nbytes / result["seconds"]  # each copy reads and writes
elif step in ("build", "save"):
    model = phi3lab.Phi3Backbone(**config, dtype="bfloat16")
    jax.block_until_ready([w.value for w in model.weights])
    result["seconds"] = time.time() - start
    result["estimate"] = result["weights"] = bytes_of(model)
    if step == "save":
        start = time.time()
        save_hf_checkpoint(model, workdir)
        result["seconds"] = time.time() - start
elif step == "load":
    model = load()
    result["seconds"] = result.pop("load_seconds")
    result["estimate"] = bytes_of(model)
elif step.startswith("trace"):
    trace(load(), int(step[len("trace"):]))
elif step == "int8_trace16":
    trace(load(quantization="int8"), 16)
elif step == "generate32":
    generate(load())
elif step == "int8_generate32":
    generate(load(quantization="int8"))
result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def run_step(step: str, workdir: Path, config: dict, env: dict) -> dict:
    """Run one step in a fresh process; its report (or the error it died with)."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, step, str(workdir), json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode:
        return {"error": f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi3_real"))
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--scale", choices=sorted(SCALES), default="real", help="model sizes (default: Phi-3-mini)")
    parser.add_argument("--json", type=Path, help="also write each step's report to this file")
    parser.add_argument("--host-memory", choices=("default", "reuse"), default="default", help="PHI3LAB_HOST_MEMORY")
    for name in ("layers", "hidden", "intermediate", "vocabulary"):
        parser.add_argument(f"--{name}", type=int, help=f"override Phi-3-mini-4k's {name} (a quick check)")
    return parser.parse_args()


def main():
    args = parse_args()
    from phi3lab.presets.registry import BUILTIN

    config = {**BUILTIN["phi3_mini_4k_instruct_en"]["config"], **SCALES[args.scale]}
    overrides = {
        "num_layers": args.layers,
        "hidden_dim": args.hidden,
        "intermediate_dim": args.intermediate,
        "vocabulary_size": args.vocabulary,
    }
    config.update({key: value for key, value in overrides.items() if value is not None})
    env = {key: value for key, value in os.environ.items() if not key.startswith("PHI3LAB_HOST_MEMORY")}
    if args.host_memory == "reuse":
        env["PHI3LAB_HOST_MEMORY"] = "reuse"
    if "save" in args.steps:
        shutil.rmtree(args.workdir, ignore_errors=True)
    sizes = ", ".join(f"{key}={config[key]}" for key in ("num_layers", "hidden_dim", "intermediate_dim"))
    sizes += f", vocabulary_size={config['vocabulary_size']}"
    settings = "on (PHI3LAB_HOST_MEMORY=reuse)" if args.host_memory == "reuse" else "off (glibc's defaults)"
    print(f"Phi-3-mini-4k architecture ({sizes}), bfloat16, phi3lab's allocator settings {settings}")
    weights = None
    rows = []
    steps = args.steps if "baseline" in args.steps else ["baseline", *args.steps]  # what each peak is above
    for step in steps:
        report = run_step(step, args.workdir, config, env)
        if step in ("build", "load") and "weights" in report:
            weights = report["weights"]  # the bfloat16 weight bytes, as the step counted them
        rows.append((step, report))
    bandwidth = dict(rows).get("bandwidth", {}).get("bytes_per_second")
    for generation in (report for step, report in rows if "tokens_per_second" in report):
        if bandwidth:
            # A greedy decode step reads every weight once: its share of the bandwidth.
            generation["bandwidth_used"] = generation["tokens_per_second"] * generation["weights"] / bandwidth
    baseline = dict(rows)["baseline"].get("peak_rss", 0)
    if args.json:
        args.json.write_text(json.dumps({"weights": weights, "steps": dict(rows)}))
    gb = lambda n: f"{n / 1e9:.2f} GB"
    print(f"weights: {gb(weights) if weights else 'unknown (run build or load)'}, baseline {gb(baseline)}\n")
    print(
        f"| step | seconds | peak RSS | above baseline | weights | x weights | estimate | x weights | notes |\n"
        f"|{'---|' * 9}"
    )
    for step, report in rows:
        if "error" in report:
            print(f"| {step} | | | | | | | | {report['error']} |")
            continue
        added = report["peak_rss"] - baseline
        own = report.get("weights", weights)  # the int8 steps: their int8 model's bytes
        times = lambda n: f"{n / own:.2f}x" if own else "?"
        notes = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in report.items()
            if k not in ("seconds", "peak_rss", "estimate", "weights")
        )
        print(
            f"| {step} | {report['seconds']:.1f} | {gb(report['peak_rss'])} | {gb(added)} | "
            f"{gb(own) if own else ''} | {times(added)} | "
            f"{gb(report['estimate']) if 'estimate' in report else ''} | "
            f"{times(report['estimate']) if 'estimate' in report else ''} | {notes} |"
        )


if __name__ == "__main__":
    main()
