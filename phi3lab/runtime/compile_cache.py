"""The one cache of compiled programs, per model and bounded.

Everything phi3lab compiles is stored here under a key that says what the
program is (`("trace", plan, hooks, shapes)`, ...), in one of two forms:

- a `Program` (`ahead_of_time`): compiled for fixed input shapes, with XLA's
  memory analysis, which the run pipeline's memory guard reads: every entry
  that runs the model, the analysis read-outs, the rotary tables.
- a traceable function (`traceable`): `jax.jit` of a function, for the
  programs that must also run inside a JAX transformation: the model's eager
  call, which Keras training compiles; the checkpoint conversions, which a
  save sizes under `jax.eval_shape`, and the loaders' layer writes; the
  initializers' draws and int8 quantization, which `jax.eval_shape` traces
  when sizing a real model.

Programs of a model live in that model's cache, as long as the model; those
that belong to no model (the rotary tables, quantization, the initializers'
draws) live in one process-wide cache (`model=None`). Each cache keeps at
most `limit()` programs, the least recently used going first. No other
module calls `jax.jit` (`tests/test_layout.py` checks it).

The cache is held by the model itself (a private attribute): its programs
close over the model, so a table keyed by weak references to models would
keep every model alive through its own values. Held by the model, model and
programs form one cycle that the garbage collector frees together. `PHI3LAB_COMPILE_CACHE_SIZE` sets the limit
(default 64 programs per model); `set_limit` changes it at run time.

Input lengths are padded to a few *length buckets* (`bucket_length`), so
prompts of 33, 40 and 57 tokens share one program: 64, 128, then multiples
of 128 up to 512, then powers of two, never past the model's
`max_sequence_length`. Ten prompt lengths between 20 and 300 tokens compile
at most four programs (64, 128, 256, 384).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections import OrderedDict
from typing import Any, Callable

from phi3lab.runtime.disk_cache import enable_disk_cache

_DEFAULT_LIMIT = 64
_BUCKETS = (64, 128, 256, 384, 512)
_ATTRIBUTE = "_phi3lab_compiled_programs"
_MODELS: "weakref.WeakSet" = weakref.WeakSet()  # models holding a cache, for set_limit
_SHARED: OrderedDict = OrderedDict()  # the programs that belong to no model
_limit = int(os.environ.get("PHI3LAB_COMPILE_CACHE_SIZE", _DEFAULT_LIMIT))


# XLA:CPU's default scheduler runs independent work as early as it can, so a
# program whose layers run unrolled (each layer that captures or is hooked
# runs alone, `TracePlan.segments`) copies every layer's weight slice at its
# start: 340 MB of temporaries for the 12-layer benchmark model at T=128, 9 MB
# with the memory-optimized scheduler, and 1.41x -> 1.26x the plain forward
# for a full capture (`benchmarks/trace.py`). Plain forwards run alike with
# either (143 vs 141 ms at T=128). Other backends keep their defaults.
_CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options() -> dict | None:
    """The XLA options phi3lab compiles with on the default backend (None
    where it keeps XLA's defaults); pass them to your own `jax.jit` of a
    `phi3lab.tracing.forward_fn` to get the same programs."""
    import jax

    return dict(_CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def jit(fn: Callable, **kwargs):
    """`jax.jit(fn, **kwargs)` compiled with `compiler_options()`: how phi3lab
    compiles every `Program` and the programs it does not cache (dictionary
    training's step, the feature summary's fold: made per call). JAX takes
    compiler options only at the top level, so a program that may run inside
    another `jit` (the model's eager call, which Keras training compiles) is
    `traceable`.

    Example:
    >>> run = cached(model, ("trace", key), lambda: jit(fn.run))
    """
    import jax

    return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A program compiled ahead of time for fixed input shapes, with XLA's
    memory analysis of it, read once when it is compiled (11 ms for a full
    trace of the 12-layer benchmark model, 8% of a whole call at T=128).
    Call it as the compiled program.

    Attributes:
        compiled: the `jax.stages.Compiled`.
        temporary_bytes: XLA's temporary buffers while it runs.
        output_bytes: the bytes of its outputs.
    """

    compiled: Any
    temporary_bytes: int
    output_bytes: int

    def __call__(self, *args):
        return self.compiled(*args)


def ahead_of_time(model, key: tuple, fn: Callable, args) -> Program:
    """`fn` compiled (`jit`) for the shapes and dtypes of `args` (arrays or
    `jax.ShapeDtypeStruct`s), as a `Program`, cached under `key` and those
    shapes: the one way phi3lab compiles what it runs eagerly, so a memory
    guard knows what a program needs before it runs.

    Args:
        model: the model the program belongs to, or None for a program of
            no model (the process-wide cache).
        key: what the program is, its kind first (`("trace", plan)`).
        fn: the function, of `args`.
        args: a tuple of its arguments (a pytree of arrays).

    Example:
    >>> program = ahead_of_time(model, ("trace", plan), fn.run, args)
    >>> program.temporary_bytes, program(*args)
    """
    import jax

    leaves, treedef = jax.tree.flatten(args)
    shapes = (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))

    def build() -> Program:
        compiled = jit(fn).lower(*args).compile()
        stats = compiled.memory_analysis()
        return Program(compiled, int(stats.temp_size_in_bytes), int(stats.output_size_in_bytes))

    return cached(model, (*key, shapes), build)


def traceable(model, key: tuple, fn: Callable, **options) -> Callable:
    """`jax.jit(fn, **options)` (XLA's default options), cached under `key`:
    for a program that must also run inside a JAX transformation (`jax.jit`,
    `jax.grad`, `jax.eval_shape`), where a `Program` compiled for concrete
    shapes cannot. Settings the function closes over belong in `key`; each
    cached function compiles once per input shape.

    Example:
    >>> draw = traceable(None, ("init.normal", shape, dtype), lambda key: jax.random.normal(key, shape, dtype))
    """
    import jax

    return cached(model, key, lambda: jax.jit(fn, **options))


def cached(model, key: tuple, build: Callable[[], Any]):
    """The program stored for `(model, key)`, built by `build()` on first use.

    For a model, the key is extended with `model.attention_paths` (the
    frozen `AttentionPaths` that `Phi3Backbone.apply` passes to every
    attention layer: the one model setting a program reads while it is
    traced), so assigning new paths builds new programs. `model=None` uses
    the process-wide cache of programs that belong to no model.
    The first build of a program for a model switches JAX's on-disk cache
    on (`disk_cache.enable_disk_cache`); programs of no model do not (they
    run when a model is built, which leaves the process's settings alone).

    Example:
    >>> run = cached(model, ("call",), lambda: jax.jit(forward))
    """
    if model is None:
        cache = _SHARED
    else:
        cache = _cache_of(model)
        key = (*key, model.attention_paths)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    if model is not None:
        enable_disk_cache()
    program = build()
    cache[key] = program
    while len(cache) > _limit:
        cache.popitem(last=False)
    return program


def _cache_of(model) -> OrderedDict:
    """`model`'s own cache, created on first use (set past Keras' attribute
    tracking, which would otherwise treat the programs as layer state)."""
    cache = getattr(model, _ATTRIBUTE, None)
    if cache is None:
        cache = OrderedDict()
        object.__setattr__(model, _ATTRIBUTE, cache)
        _MODELS.add(model)
    return cache


def _programs_of(model) -> OrderedDict | dict:
    """The cache of `model` (the process-wide one for None), empty if none yet."""
    return _SHARED if model is None else getattr(model, _ATTRIBUTE, {})


def size(model, kind: str | None = None) -> int:
    """How many programs are cached for `model` (None: the process-wide
    cache; only keys starting with `kind` when given, e.g. `"trace"`)."""
    cache = _programs_of(model)
    if kind is None:
        return len(cache)
    return sum(1 for key in cache if isinstance(key, tuple) and key and key[0] == kind)


def entries(model) -> dict:
    """A copy of `model`'s cache (None: the process-wide one), key ->
    program (for inspection and tests)."""
    return dict(_programs_of(model))


def limit() -> int:
    """The most programs kept per model (and in the process-wide cache)."""
    return _limit


def set_limit(value: int) -> None:
    """Keep at most `value` programs per model (older ones are dropped now)."""
    from phi3lab.checks import check_positive_int

    global _limit
    _limit = check_positive_int("value", value)
    for cache in [_SHARED, *(getattr(model, _ATTRIBUTE) for model in list(_MODELS))]:
        while len(cache) > _limit:
            cache.popitem(last=False)


def bucket_length(length: int, max_length: int) -> int:
    """The padded length that inputs of `length` positions run at: the
    smallest of 64, 128, 256, 384, 512, 1024, 2048, ... that holds `length`,
    capped at `max_length` (and never below `length`).

    Example:
    >>> [bucket_length(n, 4096) for n in (20, 64, 65, 300, 513)]
    [64, 64, 128, 384, 1024]
    """
    bucket = next((b for b in _BUCKETS if b >= length), None)
    if bucket is None:
        bucket = 1 << (length - 1).bit_length()
    return max(length, min(bucket, max_length))
