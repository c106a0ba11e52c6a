"""The other ways in that the README promises agree with how the package builds:
`conda env create -f environment.yml` installs what `make` installs, each
notebook's Colab cell installs the package pyproject.toml builds (and that
wheel ships every file of the package, the shipped model included), and a
missing browser skips the browser tests with the command that enables them
(fails under CI)."""

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import require, require_binary, unavailable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EDITABLE = re.compile(r'-e\s+"?\.\[([\w,\s-]+)\]"?')


def extras(line: str) -> set[str]:
    """The extras of the `-e ".[a,b]"` install of this repository in `line`."""
    found = EDITABLE.search(line)
    assert found, f"no editable install of the repository in {line!r}"
    return {name.strip() for name in found[1].split(",")}


def test_environment_yml_installs_what_make_installs(tmp_path):
    require_binary("make", "`apt-get install make` (the README's commands need it)")
    plan = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "-n", "install", f"VENV={tmp_path}/v"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    make_extras = extras(next(line for line in plan.splitlines() if "pip install" in line and "-e" in line))

    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    dependencies = environment["dependencies"]
    pip = next(entry["pip"] for entry in dependencies if isinstance(entry, dict) and "pip" in entry)
    assert "pip" in dependencies
    assert len(pip) == 1 and extras(pip[0]) == make_extras
    assert make_extras <= set(PYPROJECT["optional-dependencies"])

    (python,) = [entry for entry in dependencies if isinstance(entry, str) and entry.startswith("python=")]
    assert SpecifierSet(PYPROJECT["requires-python"]).contains(python.split("=", 1)[1])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_cell_installs_the_package_pyproject_builds(path):
    notebook = nbformat.read(path, as_version=4)
    badge = re.search(
        r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/[\w.-]+/(\S+?\.ipynb)", notebook.cells[0].source
    )
    assert badge and badge[2] == f"notebooks/{path.name}", "the Colab badge must open this notebook"
    install = next(cell for cell in notebook.cells if cell.cell_type == "code").source
    lines = [line.strip() for line in install.splitlines() if re.match(r"\s*[%!]pip install", line)]
    assert len(lines) == 1, f"one pip install line in the first code cell, got {lines}"
    quoted = re.findall(r'"([^"]+)"', lines[0])
    assert len(quoted) == 1, f"one quoted requirement, got {lines[0]!r}"

    requirement = Requirement(quoted[0])
    assert canonicalize_name(requirement.name) == canonicalize_name(PYPROJECT["name"])
    assert requirement.extras <= set(PYPROJECT["optional-dependencies"])
    assert requirement.url == f"git+https://github.com/{badge[1]}", "install from the repository the badge opens"


@pytest.mark.slow
def test_the_wheel_ships_every_file_of_the_package(tmp_path):
    """What a `pip install` from the repository gets (Colab's cell): every file
    git tracks under phi3lab/, assets included, and nothing else."""
    require("setuptools.build_meta")
    listed = shutil.which("git") and subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, timeout=60, check=False
    )
    if not listed or listed.returncode != 0:
        unavailable(
            "git, to list the tracked files to compare the wheel with: "
            + (listed.stderr.decode().strip() if listed else "git is not on PATH"),
            "`apt-get install git`, in a git checkout",
        )
    tracked = [name for name in listed.stdout.decode().split("\0") if name]
    source = tmp_path / "src"  # build a copy: no build/ in the repository
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        timeout=300,
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith(f"{canonicalize_name(PYPROJECT['name']).replace('-', '_')}-{PYPROJECT['version']}-")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in name}
    assert shipped == {name for name in tracked if name.startswith("phi3lab/")}


@pytest.fixture
def require_chromium(monkeypatch, tmp_path):
    """The browser tests' own skip-or-fail helper, looking for a Chromium that is not there."""
    spec = importlib.util.spec_from_file_location("browser_under_test", ROOT / "tests" / "browser" / "lab_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "CHROMIUM", tmp_path / "no-chromium")
    return module.require_chromium


def test_missing_chromium_skips_with_the_command_that_enables_it(require_chromium, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install chromium"):
        require_chromium()


def test_missing_chromium_fails_under_ci(require_chromium, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install chromium"):
        require_chromium()
