"""`configure()`: the process-wide settings phi3lab makes only when asked."""

from __future__ import annotations

from phi3lab.errors import bad_argument
from phi3lab.runtime.host_memory import keep_freed_memory

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
            `docs/design.md`). Call it right after importing phi3lab,
            before the first computation. `PHI3LAB_NO_HOST_MEMORY_REUSE=1`
            turns it off; nothing happens where the C library is not glibc.
            None leaves the allocator as it is.

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
        applied["host_memory"] = keep_freed_memory()
    return applied
