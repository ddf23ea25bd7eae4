"""Executes the Colab notebooks at their small settings; a failing cell fails the test.

The notebooks read `TF_MOE_NOTEBOOK_SMALL=1` and shrink their data, models
and training to seconds. Each runs in its own kernel (a fresh process), from
the notebooks directory, as on Colab after the setup cell.
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
ALL = sorted(name for name in os.listdir(NOTEBOOKS) if name.endswith(".ipynb"))


def _execute(name, monkeypatch):
    monkeypatch.setenv("TF_MOE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "agg")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    return notebook


def test_the_four_notebooks_exist_and_are_stored_without_outputs():
    assert ALL == [
        "01_quickstart.ipynb",
        "02_language_model.ipynb",
        "03_translation.ipynb",
        "04_distributed_and_export.ipynb",
    ]
    for name in ALL:
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name
        # The first code cell installs or finds the package before anything imports it.
        assert "%pip install" in code[0].source and "import tf_moe" not in code[0].source, name


@pytest.mark.timeout(1800)  # a whole notebook; nbclient limits each cell to 600 s
@pytest.mark.parametrize(
    "name",
    [
        "01_quickstart.ipynb",
        pytest.param("02_language_model.ipynb", marks=pytest.mark.slow),
        pytest.param("03_translation.ipynb", marks=pytest.mark.slow),
        "04_distributed_and_export.ipynb",
    ],
)
def test_notebook_runs(name, monkeypatch):
    notebook = _execute(name, monkeypatch)
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert not errors
