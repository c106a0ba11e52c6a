"""Hook points, the `trace()` entry, the `Trace` result and interventions.

Public names: `trace`, `Trace`, `estimate`, `forward_fn` (the pure,
differentiable forward every run goes through), `gradients` and
`GradientTrace` (d metric / d activation at hook points), `all_names`, `block_name`,
`compiled_count`, `CaptureTooLarge`, `WeightsTooLarge`, `MemoryEstimate`. Interventions are in
`phi3lab.hooks`.
"""

from phi3lab.tracing.forward import ForwardFn, ForwardOutput, forward_fn
from phi3lab.tracing.gradient_trace import GradientTrace, gradients
from phi3lab.tracing.memory import CaptureTooLarge, MemoryEstimate, WeightsTooLarge
from phi3lab.tracing.names import all_names, block_name
from phi3lab.tracing.result import Trace
from phi3lab.tracing.tracer import compiled_count, estimate, trace

__all__ = [
    "CaptureTooLarge",
    "ForwardFn",
    "ForwardOutput",
    "GradientTrace",
    "MemoryEstimate",
    "Trace",
    "WeightsTooLarge",
    "all_names",
    "block_name",
    "compiled_count",
    "estimate",
    "forward_fn",
    "gradients",
    "trace",
]
