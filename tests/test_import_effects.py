"""Importing phi3lab changes nothing process-wide the user did not ask for: no
allocator settings, no JAX backend started, no widgets (plotly, ipywidgets)
imported, JAX's on-disk cache untouched until phi3lab compiles; a keras on
another backend gets a clear error; the modules that moved keep their old
import paths with a DeprecationWarning. Each check runs in a fresh process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A fresh process imports phi3lab and reports what that import did, then uses
# the lazy parts and the opt-in. `mmapped_blocks(n)`: how many blocks of their
# own glibc maps while `n` bytes are allocated, read from `mallinfo2().hblks`;
# a 64 MiB block is mapped under glibc's defaults (the mmap threshold is 32 MiB
# at most) and comes from the heap under phi3lab's settings (`M_MMAP_MAX` 0).
_FRESH_IMPORT = """
import ctypes, json, os, sys, warnings

def mmapped_blocks(size):
    if not {glibc}:
        return None
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    during = libc.mallinfo2().hblks
    libc.free(block)
    return during - before

report = {{"plain python": mmapped_blocks(64 << 20)}}
import phi3lab
import jax
from jax._src import xla_bridge

report["after import"] = mmapped_blocks(64 << 20)
report["backends started"] = xla_bridge.backends_are_initialized()
report["heavy modules"] = sorted(m for m in ("plotly", "ipywidgets", "anywidget", "nbformat", "jsonschema",
                                             "phi3lab.widgets", "torch", "transformers") if m in sys.modules)
report["cache dir at import"] = jax.config.jax_compilation_cache_dir
report["widgets"] = phi3lab.widgets.HeadGrid.__module__
report["plotly after widgets"] = "plotly" in sys.modules

phi3lab.runtime.disk_cache.MIN_COMPILE_SECONDS = 0  # keep every program, however quick
model = phi3lab.Phi3Backbone(vocabulary_size=32, num_layers=1, hidden_dim=16, intermediate_dim=32,
                             num_query_heads=2, num_key_value_heads=1)
report["cache dir after building"] = jax.config.jax_compilation_cache_dir
phi3lab.trace(model, [1, 2, 3], names="hook_logits")
report["cache dir after trace"] = jax.config.jax_compilation_cache_dir
report["cache files"] = sum(len(files) for _, _, files in os.walk(os.environ["PHI3LAB_CACHE_DIR"]))

