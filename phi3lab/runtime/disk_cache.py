"""JAX's on-disk compilation cache, on by default for phi3lab's programs.

Compiled programs are written to a user cache directory, so a fresh kernel
re-running a notebook (or a new Python process tracing the same model and
shapes) loads them instead of compiling again. The cache is switched on when
phi3lab first compiles a program for a model (`compile_cache.cached`), not at
import nor while a model is built: importing phi3lab leaves JAX's configuration alone, and a process
that never runs phi3lab never writes there. JAX's setting is process-wide,
so from then on programs of the user's own that take over
`MIN_COMPILE_SECONDS` to compile are kept there too. Where:

* `PHI3LAB_CACHE_DIR`, when set; else
* `$XDG_CACHE_HOME/phi3lab/jax` or `~/.cache/phi3lab/jax` (Linux and other
  Unix), `~/Library/Caches/phi3lab/jax` (macOS),
  `%LOCALAPPDATA%\\phi3lab\\jax` (Windows).

`PHI3LAB_NO_DISK_CACHE=1` turns it off. A cache directory chosen by the user
for JAX itself (`JAX_COMPILATION_CACHE_DIR` or
`jax.config.update("jax_compilation_cache_dir", ...)` before phi3lab's
first compilation) is left as it is. Entries are keyed by JAX on the program, the
JAX/XLA versions and the device, so a stale entry is never used; deleting the
directory is always safe.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from phi3lab.runtime.env import flag

# Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = 0.1


def default_directory() -> Path:
    """The directory phi3lab stores compiled programs in (see module docs)."""
    chosen = os.environ.get("PHI3LAB_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "phi3lab" / "jax"


@functools.cache
def enable_disk_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `default_directory()`
    (once per process; later calls return the first answer).

    Returns the directory in use, or None when the cache is off
    (`PHI3LAB_NO_DISK_CACHE=1`, or the directory cannot be created). Called
    by `compile_cache.cached` before phi3lab compiles its first program for a model.

    Example:
    >>> phi3lab.runtime.disk_cache.enable_disk_cache()
    PosixPath('/home/me/.cache/phi3lab/jax')
    """
    import jax

    if flag("PHI3LAB_NO_DISK_CACHE"):
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    directory = default_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home etc.: compile as usual
    # JAX opens the directory at the first compilation after it is set, also
    # when it compiled before (building a model runs eager operations):
    # tests/test_import_effects.py checks that programs land there.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory
