"""Imports point one way: data → nets → models → inference → diagnostics → runs → bench → cli."""

import ast
from pathlib import Path

import pytest

import bayesmeta

ORDER = ["data", "nets", "models", "inference", "diagnostics", "runs", "bench", "cli"]
ROOT = Path(bayesmeta.__file__).parent


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "bayesmeta" else None


@pytest.mark.parametrize("layer", ORDER)
def test_a_layer_imports_only_layers_to_its_left(layer):
    allowed = set(ORDER[: ORDER.index(layer) + 1])
    files = list((ROOT / layer).rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                target = _layer(name)
                assert target is None or target in allowed, f"{path.name} imports {name}"
                if layer in ("data", "nets"):
                    assert not name.startswith("pyro"), f"{path.name} imports {name}"


def test_every_subpackage_names_its_public_api():
    for layer in ORDER:
        module = __import__(f"bayesmeta.{layer}", fromlist=["__all__"])
        assert module.__all__, layer
        for name in module.__all__:
            assert hasattr(module, name), f"bayesmeta.{layer}.{name}"


def _imports(path: Path) -> set[str]:
    """The bayesmeta modules a file imports, anywhere in it (a local import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {name for name in found if name.startswith("bayesmeta.")}


def test_no_module_imports_one_that_imports_it_back():
    """No import cycle between the package's modules (a subpackage's ``__init__`` aside,
    which names its modules' API)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        if path.name != "__init__.py":
            name = ".".join(("bayesmeta", *path.relative_to(ROOT).with_suffix("").parts))
            modules[name] = path
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return False

    cycles = [(a, b) for a in graph for b in graph[a] if reaches(b, a)]
    assert not cycles, cycles
    assert "bayesmeta.inference.learner" not in graph["bayesmeta.inference.training"]
