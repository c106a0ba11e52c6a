"""The test suite's one rule for a missing requirement (an oracle module, a
binary, a data file): skip locally, fail the run under CI (`CI=true`), with
a message naming what is missing and how to install it (`conftest.require`,
`require_binary`, `require_file`, all through `unavailable`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import require, require_binary, require_file

ROOT = Path(__file__).resolve().parent.parent
MISSING = "phi3lab_no_such_oracle"
NO_BINARY = "phi3lab-no-such-binary"
# kind: (a call that finds its requirement missing, given tmp_path; what the message names; how to install).
MISSING_REQUIREMENTS = {
    "module": (lambda tmp: require(MISSING), f"`{MISSING}`", "make install"),
    "binary": (lambda tmp: require_binary(NO_BINARY, "`apt-get install it`"), NO_BINARY, "apt-get install it"),
    "binary path": (lambda tmp: require_binary(tmp / "chromium", "`make browser`"), "chromium", "make browser"),
    "file": (lambda tmp: require_file(tmp / "vocab.model", "the vocabulary", "a download"), "vocabulary", "a download"),
}


@pytest.mark.parametrize("kind", MISSING_REQUIREMENTS)
def test_a_missing_requirement_skips_locally(kind, monkeypatch, tmp_path):
    call, what, install = MISSING_REQUIREMENTS[kind]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{re.escape(what)}.*install it with.*{re.escape(install)}"):
        call(tmp_path)


@pytest.mark.parametrize("ci", ["true", "True"])
@pytest.mark.parametrize("kind", MISSING_REQUIREMENTS)
def test_a_missing_requirement_fails_under_ci(kind, ci, monkeypatch, tmp_path):
    call, what, install = MISSING_REQUIREMENTS[kind]
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"missing under CI.*{re.escape(what)}.*{re.escape(install)}"):
        call(tmp_path)


def test_ci_other_than_true_still_skips(monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require(MISSING)


def test_present_requirements_are_returned(tmp_path):
    assert require("json").dumps([1]) == "[1]"
    assert Path(require_binary("sh", "-")).name == "sh"
    (tmp_path / "data").write_text("x")
    assert require_file(tmp_path / "data", "data", "-").read_text() == "x"


def test_no_test_decides_skip_or_fail_by_itself():
    """`pytest.importorskip` (or a skip in an `except ImportError`) would skip
    under CI too, and a test reading `CI` itself is a second copy of the
    rule; every missing requirement goes through conftest's helpers."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name != "conftest.py" and re.search(r"""environ(\.get\(|\[)["']CI["']""", path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)} reads CI")
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
