"""Real-size smoke: phi3-mini-4k's architecture with random bfloat16 weights.

    .venv/bin/python benchmarks/real_size.py [--workdir /tmp/phi3_real]

1. builds `phi3_mini_4k_instruct_en`'s architecture (3.8B parameters) in
   bfloat16 with random weights and saves it in the Hugging Face layout
   (sharded safetensors);
2. in a fresh process, loads it with `Phi3Backbone.from_preset(dir,
   dtype="bfloat16")`, measuring the peak resident memory against the weight
   bytes (goal: at most 1.2x);
3. traces a short prompt (patterns of two layers and the logits).
Needs about 8 GB of disk and 10 GB of memory.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

LOAD = r"""
import json, resource, sys, time
import numpy as np
import phi3lab
start = time.time()
model = phi3lab.Phi3Backbone.from_preset(sys.argv[1], dtype="bfloat16")
load_seconds = time.time() - start
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(int(np.prod(v.shape)) * 2 for v in model.weights)
start = time.time()
names = ["blocks.0.attn.hook_pattern", "blocks.31.attn.hook_pattern", "hook_logits"]
tr = phi3lab.trace(model, np.arange(1, 17)[None], names=names)
print(json.dumps({"weights_bytes": weights, "peak_rss_after_load": peak_load, "load_seconds": round(load_seconds, 1),
                  "trace_seconds": round(time.time() - start, 1), "logits_finite": bool(np.isfinite(tr.logits).all()),
                  "pattern_rows_sum_to_one": bool(np.allclose(tr.attention(31).sum(-1), 1, atol=1e-2))}))
"""


BUILD = r"""
import json, sys, time
import phi3lab
from phi3lab.presets import save_hf_checkpoint
from phi3lab.presets.registry import BUILTIN
start = time.time()
model = phi3lab.Phi3Backbone(**{**BUILTIN["phi3_mini_4k_instruct_en"]["config"], "dtype": "bfloat16"})
build = time.time() - start
start = time.time()
save_hf_checkpoint(model, sys.argv[1])
print(json.dumps({"build_seconds": round(build, 1), "save_seconds": round(time.time() - start, 1)}))
"""


def run(script: str, workdir: Path) -> dict:
    """Run `script` in a fresh process (so each step's memory is its own)."""
    result = subprocess.run([sys.executable, "-c", script, str(workdir)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"step failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi3_real"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    report = run(BUILD, args.workdir)
    report.update(run(LOAD, args.workdir))
    report["peak_over_weights"] = round(report["peak_rss_after_load"] / report["weights_bytes"], 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
