"""phi3lab.runtime.host_memory: with `phi3lab.runtime.configure(host_memory="reuse")`
repeated traces reuse freed host memory instead of faulting in fresh pages,
and the memory guard gives that memory back before it refuses a request.
(That importing phi3lab alone leaves the allocator alone is in
test_import_effects.py.)"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import phi3lab
from phi3lab.tracing import memory

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)

# A fresh process (asking for phi3lab's settings through PHI3LAB_HOST_MEMORY,
# so they bind before any library starts its threads, or not) traces a
# 4-layer model at T=512 (16 MiB attention maps per layer and kind; with
# bfloat16 maps the float32 ones are 128 MiB of temporaries) a few times,
# then counts the minor page faults of seven more rounds: the median (the
# heap of a process that keeps its memory still grows now and then, when
# fragmentation asks for more).
_FAULTS_PER_TRACE = """
import json, resource, sys
import numpy as np
import phi3lab
from phi3lab.model import Phi3Backbone
from phi3lab.runtime import host_memory

model = Phi3Backbone(vocabulary_size=128, num_layers=4, hidden_dim=128, intermediate_dim=256,
                     num_query_heads=16, num_key_value_heads=16, max_sequence_length=1024)
ids = np.random.default_rng(0).integers(0, 128, (1, 512))
calls = [lambda: phi3lab.trace(model, ids), lambda: phi3lab.trace(model, ids, capture_dtype="bfloat16")]
pages = sum(tr[name].nbytes for tr in (call() for call in calls) for name in tr.names) / 4096
for _ in range(3):
    for call in calls:
        call()
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for call in calls:
        call()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": sorted(faults)[3], "pages": pages, "kept": host_memory.keeps_freed_memory(),
                  "arenas": host_memory.arena_count()}))
"""


def _run(code: str, *args: str, **env) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PHI3LAB_HOST_MEMORY")}, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _faults_per_captured_page(**env) -> tuple[float, dict]:
    counts = _run(_FAULTS_PER_TRACE, **env)
    return counts["faults"] / counts["pages"], counts


@glibc_only
def test_repeated_traces_reuse_freed_memory_instead_of_faulting_in_pages():
    """With glibc's defaults (phi3lab imported, nothing asked) every call
    faults in fresh pages for a share of its captures and temporaries (the
    kernel zeroes each one); with PHI3LAB_HOST_MEMORY=reuse the freed pages of
    the last call are reused, so almost none are: the settings were made
    before any thread took an arena of its own."""
    kept, report = _faults_per_captured_page(PHI3LAB_HOST_MEMORY="reuse")
    assert report["kept"] is True and report["arenas"] == 1, report
    default, report = _faults_per_captured_page()
    assert report["kept"] is False, report
    assert kept < 0.05, f"{kept:.3f} page faults per captured page with freed memory kept"
    assert default > 0.3 and default > 10 * kept, (default, kept)


# A fresh process loads a 4-layer model with 75 MB of weights from a
# checkpoint and reports how much its resident memory grew.
_RESIDENT_GROWTH_OF_LOADING = """
import gc, json, sys
import psutil
import phi3lab

before = psutil.Process().memory_info().rss
model = phi3lab.Phi3Backbone.from_preset(sys.argv[1])
gc.collect()
print(json.dumps({"grown": psutil.Process().memory_info().rss - before}))
"""


@glibc_only
def test_loading_a_checkpoint_keeps_no_more_memory_than_glibcs_defaults(tmp_path):
    """Reading a checkpoint frees large buffers that a process keeping its
    freed memory would hold on to (a fifth of the weights here); `from_preset`
    gives them back, so loading leaves as much resident as with glibc's
    defaults."""
    from phi3lab.presets.hf_format import save_checkpoint

    model = phi3lab.Phi3Backbone(
        vocabulary_size=8192,
        num_layers=4,
        hidden_dim=512,
        intermediate_dim=1024,
        num_query_heads=8,
        num_key_value_heads=8,
    )
    save_checkpoint(model, tmp_path)
    weights = sum(w.numpy().nbytes for w in model.weights)
    kept = _run(_RESIDENT_GROWTH_OF_LOADING, str(tmp_path), PHI3LAB_HOST_MEMORY="reuse")["grown"]
    default = _run(_RESIDENT_GROWTH_OF_LOADING, str(tmp_path))["grown"]
    assert kept <= default + 0.1 * weights, (kept, default, weights)


def test_host_memory_reuse_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PHI3LAB_NO_HOST_MEMORY_REUSE", "1")
    assert phi3lab.runtime.configure(host_memory="reuse") == {"host_memory": False}
    assert phi3lab.runtime.host_memory.keep_freed_memory() is False
    assert phi3lab.runtime.host_memory.keeps_freed_memory() is False


def test_configure_refuses_an_unknown_setting():
    with pytest.raises(
        ValueError, match=r"`host_memory` must be one of \('reuse',\) or None; received host_memory='keep'"
    ):
        phi3lab.runtime.configure(host_memory="keep")
    assert phi3lab.runtime.configure() == {}


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
