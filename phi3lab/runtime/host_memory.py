"""Host memory that repeated runs reuse instead of faulting in afresh, on request.

On CPU, every buffer of a compiled program (its outputs, its temporaries) and
every NumPy copy of a capture comes from the C library's `malloc`. With
glibc's defaults a large freed block goes back to the operating system (a
block above the mmap threshold is unmapped, the free top of the heap is
trimmed, the heaps of the other threads' arenas are shrunk), so the next call
of the same program receives fresh pages, which the kernel faults in and
zeroes one 4 KiB page at a time. A full trace of the 12-layer benchmark model
at T=512 (733 MB of captures) took 140,000 page faults and 0.76 s of kernel
CPU per call that way, half again the forward it captures
(`benchmarks/host_memory.py`).

`keep_freed_memory()` tells glibc to keep freed memory for the next
allocation:

* one arena for every thread (`M_ARENA_MAX` 1), so the blocks JAX's worker
  threads free are the ones its next call allocates;
* every block comes from the heap, none from a mapping of its own
  (`M_MMAP_MAX` 0; glibc's mmap threshold can be raised to 32 MiB at most,
  and one layer's attention map of Phi-3-mini at T=512 is 32 MiB);
* up to 2 GiB of free memory at the top of the heap is kept
  (`M_TRIM_THRESHOLD`).

These settings hold for the whole process (torch, pandas, everything else
in it), so phi3lab never makes them on its own. Ask for them with
`PHI3LAB_HOST_MEMORY=reuse` in the environment, which `import phi3lab` reads
before it imports anything that starts threads, or with
`phi3lab.runtime.configure(host_memory="reuse")`. The arena setting binds
only threads that have no arena yet, and importing pandas (which keras and
phi3lab do) starts pyarrow's, which keep one: after that the settings give
part of the effect (a full trace of the 12-layer benchmark model at T=512
faulted 12-42k pages per call against 45k with glibc's defaults and 0 with
the settings made first), and `configure` says so. The price is memory that stays with the process
after its arrays are freed, at most what its largest run used.
`release_freed_memory()` gives it back; the memory guard
(`phi3lab.tracing.memory.check_fits`) does so before it refuses a request,
and `from_preset` after reading a checkpoint. `PHI3LAB_NO_HOST_MEMORY_REUSE=1`
turns the request off (glibc's defaults stay). Where the C library is not
glibc (macOS, Windows, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import platform

from phi3lab.runtime.env import flag

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _glibc():
    """The process's glibc, or None where the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_kept = False  # whether keep_freed_memory() changed glibc's settings in this process


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docs); what
    `phi3lab.runtime.configure(host_memory="reuse")` does.

    Returns True when the settings took effect; False with
    `PHI3LAB_NO_HOST_MEMORY_REUSE=1` or a C library other than glibc.

    Example:
    >>> phi3lab.runtime.host_memory.keep_freed_memory()
    True
    """
    global _kept
    if flag("PHI3LAB_NO_HOST_MEMORY_REUSE"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    _kept = all(libc.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
    return _kept


def keeps_freed_memory() -> bool:
    """Whether this process runs with the settings of `keep_freed_memory()`."""
    return _kept


def arena_count() -> int | None:
    """How many malloc arenas glibc has made in this process so far (from
    `malloc_info`); None where the C library is not glibc. More than one
    before `keep_freed_memory()` means threads that keep their own arena
    (importing pandas makes one: pyarrow's threads)."""
    libc = _glibc()
    if libc is None:
        return None
    libc.open_memstream.restype = ctypes.c_void_p
    text, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = ctypes.c_void_p(libc.open_memstream(ctypes.byref(text), ctypes.byref(size)))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    count = text.value.decode().count("<heap nr=")
    libc.free(text)
    return count


def release_freed_memory() -> None:
    """Give the freed memory this process keeps back to the operating system
    (glibc's `malloc_trim`); nothing where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
