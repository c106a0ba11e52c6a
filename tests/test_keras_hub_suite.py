"""keras-hub's own backbone test helpers pass on phi3lab's `Phi3Backbone`.

keras-hub's `TestCase` (`run_backbone_test`, `run_quantization_test`,
`run_model_saving_test`) is the oracle: keras-hub's checks of config and
serialization round trips, compiled and tf.data calls, mixed precision,
DTypePolicyMap quantization and `.keras` saving, with the constructor
arguments and inputs of keras-hub's Phi-3 backbone test. It imports
TensorFlow and grain, which `make install` puts in a side folder
(`.venv/keras-hub-suite`) instead of the venv; the cases
(`keras_hub_suite/phi3_backbone_cases.py`) run in a subprocess that alone
has that folder on its `PYTHONPATH`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require, unavailable

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "keras_hub_suite" / "phi3_backbone_cases.py"
SUITE = Path(sys.prefix) / "keras-hub-suite"
INSTALL = "`make install` (it installs TensorFlow and grain into .venv/keras-hub-suite)"
EXPECTED_TESTS = 7  # the cases file's 6 tests, plus tf.test.TestCase's own `test_session`


@pytest.mark.slow
def test_keras_hub_backbone_helpers_pass_on_phi3lab():
    require("keras_hub")
    if not all((SUITE / package).is_dir() for package in ("tensorflow", "grain")):
        unavailable(f"TensorFlow and grain are not installed in {SUITE}", INSTALL)
    environment = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUITE)]),
        "PHI3LAB_KERAS_HUB_SUITE": str(SUITE),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    result = subprocess.run(
        [sys.executable, str(CASES)], env=environment, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    ran = re.search(r"^Ran (\d+) tests?", report, re.MULTILINE)
    assert ran and int(ran.group(1)) == EXPECTED_TESTS, report[-3000:]
    assert re.search(r"^OK$", report, re.MULTILINE), report[-3000:]  # no skips, no expected failures
