"""The README's way to save a notebook without its widget state works."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_command() -> list[str]:
    """The `python -c ... notebook.ipynb` line of the README's section on saving notebooks."""
    section = README.read_text().split("## Saving traces and notebooks", 1)[1].split("\n## ", 1)[0]
    line = re.search(r"^python -c .*notebook\.ipynb$", section, re.MULTILINE)
    assert line, "the README lost its command for removing widget state"
    return shlex.split(line.group(0))


def test_the_readme_command_removes_widget_state_and_keeps_the_rest(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {
        "application/vnd.jupyter.widget-state+json": {
            "state": {"m": {"model_name": "FigureModel", "state": {"data": "x" * 2_000_000}}},
            "version_major": 2,
            "version_minor": 0,
        }
    }
    output = nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)
    nb.cells.append(nbformat.v4.new_code_cell("1 + 1", outputs=[output], execution_count=1))
    path = tmp_path / "notebook.ipynb"
    nbformat.write(nb, path)
    before = path.stat().st_size
    command = readme_command()
    assert command[0] == "python" and command[-1] == "notebook.ipynb"
    subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, check=True, timeout=60)
    after = nbformat.read(path, 4)
    assert "widgets" not in after.metadata
    assert after.metadata["kernelspec"]["name"] == "python3"
    assert after.cells[0].source == "1 + 1" and after.cells[0].outputs[0]["data"]["text/plain"] == "2"
    assert path.stat().st_size < before / 100
