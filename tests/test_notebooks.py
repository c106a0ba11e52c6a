"""The curated notebooks are stored clean and shaped alike. (`make test` also
executes every notebook with nbmake on the shipped small model.)"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = {
    "attention_explorer.ipynb",
    "01_quickstart.ipynb",
    "02_rotary_tables.ipynb",
    "03_residual_stream_and_logit_lens.ipynb",
    "04_activation_patching.ipynb",
    "05_induction_heads.ipynb",
    "06_phi3_mini_on_colab.ipynb",
    "10_sparse_features.ipynb",
    "11_circuit_discovery.ipynb",
}


def test_every_curated_notebook_exists():
    assert EXPECTED <= {path.name for path in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_colab_link_install_cell_and_parameters(path):
    notebook = nbformat.read(path, as_version=4)
    sources = [cell.source for cell in notebook.cells]
    assert "colab.research.google.com" in sources[0]
    assert any("google.colab" in s and "enable_custom_widget_manager" in s for s in sources)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "PRESET" in tagged[0].source
