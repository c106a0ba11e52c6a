"""pyproject.toml declares what phi3lab imports, and nothing it does not."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: Declared but not imported by phi3lab, and why.
NOT_IMPORTED = {"anywidget": "plotly's FigureWidget renders through it"}


def distribution(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the phi3lab package."""
    found = set()
    for path in (ROOT / "phi3lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"phi3lab"}


def test_every_import_is_declared_and_every_dependency_imported():
    runtime = {distribution(r) for r in PROJECT["dependencies"]}
    optional = {distribution(r) for extra in PROJECT["optional-dependencies"].values() for r in extra}
    providers = importlib.metadata.packages_distributions()
    used = set()
    for module in sorted(imported_modules()):
        names = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        assert names & (runtime | optional), f"phi3lab imports {module!r} ({sorted(names)}), declared nowhere"
        used |= names
    unused = runtime - used - set(NOT_IMPORTED)
    assert not unused, f"declared in dependencies but never imported by phi3lab: {sorted(unused)}"
    assert set(NOT_IMPORTED) <= runtime


def test_ruff_is_a_dev_dependency():
    assert "ruff" in {distribution(r) for r in PROJECT["optional-dependencies"]["dev"]}
