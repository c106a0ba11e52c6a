"""`configure()`: the process-wide settings phi3lab makes only when asked."""

from __future__ import annotations

import os
import warnings

from phi3lab.errors import bad_argument
from phi3lab.runtime.host_memory import arena_count, keep_freed_memory

_HOST_MEMORY = ("reuse",)


def configure(*, host_memory: str | None = None) -> dict:
    """Opt in to process-wide settings that speed phi3lab up.

    Importing phi3lab changes nothing process-wide; these settings hold for
    everything running in the process, so they are made only here.

    Args:
        host_memory: `"reuse"`: glibc keeps the host memory that a run frees
            for the next run, instead of handing it back to the system and
            faulting in fresh pages (one arena, no mmapped blocks, 2 GiB of
            free heap kept; see `phi3lab.runtime.host_memory`). A full trace
            of a 12-layer model at T=512 on CPU then faults no pages, and
            runs faster when pages are slow to fault in (numbers in
            `docs/design.md`). Threads that already have a malloc arena
            keep it (importing pandas starts some), so the whole effect
            needs the settings before those imports: set
            `PHI3LAB_HOST_MEMORY=reuse` before importing phi3lab (it then
            calls this first thing); called later it warns that the effect
            is partial. `PHI3LAB_NO_HOST_MEMORY_REUSE=1` turns it off;
            nothing happens where the C library is not glibc. None leaves
            the allocator as it is.

    Returns:
        A dict of what took effect: `{"host_memory": True}` when glibc now
        keeps freed memory.

    Example:
    >>> import phi3lab
    >>> phi3lab.runtime.configure(host_memory="reuse")
    {'host_memory': True}
    """
    applied = {}
    if host_memory is not None:
        if host_memory not in _HOST_MEMORY:
            raise bad_argument("host_memory", host_memory, f"one of {_HOST_MEMORY} or None")
        arenas = arena_count()
        applied["host_memory"] = keep_freed_memory()
        if applied["host_memory"] and arenas > 1:
            warnings.warn(
                f"host_memory='reuse' is set, but this process already has {arenas} malloc arenas (threads of "
                "libraries imported before, e.g. pyarrow through pandas), which keep handing freed memory back: "
                "part of the effect. For all of it set PHI3LAB_HOST_MEMORY=reuse before importing phi3lab "
                "(in a notebook: os.environ['PHI3LAB_HOST_MEMORY'] = 'reuse' in the first cell, before any import).",
                RuntimeWarning,
                stacklevel=2,
            )
    return applied


def configure_from_environment() -> dict:
    """`configure()` with the settings the environment asks for:
    `PHI3LAB_HOST_MEMORY=reuse`. Called first thing when phi3lab is imported.

    Example:
    >>> os.environ["PHI3LAB_HOST_MEMORY"] = "reuse"   # before `import phi3lab`
    """
    host_memory = os.environ.get("PHI3LAB_HOST_MEMORY") or None
    if host_memory not in (None, *_HOST_MEMORY):
        raise bad_argument("PHI3LAB_HOST_MEMORY", host_memory, f"one of {_HOST_MEMORY} or unset")
    return configure(host_memory=host_memory)
