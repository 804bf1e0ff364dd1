"""bayesmeta.data imports only torch, torchvision, PIL, numpy and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import bayesmeta.data

ALLOWED = {"torch", "torchvision", "PIL", "numpy", "__future__"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_data_imports_point_one_way():
    package = Path(bayesmeta.data.__file__).parent
    files = sorted(package.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top == "bayesmeta":
                assert name.startswith("bayesmeta.data"), f"{path.name} imports {name}"
            else:
                allowed = top in ALLOWED or top in sys.stdlib_module_names
                assert allowed, f"{path.name} imports {name}"


def test_public_names():
    assert sorted(bayesmeta.data.__all__) == sorted(
        [
            "ClassSplit",
            "FewShotClassification",
            "ImageFolderTasks",
            "Omniglot",
            "RandomAffine",
            "Sinusoid",
            "SinusoidParams",
            "TaskBatch",
            "TaskDistribution",
            "TaskIndices",
            "affine_images",
            "folder_image",
            "load_image_folder",
            "omniglot_image",
            "packaged_omniglot_root",
        ]
    )
    assert all(hasattr(bayesmeta.data, name) for name in bayesmeta.data.__all__)
