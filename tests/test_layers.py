"""The package's layers (see infalign_jax/__init__.py): every import points down or sideways within
a layer, and no module imports itself back through a cycle. Read from the source with `ast`."""

import ast
import os

import pytest

import infalign_jax

PACKAGE = os.path.dirname(infalign_jax.__file__)


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package modules `path` imports (at any depth in the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("infalign_jax.") or name == "infalign_jax":
                found.add(name)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return infalign_jax.LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = _modules()
GRAPH = {m: _imports(p, MODULES) - {m} for m, p in MODULES.items()}


def test_every_subpackage_has_a_layer():
    top = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    files = {m.split(".")[1] for m in MODULES if m.count(".") == 1 and
             not os.path.isdir(os.path.join(PACKAGE, m.split(".")[1]))}
    assert top - files == set(infalign_jax.LAYERS)
    assert not files, f"modules outside a layer folder: {sorted(files)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    here = _layer(module)
    if here is None:
        return
    up = sorted(t for t in GRAPH[module] if (_layer(t) or -1) > here)
    assert not up, f"{module} (layer {here}) imports from higher layers: {up}"


def test_no_import_cycles():
    # Edges are module -> imported module; a package's __init__ re-exporting its own modules is
    # not a cycle of concern, so edges from a package to its children are dropped.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path):
    # The test above would pass vacuously if _imports found nothing: check it on a known file.
    assert "infalign_jax.core.calibration" in GRAPH["infalign_jax.rl.tasks.exact"]
