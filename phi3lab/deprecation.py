"""Old call forms kept working for one release, with a `DeprecationWarning`
that names the new form.

Public functions take the model and its inputs (and what is asked of them)
by position and every setting after those by keyword. `keyword_only_since`
lets calls that still pass those settings by position run unchanged, with a
warning; the warning is its own class (`Phi3labDeprecationWarning`), so a
test run may turn exactly phi3lab's deprecations into errors:
`pytest -W error::phi3lab.deprecation.Phi3labDeprecationWarning`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable


class Phi3labDeprecationWarning(DeprecationWarning):
    """A phi3lab call form that stops working in the next release."""


def warn_deprecated(old: str, new: str) -> None:
    """Warn, from the caller of the public function, that `old` is
    deprecated in favour of `new`."""
    warnings.warn(
        f"{old} is deprecated and stops working in the next phi3lab release; write {new}.",
        Phi3labDeprecationWarning,
        stacklevel=3,
    )


def keyword_only_since(*names: str) -> Callable:
    """Decorator: the keyword-only parameters `names` (in the order they
    used to take by position) may still be passed by position, with a
    `DeprecationWarning`.

    Example:
    >>> @keyword_only_since("sites", "progress")
    ... def activation_patching(model, clean_ids, corrupted_ids, metric=None, *, sites="resid_pre", progress=True): ...
    >>> activation_patching(model, clean, corrupted, None, "head_z")   # warns; sites="head_z"
    """

    def decorate(fn: Callable) -> Callable:
        parameters = inspect.signature(fn).parameters.values()
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > positional:
                extra = args[positional:]
                if len(extra) > len(names):
                    raise TypeError(
                        f"{fn.__name__}() takes at most {positional + len(names)} positional arguments "
                        f"({len(args)} given); pass settings by keyword."
                    )
                moved = dict(zip(names, extra))
                twice = sorted(set(moved) & set(kwargs))
                if twice:
                    raise TypeError(f"{fn.__name__}() got multiple values for {twice[0]!r}")
                shown = ", ".join(f"{name}=..." for name in moved)
                warn_deprecated(
                    f"passing {', '.join(moved)} to {fn.__name__}() by position", f"{fn.__name__}(..., {shown})"
                )
                args, kwargs = args[:positional], {**kwargs, **moved}
            return fn(*args, **kwargs)

        return wrapper

    return decorate
