"""Makes JAX the Keras backend before Keras is first imported, or says why it cannot."""

from __future__ import annotations

import os
import sys

_FIX = (
    'Put `import os; os.environ["KERAS_BACKEND"] = "jax"` before any import of keras or phi3lab '
    "(in a notebook: restart the kernel and make that the first cell), or set KERAS_BACKEND=jax in "
    "the environment before starting Python."
)


class KerasBackendError(ImportError):
    """Keras runs (or is set to run) on a backend other than JAX, which phi3lab needs."""


def select_jax_backend() -> None:
    """Make JAX the Keras backend, or raise `KerasBackendError` saying how.

    phi3lab's layers and programs are JAX code, so Keras must run on JAX.
    When the user chose no backend (`KERAS_BACKEND` unset) and keras is not
    imported yet, this sets `KERAS_BACKEND=jax` (Keras reads it once, when
    it is first imported). A keras already imported on another backend (a
    notebook that ran `import keras` first: on Colab keras then runs on
    TensorFlow) cannot switch, and neither can one told to use another
    backend, so both raise with what to do. Called when phi3lab is imported.

    Example:
    >>> import os; os.environ["KERAS_BACKEND"] = "jax"   # first cell of a notebook
    >>> import keras, phi3lab                            # in any order after it
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "config"):
        active = keras.config.backend()
        if active != "jax":
            raise KerasBackendError(
                f"keras was imported before phi3lab and runs on the {active!r} backend; "
                f"phi3lab needs Keras on JAX, and Keras cannot change backend once imported. {_FIX}"
            )
        return
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen is None:
        os.environ["KERAS_BACKEND"] = "jax"
    elif chosen != "jax":
        raise KerasBackendError(f"KERAS_BACKEND={chosen!r} is set; phi3lab needs Keras on JAX. {_FIX}")
