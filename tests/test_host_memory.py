"""phi3lab.host_memory: repeated traces reuse freed host memory instead of
faulting in fresh pages, and the memory guard gives that memory back before
it refuses a request."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import phi3lab
from phi3lab.tracing import memory

# A fresh process (the allocator settings bind before JAX starts its threads)
# traces a 4-layer model at T=512 (16 MiB attention maps per layer and kind)
# a few times, then counts the minor page faults of five more calls.
_FAULTS_PER_TRACE = """
import json, resource
import numpy as np
import phi3lab
from phi3lab.model import Phi3Backbone

model = Phi3Backbone(vocabulary_size=128, num_layers=4, hidden_dim=128, intermediate_dim=256,
                     num_query_heads=16, num_key_value_heads=16, max_sequence_length=1024)
ids = np.random.default_rng(0).integers(0, 128, (1, 512))
tr = phi3lab.trace(model, ids)
pages = sum(tr[name].nbytes for name in tr.names) / 4096
del tr
for _ in range(3):
    phi3lab.trace(model, ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    phi3lab.trace(model, ids)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"faults": faults, "pages": pages}))
"""


def _faults_per_captured_page(**env) -> float:
    result = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_TRACE],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    return counts["faults"] / counts["pages"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_repeated_traces_reuse_freed_memory_instead_of_faulting_in_pages():
    """With glibc's defaults every call faults in a share of its captures'
    pages afresh (the kernel zeroes each one); with phi3lab's settings the
    freed pages of the last call are reused, so almost none are."""
    kept = _faults_per_captured_page()
    default = _faults_per_captured_page(PHI3LAB_NO_HOST_MEMORY_REUSE="1")
    assert kept < 0.02, f"{kept:.3f} page faults per captured page with freed memory kept"
    assert default > 0.05 and default > 5 * kept, (default, kept)


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PHI3LAB_NO_HOST_MEMORY_REUSE", "1")
    assert phi3lab.host_memory.keep_freed_memory() is False


def _estimate(needed: int) -> memory.MemoryEstimate:
    return memory.MemoryEstimate(weights=0, working=needed, captured=0)


def test_guard_gives_back_kept_memory_before_refusing(monkeypatch):
    """A request that does not fit the free memory first makes the process
    give back the freed memory it keeps, then is judged on the free memory
    read again: it runs when that suffices and is refused when it does not."""
    free = {"bytes": 100}
    released = []

    def release():
        released.append(True)
        free["bytes"] = 1_000

    monkeypatch.setattr(memory, "available_bytes", lambda: free["bytes"])
    monkeypatch.setattr(memory, "release_freed_memory", release)

    assert memory.check_fits(_estimate(50), None).available == 100
    assert released == []  # it fitted: nothing given back
    assert memory.check_fits(_estimate(500), None).available == 1_000
    assert released == [True]
    with pytest.raises(memory.CaptureTooLarge, match="would need"):
        memory.check_fits(_estimate(5_000), None)
    assert len(released) == 2
    with pytest.raises(memory.CaptureTooLarge, match="memory_budget=10"):
        memory.check_fits(_estimate(50), 10)  # an explicit budget is the user's: nothing given back
    assert len(released) == 2