os.environ["PHI3LAB_NO_HOST_MEMORY_REUSE"] = "1"  # the off switch wins over the request
report["switched off"] = phi3lab.runtime.configure(host_memory="reuse")
report["after switched off"] = mmapped_blocks(64 << 20)
del os.environ["PHI3LAB_NO_HOST_MEMORY_REUSE"]
report["arenas before configure"] = phi3lab.runtime.host_memory.arena_count()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    report["configured"] = phi3lab.runtime.configure(host_memory="reuse")
report["configure warned"] = [str(w.message) for w in caught]
report["after configure"] = mmapped_blocks(64 << 20)
print(json.dumps(report))
"""


def _run(code: str, *args: str, check: bool = True, **env) -> subprocess.CompletedProcess:
    chosen = ("KERAS_BACKEND", "PHI3LAB_NO_HOST_MEMORY_REUSE", "PHI3LAB_HOST_MEMORY")
    base = {k: v for k, v in os.environ.items() if k not in chosen}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def _report(code: str, **env) -> dict:
    return json.loads(_run(code, **env).stdout.strip().splitlines()[-1])


def test_import_leaves_the_process_alone_until_asked(tmp_path):
    report = _report(_FRESH_IMPORT.format(glibc=GLIBC), PHI3LAB_CACHE_DIR=str(tmp_path))
    assert report["backends started"] is False
    assert report["heavy modules"] == []
    assert report["widgets"] == "phi3lab.widgets.head_grid" and report["plotly after widgets"] is True
    # JAX's on-disk cache: untouched by import and by the eager operations
    # that build a model, on at phi3lab's first compile, and in use although
    # JAX had already compiled (and decided on its cache) before.
    assert report["cache dir at import"] is None and report["cache dir after building"] is None
    assert report["cache dir after trace"] == str(tmp_path)
    assert report["cache files"] > 0
    # The allocator: glibc's defaults after import (a 64 MiB block mapped
    # on its own, as in a plain python), phi3lab's settings only on request.
    if GLIBC:
        assert report["plain python"] == report["after import"] == 1, report
        assert report["switched off"] == {"host_memory": False} and report["after switched off"] == 1, report
        assert report["configured"] == {"host_memory": True} and report["after configure"] == 0, report
        # Importing phi3lab imported pandas, whose pyarrow threads took an arena of their
        # own: configure says the effect is partial (PHI3LAB_HOST_MEMORY gives all of it).
        assert report["arenas before configure"] > 1
        (warned,) = report["configure warned"]
        assert warned.startswith("host_memory='reuse' is set, but this process already has") and (
            "set PHI3LAB_HOST_MEMORY=reuse before importing phi3lab" in warned
        ), warned


_FIX = 'os.environ["KERAS_BACKEND"] = "jax"'


def test_an_unknown_host_memory_request_is_a_clear_error():
    result = _run("import phi3lab", check=False, PHI3LAB_HOST_MEMORY="keep")
    assert result.returncode != 0
    assert "`PHI3LAB_HOST_MEMORY` must be one of ('reuse',) or unset; received PHI3LAB_HOST_MEMORY='keep'" in (
        result.stderr
    )


def test_keras_imported_first_on_another_backend_is_a_clear_error():
    """A notebook that imported keras before phi3lab (here on keras' NumPy
    backend; on Colab it would be TensorFlow) cannot switch it: phi3lab says
    what to do instead of failing later inside JAX code."""
    result = _run("import keras, phi3lab", check=False, KERAS_BACKEND="numpy")
    assert result.returncode != 0
    assert "KerasBackendError" in result.stderr
    assert "keras was imported before phi3lab and runs on the 'numpy' backend" in result.stderr
    assert _FIX in result.stderr and "restart the kernel" in result.stderr


def test_another_backend_in_the_environment_is_a_clear_error():
    result = _run("import phi3lab", check=False, KERAS_BACKEND="torch")
    assert result.returncode != 0
    assert "KERAS_BACKEND='torch' is set; phi3lab needs Keras on JAX" in result.stderr
    assert _FIX in result.stderr


_OLD_PATHS = """
import json, warnings
import keras  # first, on JAX: fine
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import phi3lab
assert not caught, [str(w.message) for w in caught]
report = {"keras backend": keras.config.backend()}
with warnings.catch_warnings(record=True) as caught:
    import phi3lab.compile_cache
    from phi3lab.tokenizer import Phi3Tokenizer
    from phi3lab.tokenizer_training import train_sentencepiece
    from phi3lab import host_memory
    set_limit = phi3lab.disk_cache.enable_disk_cache
report["warnings"] = [(w.category.__name__, str(w.message), w.filename) for w in caught]
report["same modules"] = [
    phi3lab.compile_cache is phi3lab.runtime.compile_cache,
    Phi3Tokenizer is phi3lab.Phi3Tokenizer,
    train_sentencepiece.__module__ == "phi3lab.tokenization.training",
    host_memory is phi3lab.runtime.host_memory,
    set_limit is phi3lab.runtime.disk_cache.enable_disk_cache,
]
report["own spec"] = phi3lab.runtime.compile_cache.__spec__.name
print(json.dumps(report))
"""


def test_moved_modules_keep_their_old_paths_with_a_warning():
    """(In a process that imported keras on JAX before phi3lab, which is fine.)"""
    report = _report(_OLD_PATHS, KERAS_BACKEND="jax")
    assert report["keras backend"] == "jax"
    assert report["same modules"] == [True] * 5
    assert report["own spec"] == "phi3lab.runtime.compile_cache"
    moved = [
        ("compile_cache", "runtime.compile_cache"),
        ("tokenizer", "tokenization.tokenizer"),
        ("tokenizer_training", "tokenization.training"),
        ("host_memory", "runtime.host_memory"),
        ("disk_cache", "runtime.disk_cache"),
    ]
    assert [(category, filename) for category, _, filename in report["warnings"]] == [
        ("DeprecationWarning", "<string>")
    ] * len(moved)  # each names the user's line, not the import machinery
    for (old, new), (_, message, _) in zip(moved, report["warnings"]):
        assert message.startswith(f"`phi3lab.{old}` moved to `phi3lab.{new}`; import `phi3lab.{new}` instead")


ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "tests" / "browser").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_sets_the_keras_backend_before_any_import(path):
    """A kernel may have imported keras already (Colab's does on some images);
    each notebook's first code lines choose JAX before anything imports it,
    and notebooks are kept without outputs."""
    cells = [cell for cell in json.loads(path.read_text())["cells"] if cell["cell_type"] == "code"]
    lines = [line.strip() for line in "".join(cells[0]["source"]).splitlines()]
    code = [line for line in lines if line and not line.startswith("#")]
    assert code[:2] == ["import os", 'os.environ.setdefault("KERAS_BACKEND", "jax")'], code[:3]
    assert all(not cell.get("outputs") for cell in cells)
