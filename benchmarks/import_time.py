"""Time to `import phi3lab` against `import jax` + `import keras`, in fresh processes.

    .venv/bin/python benchmarks/import_time.py [--runs 7]

Each run starts one fresh Python process per side (alternating which goes
first) that times its imports with `time.perf_counter()` (the interpreter's
own start is left out) with `KERAS_BACKEND=jax`. Printed: the median of each
side, phi3lab / (jax + keras) (target: at most 1.3x) and, once, the modules
over 50 ms that `import phi3lab` adds to jax + keras (`-X importtime`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from _common import machine

SIDES = {
    "import jax + import keras": "import jax\nimport keras",
    "import phi3lab": "import phi3lab",
}
CHILD = "import time\nstart = time.perf_counter()\n{body}\nprint(time.perf_counter() - start)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(body: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    code = CHILD.format(body=body)
    return subprocess.run([sys.executable, *flags, "-c", code], env=env, capture_output=True, text=True, check=True)


def added_modules() -> list[tuple[float, str]]:
    """(ms, module as `-X importtime` indents it) of every import over 50 ms
    that `import phi3lab` adds after jax and keras."""
    result = run("import jax, keras, sys\nprint('--', file=sys.stderr)\nimport phi3lab", "-X", "importtime")
    rows = []
    for line in result.stderr.split("--\n", 1)[1].splitlines():
        fields = line.split("|")
        if line.startswith("import time:") and len(fields) == 3 and fields[1].strip().isdigit():
            if int(fields[1]) > 50_000:
                rows.append((int(fields[1]) / 1e3, fields[2].rstrip()))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    times = {side: [] for side in SIDES}
    for i in range(args.runs):
        order = list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
        for side in order:
            times[side].append(float(run(SIDES[side]).stdout.strip().splitlines()[-1]))
    medians = {side: statistics.median(values) for side, values in times.items()}
    for side, median in medians.items():
        spread = f"{min(times[side]):.2f}-{max(times[side]):.2f}"
        print(f"{side:28s} median {median:6.2f} s  (range {spread} s, {args.runs} fresh processes)")
    ratio = medians["import phi3lab"] / medians["import jax + import keras"]
    print(f"phi3lab / (jax + keras): {ratio:.2f}x (target <= 1.3x)")
    print("imports over 50 ms that phi3lab adds (one -X importtime run, cumulative):")
    for ms, name in added_modules():
        print(f"  {ms:8.1f} ms  {name}")


if __name__ == "__main__":
    main()
