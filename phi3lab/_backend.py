"""Selects the JAX backend for Keras before Keras is first imported."""

import os
import sys
import warnings


def select_jax_backend() -> None:
    """Make JAX the Keras backend, or warn when another one is already active.

    phi3lab's tracing compiles the model with `jax.jit`, so it needs Keras on
    JAX. When the user chose no backend we choose JAX; when Keras is already
    imported with another backend we cannot change it and say so.
    """
    chosen = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras

        active = keras.config.backend()
        if active != "jax":
            warnings.warn(
                f"Keras is already running on the {active!r} backend; phi3lab "
                "needs 'jax'. Set KERAS_BACKEND=jax before importing keras "
                "(or import phi3lab first).",
                stacklevel=3,
            )
        return
    if chosen is None:
        os.environ["KERAS_BACKEND"] = "jax"
    elif chosen != "jax":
        warnings.warn(
            f"KERAS_BACKEND={chosen!r} is set; phi3lab needs 'jax'. Tracing will not work on this backend.",
            stacklevel=3,
        )
