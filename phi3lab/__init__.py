"""phi3lab: an interpretability workbench for Phi-3 models on Keras 3 / JAX.

Importing phi3lab changes nothing process-wide beyond choosing JAX as the
Keras backend when none was chosen: no allocator settings (opt in with
`PHI3LAB_HOST_MEMORY=reuse` or `phi3lab.runtime.configure(host_memory="reuse")`), no JAX backend started,
JAX's on-disk cache switched on only at phi3lab's first compilation, and the
widgets (with plotly and ipywidgets) imported when first used.
"""

from phi3lab.runtime.backend import select_jax_backend
from phi3lab.runtime.configuration import configure_from_environment

configure_from_environment()  # PHI3LAB_HOST_MEMORY=reuse: before any import starts threads
select_jax_backend()  # before anything imports keras

import importlib  # noqa: E402

from phi3lab.runtime import moved_modules  # noqa: E402

moved_modules.install()  # before the imports below, in case one still uses an old path

from phi3lab import analysis, hooks, presets, runtime, sharding, tracing  # noqa: E402
from phi3lab.generation import generate  # noqa: E402
from phi3lab.model import Phi3Backbone  # noqa: E402
from phi3lab.parity import compare_with_transformers  # noqa: E402
from phi3lab.tokenization import Phi3Tokenizer  # noqa: E402
from phi3lab.tracing import Trace, estimate, gradients, trace  # noqa: E402

# Imported on first use (PEP 562), so `import phi3lab` does not import them.
_LAZY_SUBMODULES = ("activations", "circuits", "features", "widgets")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"phi3lab.{name}")
    elif f"phi3lab.{name}" in moved_modules.MOVED:
        module = moved_modules.import_moved(f"phi3lab.{name}")
    else:
        raise AttributeError(f"module 'phi3lab' has no attribute {name!r}")
    globals()[name] = module  # found directly next time: one warning, as an import gives
    return module


def __dir__():
    return sorted([*globals(), *_LAZY_SUBMODULES])


__all__ = [
    "Phi3Backbone",
    "Phi3Tokenizer",
    "Trace",
    "activations",
    "analysis",
    "circuits",
    "compare_with_transformers",
    "estimate",
    "features",
    "generate",
    "gradients",
    "hooks",
    "presets",
    "runtime",
    "sharding",
    "trace",
    "tracing",
    "widgets",
]
__version__ = "0.1.0"
