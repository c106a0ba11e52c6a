"""Old module paths of moved modules, importable for one release with a warning.

Modules that moved into a package (`phi3lab.compile_cache` is now
`phi3lab.runtime.compile_cache`, `phi3lab.tokenizer` is
`phi3lab.tokenization.tokenizer`, ...) leave no file behind at their old
place. Instead `install()` (called by `phi3lab/__init__.py`) puts a finder on
`sys.meta_path` that answers only the old names in `MOVED`: importing one
warns with a `DeprecationWarning` naming the new path and gives the new
module itself, so both names share one module object (its state, its
functions, what tests monkeypatch). `phi3lab.__getattr__` does the same for
attribute access (`phi3lab.compile_cache.set_limit(8)`) through
`import_moved`.

To retire an old path, delete its line in `MOVED`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: Old module path -> new module path.
MOVED = {
    "phi3lab.compile_cache": "phi3lab.runtime.compile_cache",
    "phi3lab.disk_cache": "phi3lab.runtime.disk_cache",
    "phi3lab.host_memory": "phi3lab.runtime.host_memory",
    "phi3lab.tokenizer": "phi3lab.tokenization.tokenizer",
    "phi3lab.tokenizer_training": "phi3lab.tokenization.training",
}


def import_moved(old: str):
    """The module that `old` (a key of `MOVED`) moved to, after a
    `DeprecationWarning` naming its new path.

    Example:
    >>> import_moved("phi3lab.compile_cache") is phi3lab.runtime.compile_cache
    True
    """
    new = MOVED[old]
    warnings.warn(
        f"`{old}` moved to `{new}`; import `{new}` instead (the old path goes away in the next release).",
        DeprecationWarning,
        stacklevel=3,
    )
    return importlib.import_module(new)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths in `MOVED` and loads each as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def __init__(self):
        self._own_specs = {}

    def create_module(self, spec):
        module = import_moved(spec.name)
        self._own_specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module):
        """Nothing to run: the module it moved to is already imported. The
        import system has just set its `__spec__` to the old path's; give it
        back its own (for `importlib.reload` and tools that read it)."""
        module.__spec__ = self._own_specs.pop(module.__name__)


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Answer imports of the old paths (once per process), ahead of the
    other finders (an editable install's finder would otherwise find an
    older checkout's file)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
