"""The package as users install it: sdist and wheel, `twine check`, a fresh virtual environment.

Marked `install` and left out of the default run (minutes; the build tools
come from the package index): CI runs `python -m pytest -m install`. The
wheel is installed into a new virtual environment that sees this
interpreter's site-packages through a `.pth` path (so TensorFlow is not
downloaded again) but not that directory's own `.pth` hooks, so an editable
install of the checkout cannot shadow the wheel; every command runs outside
the checkout, without PYTHONPATH, and checks where `tf_moe` was imported from.
"""

import glob
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from types import SimpleNamespace

import nbformat
import pytest
from nbclient import NotebookClient

import tf_moe

pytestmark = pytest.mark.install

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP_LOG_LINE = re.compile(r"^[IWEF]\d{4} |cuInit|absl::InitializeLog", re.MULTILINE)


def _clean_env(**extra):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(command, cwd, timeout=900, **env):
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=_clean_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Builds the sdist and the wheel, checks them with twine, installs the wheel into a new venv."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], root)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    parent_site = [path for path in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if os.path.isdir(path)]
    with open(os.path.join(venv_site, "_parent_site_packages.pth"), "w") as f:
        f.write("".join(f"{path}\n" for path in dict.fromkeys(parent_site)))
    _run([python, "-m", "pip", "install", "-q", "build", "twine"], root)
    dist = root / "dist"
    # Without arguments, build makes the sdist and then the wheel from the
    # unpacked sdist, so a file missing from the sdist breaks the wheel.
    _run([python, "-m", "build", "--outdir", dist, ROOT], root)
    (sdist,), (wheel,) = glob.glob(str(dist / "*.tar.gz")), glob.glob(str(dist / "*.whl"))
    _run([python, "-m", "twine", "check", "--strict", sdist, wheel], root)
    _run([python, "-m", "pip", "install", "-q", wheel], root)
    return SimpleNamespace(root=root, venv=venv, python=python, site=venv_site, sdist=sdist, wheel=wheel,
                           bin=python.parent)


def test_wheel_and_sdist_hold_the_package_and_its_metadata(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert {"_tf_moe_launcher.py", "tf_moe/__init__.py", "tf_moe/reproduction/cli.py",
            "tf_moe/reproduction/corpora.py",
            "tf_moe/layers/__init__.py"} <= names
    assert not any(name.startswith(("tests/", "notebooks/", "docs/")) for name in names)
    assert f"\nVersion: {tf_moe.__version__}\n" in metadata
    assert "Requires-Dist: tensorflow==2.21.*" in metadata and 'Requires-Dist: pysword>=0.2.8; extra == "paper"' in metadata
    assert "tf-moe = _tf_moe_launcher:main" in entry_points
    with tarfile.open(installed.sdist) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"README.md", "setup.cfg", "pyproject.toml", "_tf_moe_launcher.py",
            "tf_moe/reproduction/cli.py"} <= members


def test_the_installed_wheel_runs_without_the_checkout(installed):
    where = json.loads(_run([installed.python, "-c",
                             "import json, tf_moe; print(json.dumps([tf_moe.__file__, tf_moe.__version__]))"],
                            installed.root).stdout)
    assert where == [os.path.join(installed.site, "tf_moe", "__init__.py"), tf_moe.__version__]
    assert not where[0].startswith(ROOT)
    tf_moe_command = shutil.which("tf-moe", path=str(installed.bin))
    assert tf_moe_command and tf_moe_command.startswith(str(installed.venv))
    result = _run([tf_moe_command, "--help"], installed.root)
    assert "tf-moe train lm" in result.stdout and result.stderr == ""
    assert not CPP_LOG_LINE.search(result.stdout + result.stderr)
    result = subprocess.run([tf_moe_command, "train", "lm", "--epochs", "0"], cwd=installed.root,
                            env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--epochs" in result.stderr
    assert _run([tf_moe_command, "--version"], installed.root).stdout == f"tf-moe {tf_moe.__version__}\n"


def test_notebook_01_runs_against_the_installed_wheel(installed, monkeypatch):
    # A kernel started by the venv's Python, from a folder outside the checkout.
    kernels = installed.root / "jupyter" / "kernels" / "tf-moe-wheel"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [str(installed.python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tf_moe wheel", "language": "python",
    }))
    for key, value in _clean_env(JUPYTER_PATH=str(installed.root / "jupyter"), TF_MOE_NOTEBOOK_SMALL="1",
                                 MPLBACKEND="agg").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    folder = installed.root / "notebook"
    folder.mkdir()
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "01_quickstart.ipynb"), as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import tf_moe\nprint(tf_moe.__file__)"))
    client = NotebookClient(notebook, timeout=900, kernel_name="tf-moe-wheel",
                            resources={"metadata": {"path": str(folder)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    (output,) = notebook.cells[-1].outputs
    assert output.text.strip() == os.path.join(installed.site, "tf_moe", "__init__.py")
