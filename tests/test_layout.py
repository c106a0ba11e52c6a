"""The package's layout rules: the model imports nothing above it, no
runtime module lies loose at the package top, and only the compile cache
calls `jax.jit`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "phi3lab"
# Packages that build on the model; the model must never import them.
ABOVE_THE_MODEL = ("presets", "tracing", "analysis", "widgets", "generation")


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, at module level or inside
    functions; `from phi3lab import x` counts as `phi3lab.x`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level or None])
            module = ".".join(part for part in (package if node.level else "", node.module or "") if part)
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_imported_names_sees_every_form_of_import(tmp_path, monkeypatch):
    """The scanner below must not miss an import because of how it is written."""
    module = PACKAGE / "model" / "backbone.py"
    source = "import phi3lab.presets\nfrom phi3lab import tracing\ndef f():\n    from ..analysis import lens\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    names = {name for _, name in imported_names(module)}
    assert {"phi3lab.presets", "phi3lab.tracing", "phi3lab.analysis.lens"} <= names


def test_the_model_imports_nothing_above_it():
    upward = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}"
        for path in sorted((PACKAGE / "model").rglob("*.py"))
        for line, name in imported_names(path)
        if any(name == f"phi3lab.{above}" or name.startswith(f"phi3lab.{above}.") for above in ABOVE_THE_MODEL)
    ]
    assert not upward, "\n".join(upward)


# The one module that compiles with `jax.jit` (docs/design.md, "One notion of a compiled program").
COMPILE_CACHE = PACKAGE / "runtime" / "compile_cache.py"
COMPILERS = {"jit", "pjit", "pmap"}


def jit_uses(source: str) -> list[int]:
    """Lines of `source` that compile with JAX directly: `jax.jit` (or
    `pjit`, `pmap`) called, used as a decorator or passed on
    (`functools.partial(jax.jit, ...)`), under any name jax is imported as,
    or the function imported from jax. Strings (docstring examples) are not
    code."""
    tree = ast.parse(source)
    imports = [alias for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    aliases = {"jax"} | {a.asname or a.name for a in imports if a.name.split(".")[0] == "jax"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COMPILERS and ast.unparse(node.value) in aliases:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jax":
            lines += [node.lineno for alias in node.names if alias.name in COMPILERS]
    return sorted(lines)


def test_jit_uses_sees_every_form_and_skips_docstrings():
    """The scanner below must not miss a `jax.jit` because of how it is written."""
    source = (
        '"""Example: `jax.jit(fn)(x)`."""\n'
        "import functools\nimport jax\nimport jax as J\nfrom jax import jit\n"
        "@jax.jit\ndef f(x):\n    '''>>> jax.jit(f)'''\n    return x\n"
        "g = J.jit(f, static_argnums=0)\n"
        "h = functools.partial(jax.jit, donate_argnums=0)\n"
        "k = jax.pmap(f)\n"
        "ok = jax.numpy.asarray(1)\n"
    )
    assert jit_uses(source) == [5, 6, 10, 11, 12]


def test_only_the_compile_cache_calls_jax_jit():
    """Every program phi3lab compiles lives in the bounded compile cache
    (`compile_cache.ahead_of_time`, `traceable`, `jit`), none in a
    module-level `jax.jit` whose programs JAX keeps without bound."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != COMPILE_CACHE
        for line in jit_uses(path.read_text())
    ]
    assert not found, "jax.jit outside phi3lab/runtime/compile_cache.py:\n" + "\n".join(found)
    assert jit_uses(COMPILE_CACHE.read_text()), "the scan no longer sees the compile cache's own jax.jit"


def test_no_runtime_module_lies_at_the_package_top():
    loose = {"compile_cache", "disk_cache", "host_memory", "_backend", "_env", "tokenizer", "tokenizer_training"}
    assert not {path.stem for path in PACKAGE.glob("*.py")} & loose


def test_from_preset_works_when_only_the_model_package_is_imported():
    code = (
        "from phi3lab.model import Phi3Backbone\n"
        "model = Phi3Backbone.from_preset('phi3lab_tiny_en')\n"
        "print('phi3lab_tiny_en' in Phi3Backbone.presets, model.num_layers)"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "True"


def test_our_own_code_imports_no_moved_path():
    """The old module paths kept for users (`runtime/moved_modules.py`) are
    never what phi3lab, its tests (but the one that checks the aliases),
    benchmarks or scripts import: a lazily imported module that used one
    would warn users at their first `phi3lab.activations` or `phi3lab.features`."""
    from phi3lab.runtime.moved_modules import MOVED

    root = PACKAGE.parent
    files = [
        path
        for folder in ("phi3lab", "tests", "benchmarks", "scripts")
        for path in sorted((root / folder).rglob("*.py"))
        if path.name != "test_import_effects.py"
    ]
    stale = [
        f"{path.relative_to(root)}:{line} imports {name}"
        for path in files
        for line, name in imported_names(path)
        if any(name == old or name.startswith(f"{old}.") for old in MOVED)
    ]
    assert not stale, "\n".join(stale)
