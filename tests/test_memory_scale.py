"""Resident memory of a mid-size model, measured in fresh processes (issue 40):
phi3lab's estimate against the measured peak of a trace, and building,
saving, loading, tracing and generating within a multiple of the weights."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# glibc's defaults: phi3lab's opt-in allocator settings keep freed memory,
# which a warm run then reuses instead of growing.
ENV = {key: value for key, value in os.environ.items() if not key.startswith("PHI3LAB_HOST_MEMORY")}

TRACE_PEAK = textwrap.dedent("""
    import json, numpy as np, phi3lab
    from phi3lab.presets.registry import BUILTIN

    config = {**BUILTIN["phi3_mini_4k_instruct_en"]["config"], **json.loads(__import__("sys").argv[1])}
    model = phi3lab.Phi3Backbone(**config, dtype="bfloat16")
    names = ["blocks.0.attn.hook_*", "blocks.7.attn.hook_*", "hook_logits"]
    ids = np.random.default_rng(0).integers(1, model.vocabulary_size, (1, 512))
    estimate = phi3lab.estimate(model, 512, names=names)
    phi3lab.trace(model, ids, names=names)  # compiled and run once

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current size
    before = status("VmRSS")
    trace = phi3lab.trace(model, ids, names=names)
    print(json.dumps({"grown": status("VmHWM") - before, "needed": estimate.needed}))
""")

INT8_STEPS = ("int8_trace16", "int8_generate32")
MID = {"num_layers": 8, "hidden_dim": 1024, "intermediate_dim": 2816, "vocabulary_size": 8192}


@pytest.mark.slow
def test_trace_estimate_within_a_quarter_of_the_measured_peak():
    """8 layers of width 1024 in bfloat16, 512 tokens, every attention
    capture of two layers and the logits: the growth of the process's peak
    resident memory during the trace is within 25% of what
    `phi3lab.estimate` says it needs (XLA's temporaries plus the captures)."""
    result = subprocess.run(
        [sys.executable, "-c", TRACE_PEAK, json.dumps(MID)], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["needed"] > 100 * 2**20  # the captures alone are ~150 MiB
    assert abs(measured["grown"] / measured["needed"] - 1) <= 0.25, measured


def _report(scale: str, workdir: Path) -> dict:
    """`benchmarks/real_size.py --scale scale`'s report (each step in a fresh process)."""
    out = workdir / f"{scale}.json"
    steps = ["baseline", "build", "save", "load", "trace16", "generate32", *INT8_STEPS]
    command = [sys.executable, str(ROOT / "benchmarks" / "real_size.py"), "--scale", scale]
    command += ["--workdir", str(workdir / scale), "--json", str(out), "--steps", *steps]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    errors = {step: r["error"] for step, r in report["steps"].items() if "error" in r}
    assert not errors, errors
    return report


@pytest.mark.slow
def test_each_step_grows_with_the_weights_within_the_targets(tmp_path):
    """Build, save (Hugging Face safetensors), load, a 16-token trace and 32
    generated tokens: the peak resident memory each step adds per byte of
    weights, measured as the difference between the mid-size model (0.24 GB
    of bfloat16 weights) and the same architecture at an eighth of its width
    (4 MB), which runs the same programs: what stays at a size is the
    libraries and the compiled programs, what grows is the weights and the
    copies made of them. Targets of issue 40: 1.5x the weights, 1.2x for loading.

    The trace and generation of the model loaded with int8 kernels
    (quantized while read), per byte of the int8 weights, stay within 40% of
    what phi3lab's estimate (weights plus working set) says, grown the same
    way (measured 1.16-1.28x the estimate over runs: the int8 weights are
    0.12 GB, so the compiler's own memory moves the ratio by tenths). At
    this depth one layer's dequantized kernels are an eighth of the model
    (at Phi-3-mini's 32 layers a thirty-second), so the estimate itself
    is 1.3x (trace) and 1.6x (generation) here; loading the bfloat16
    weights whole and quantizing after made the trace 2.8x."""
    tiny, mid = _report("tiny", tmp_path), _report("mid", tmp_path)
    assert mid["weights"] - tiny["weights"] > 0.2e9

    def per_weight_byte(step: str, key: str) -> float:
        grown = [report["steps"][step][key] - report["steps"]["baseline"].get(key, 0) for report in (tiny, mid)]
        weights = [report["steps"][step]["weights"] for report in (tiny, mid)]
        return (grown[1] - grown[0]) / (weights[1] - weights[0])

    ratios = {step: per_weight_byte(step, "peak_rss") for step in ("build", "save", "load", "trace16", "generate32")}
    shown = {step: round(ratio, 3) for step, ratio in ratios.items()}  # whole in the message
    assert all(ratio <= (1.2 if step == "load" else 1.5) for step, ratio in ratios.items()), shown
    int8 = {step: (per_weight_byte(step, "peak_rss"), per_weight_byte(step, "estimate")) for step in INT8_STEPS}
    assert all(measured <= 1.4 * estimated for measured, estimated in int8.values()), int8
