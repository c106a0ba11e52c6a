"""phi3lab: an interpretability workbench for Phi-3 models on Keras 3 / JAX."""

from phi3lab.host_memory import keep_freed_memory

keep_freed_memory()  # before JAX starts its threads (see phi3lab.host_memory)

from phi3lab._backend import select_jax_backend  # noqa: E402

select_jax_backend()

from phi3lab.disk_cache import enable_disk_cache  # noqa: E402

enable_disk_cache()

from phi3lab import activations, analysis, hooks, sharding, tracing, widgets  # noqa: E402
from phi3lab.generation import generate  # noqa: E402
from phi3lab.model import Phi3Backbone  # noqa: E402
from phi3lab.parity import compare_with_transformers  # noqa: E402
from phi3lab.tokenizer import Phi3Tokenizer  # noqa: E402
from phi3lab.tracing import Trace, estimate, gradients, trace  # noqa: E402

__all__ = [
    "Phi3Backbone",
    "Phi3Tokenizer",
    "Trace",
    "activations",
    "analysis",
    "compare_with_transformers",
    "estimate",
    "generate",
    "gradients",
    "hooks",
    "sharding",
    "trace",
    "tracing",
    "widgets",
]
__version__ = "0.1.0"
