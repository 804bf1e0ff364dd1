"""Fake data sets that tests build for themselves: Omniglot trees and class-per-folder image sets
(the real data is never downloaded)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

SIZE = 8  # side of the fake PNGs; image_size=SIZE reads them without resizing


def png_bytes(seed: int) -> bytes:
    """A white SIZE x SIZE 1-bit image with black pixels at a position set by ``seed``."""
    image = Image.new("1", (SIZE, SIZE), 1)
    for i in range(3):
        image.putpixel(((seed + i) % SIZE, (seed * 3 + i) % SIZE), 0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root: Path, alphabets: dict[str, int] | None, classes: int = 0, drawings: int = 4):
    """``root/<alphabet>/character<j>/<k>.png`` (or ``root/class<j>/<k>.png`` without alphabets)."""
    folders = (
        [root / a / f"character{j:02d}" for a, n in alphabets.items() for j in range(n)]
        if alphabets
        else [root / f"class{j:02d}" for j in range(classes)]
    )
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        for k in range(drawings):
            (folder / f"{i:04d}_{k:02d}.png").write_bytes(png_bytes(i * drawings + k))
    return root


def fake_omniglot_download(
    monkeypatch, background: dict[str, int], evaluation: dict[str, int], drawings: int = 4
) -> list[tuple[Path, bool, bool]]:
    """Replace ``torchvision.datasets.Omniglot`` by a fake whose download lays out
    ``root/omniglot-py/images_{background,evaluation}/`` as torchvision's does, with the given
    alphabets (``{alphabet: characters}``). Returns the list of its calls,
    ``(root, background, download)``, which grows as it is called."""
    import torchvision  # slow to import, and only the tests that fake a download need it

    calls = []
    alphabets = {True: background, False: evaluation}

    class FakeOmniglot:
        def __init__(self, root, background=True, download=False, **kwargs):
            calls.append((Path(root), background, download))
            half = "images_background" if background else "images_evaluation"
            folder = Path(root) / "omniglot-py" / half
            if not folder.exists():
                write_tree(folder, alphabets[background], drawings=drawings)

    monkeypatch.setattr(torchvision.datasets, "Omniglot", FakeOmniglot)
    return calls


def colour(label: int, k: int) -> tuple[int, int, int]:
    return (10 * label, 5 * k, 200)


def write_folder(root: Path, classes: int, per_class: int = 4, size=(6, 5), ext="png") -> Path:
    """``root/cls<j>/<k>.<ext>``: solid RGB images of ``colour(j, k)``, ``size`` = (W, H)."""
    for j in range(classes):
        folder = root / f"cls{j:02d}"
        folder.mkdir(parents=True)
        for k in range(per_class):
            Image.new("RGB", size, colour(j, k)).save(folder / f"{k}.{ext}")
    return root
