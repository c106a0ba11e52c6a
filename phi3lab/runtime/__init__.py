"""What phi3lab needs from the process it runs in, and nothing it did not ask for.

- `backend.py`: makes JAX the Keras backend before keras is imported, or raises saying how.
- `compile_cache.py`: the bounded caches of every compiled program (per model, and one for
  programs of no model), and the length buckets; the only module that calls `jax.jit`.
- `disk_cache.py`: JAX's on-disk compilation cache, switched on at phi3lab's first program for a model.
- `host_memory.py`: glibc settings that keep freed host memory for the next run (opt-in).
- `configuration.py`: `configure()`, the opt-in to process-wide settings (`host_memory="reuse"`).
- `env.py`: reading phi3lab's environment variables.
- `moved_modules.py`: old module paths (`phi3lab.compile_cache`, `phi3lab.tokenizer`, ...) kept
  importable for one release with a `DeprecationWarning`.
"""

from phi3lab.runtime import compile_cache, disk_cache, host_memory
from phi3lab.runtime.configuration import configure

__all__ = ["compile_cache", "configure", "disk_cache", "host_memory"]
