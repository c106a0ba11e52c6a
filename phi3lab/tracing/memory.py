"""How much memory a trace needs, measured by XLA before anything runs."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from phi3lab.runtime.host_memory import release_freed_memory


class CaptureTooLarge(ValueError):
    """A run that would not fit in the memory available.

    Attributes:
        estimate: the `MemoryEstimate` it was refused with (None when unknown).
    """

    def __init__(self, message: str, estimate: "MemoryEstimate | None" = None):
        super().__init__(message)
        self.estimate = estimate


class WeightsTooLarge(ValueError):
    """A model whose weights would not fit in the memory available."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a trace needs.

    Attributes:
        weights: the model's weights (already resident).
        working: XLA's temporary buffers while the program runs.
        captured: the returned activations (on the device, then copied to
            the host as NumPy arrays; on CPU the NumPy arrays are views of
            the device's, no copy).
        available: bytes free on the device (or the budget given).
    """

    weights: int
    working: int
    captured: int
    available: int | None = None

    @property
    def needed(self) -> int:
        """New memory the run needs: working set plus captures on device and
        host (once on CPU: a mid-size bfloat16 trace of 512 tokens measured
        213 MiB of peak resident growth against 67 + 149 MiB estimated)."""
        return self.working + _capture_copies() * self.captured

    def __str__(self):
        gib = lambda n: f"{n / 2**30:.2f} GiB"
        text = (
            f"weights {gib(self.weights)}, working set {gib(self.working)}, "
            f"captured activations {gib(self.captured)}"
            + (" (x2 with the host copy)" if _capture_copies() == 2 else "")
        )
        if self.available is not None:
            text += f", available {gib(self.available)}"
        return text


def _capture_copies() -> int:
    """Copies of the captures a run leaves: 1 on CPU (`np.asarray` of a CPU
    array is a view of it), 2 elsewhere (device and host)."""
    return 1 if jax.default_backend() == "cpu" else 2


def available_bytes(device=None) -> int:
    """Free memory of `device` (default: the first JAX device)."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not report statistics
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    import psutil

    return int(psutil.virtual_memory().available)


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def measure(program, params) -> MemoryEstimate:
    """Estimate from a program compiled ahead of time (a
    `compile_cache.Program`, not yet run) and the weights it runs with."""
    return MemoryEstimate(weights=tree_bytes(params), working=program.temporary_bytes, captured=program.output_bytes)


def _available_after_release(needed: int) -> int:
    """Free memory; if `needed` exceeds it, the freed memory this process
    keeps for reuse (`phi3lab.runtime.host_memory`) is given back and it is read again."""
    available = available_bytes()
    if needed > available:
        release_freed_memory()
        available = available_bytes()
    return available


def check_weights_fit(weights: int, what: str) -> None:
    """Raise `WeightsTooLarge` if `weights` bytes (described by `what`, e.g.
    "3,821,079,552 parameters in bfloat16") exceed the device's free memory."""
    available = _available_after_release(weights)
    if weights > available:
        raise WeightsTooLarge(
            f"This model's weights need {weights / 2**30:.2f} GiB ({what}); only {available / 2**30:.2f} GiB "
            "is available, so nothing was allocated. Load it in a narrower dtype (dtype='bfloat16'), free "
            "memory, or use a machine with more."
        )


TRACE_ADVICE = (
    "Capture less: fewer names (e.g. names=['blocks.3.attn.hook_pattern']), only some heads (heads=[0, 1]), "
    "a query window (queries=slice(-64, None)), a shorter input, or load the model in bfloat16 (dtype='bfloat16')."
)


def check_fits(
    estimate: MemoryEstimate, budget: int | None, what: str = "This trace", advice: str | None = None
) -> MemoryEstimate:
    """Raise `CaptureTooLarge` if the run would not fit `budget` (default:
    the device's free memory); return the estimate with `available` set.
    The message starts with `what` (e.g. "These gradients") and ends with
    `advice` (default: how to capture less in a trace).
    Before refusing for want of free memory, the freed memory this process
    keeps (`phi3lab.runtime.host_memory`: up to what its largest run used
    after `configure(host_memory="reuse")`, glibc's trimmable free pages
    otherwise) is given back and the free memory read again."""
    available = budget if budget is not None else _available_after_release(estimate.needed)
    estimate = dataclasses.replace(estimate, available=available)
    if estimate.needed > available:
        raise CaptureTooLarge(
            f"{what} would need {estimate.needed / 2**30:.2f} GiB ({estimate}); "
            f"only {available / 2**30:.2f} GiB is available"
            + (f" (memory_budget={budget})" if budget is not None else "")
            + ". "
            + (TRACE_ADVICE if advice is None else advice),
            estimate,
        )
    return estimate
