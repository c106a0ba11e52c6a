"""The test suite's own rule for oracles: a missing oracle skips a test
locally but fails the run under CI (`CI=true`), through `require_oracle`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import require_oracle

ROOT = Path(__file__).resolve().parent.parent
MISSING = "phi3lab_no_such_oracle"


def test_a_missing_oracle_skips_locally(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require_oracle(MISSING)


def test_a_missing_oracle_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"oracle missing under CI: {MISSING}"):
        require_oracle(MISSING)


def test_a_present_oracle_is_returned():
    assert require_oracle("json").dumps([1]) == "[1]"


def test_no_test_skips_a_missing_module_by_itself():
    """`pytest.importorskip` (or a skip in an `except ImportError`) would skip
    under CI too; every optional import goes through `require_oracle`."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "importorskip") or (
                isinstance(node, ast.alias) and node.name == "importorskip"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} importorskip")
            if isinstance(node, ast.ExceptHandler) and "ImportError" in ast.unparse(node.type or ast.Name("")):
                calls = [n for n in ast.walk(node) if isinstance(n, ast.Call)]
                if any(ast.unparse(c.func).endswith("skip") for c in calls) and path.name != "conftest.py":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} skip on ImportError")
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        if "importorskip" in path.read_text():
            offenders.append(f"{path.relative_to(ROOT)} importorskip")
    assert not offenders, offenders
