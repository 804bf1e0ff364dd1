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
