"""Hook points, the `trace()` entry, the `Trace` result and interventions."""

from phi3lab.tracing.names import all_names, block_name
from phi3lab.tracing.result import Trace
from phi3lab.tracing.memory import CaptureTooLarge, MemoryEstimate
from phi3lab.tracing.trace import compiled_count, estimate, trace

__all__ = ["CaptureTooLarge", "MemoryEstimate", "Trace", "all_names", "block_name", "compiled_count", "estimate", "trace"]
