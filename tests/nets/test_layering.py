"""bayesmeta.nets sits below models/inference: it imports torch and itself, never Pyro."""

import ast
from pathlib import Path

import bayesmeta.nets

NETS_DIR = Path(bayesmeta.nets.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_nets_imports_only_torch_and_itself():
    files = sorted(NETS_DIR.glob("*.py"))
    assert files
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            allowed = top in {"torch", "__future__", "collections", "math", "typing"}
            assert allowed or name.startswith("bayesmeta.nets"), f"{path.name} imports {name}"


def test_public_api():
    assert bayesmeta.nets.__all__ == ["MLP", "Conv4", "batched_forward", "head_parameter_names"]
