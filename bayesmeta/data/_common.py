"""Private helpers shared by the image task distributions: checks, splits and image decoding."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
SPLITS = ("train", "val", "test")
_A = TypeVar("_A")
_B = TypeVar("_B")


def check_count(name: str, value: object) -> int:
    """``value`` as a positive int, or a ``ValueError`` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def resolve_generator(generator: torch.Generator | None) -> torch.Generator:
    """The generator to draw from: ``None`` means ``torch.default_generator`` (global CPU)."""
    if generator is None:
        return torch.default_generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    return generator


def is_image_file(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not Path(name).name.startswith(".")


def list_dirs(path: Path) -> list[Path]:
    """Visible subdirectories of ``path``, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(path: Path) -> list[Path]:
    """Image files directly inside ``path``, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p.name))


def split_sizes(n: int, fractions: Sequence[float], what: str) -> tuple[int, int, int]:
    """Sizes of the train/val/test splits of ``n`` groups.

    ``fractions`` are three numbers >= 0 summing to 1 (rounded by largest remainder, ties to the
    earlier split) or three ints summing to ``n`` (exact sizes).
    """
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise ValueError(f"split_fractions must be three numbers, got {fractions!r}") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"split_fractions must be three numbers >= 0, got {fractions!r}")
    if all(isinstance(f, int) and not isinstance(f, bool) for f in fractions):
        if sum(fractions) != n:
            raise ValueError(
                f"split_fractions given as counts must sum to the number of {what} ({n}), "
                f"got {tuple(fractions)} (sum {sum(fractions)})"
            )
        return tuple(int(f) for f in fractions)  # type: ignore[return-value]
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    quotas = [v * n for v in values]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes[0], sizes[1], sizes[2]


def split_groups(
    names: Iterable[str], split: str, fractions: Sequence[float], seed: int, what: str
) -> list[str]:
    """The sorted names of one split of ``names``, a seeded random partition into train/val/test.

    ``split="all"`` returns every name. The partition depends only on the sorted set of names, the
    fractions and ``seed``, so the three splits of one ``seed`` never overlap.
    """
    unique = sorted(set(names))
    if split == "all":
        return unique
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"split_seed must be an int, got {seed!r}")
    sizes = split_sizes(len(unique), fractions, what)
    i = SPLITS.index(split)
    if sizes[i] == 0:
        raise ValueError(
            f"split {split!r} would be empty: split_fractions {tuple(fractions)} of "
            f"{len(unique)} {what} give train/val/test sizes {sizes}; use more {what} or "
            "other split_fractions"
        )
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    start = sum(sizes[:i])
    return sorted(unique[j] for j in perm[start : start + sizes[i]])


def decode_image(
    source: str | Path | BinaryIO,
    name: str,
    size: tuple[int, int],
    mode: str,
    resample: Image.Resampling,
) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` in PIL ``mode`` ("L" or "RGB"), resized to ``size`` (H, W).

    Raises ``ValueError`` naming ``name`` when the file is not a readable image.
    """
    try:
        with Image.open(source) as im:
            im = im.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {name}: {err}") from err
    height, width = size
    if im.size != (width, height):
        im = im.resize((width, height), resample)
    array = np.asarray(im, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def thread_map(fn: Callable[[_A], _B], items: Sequence[_A], num_workers: int | None) -> list[_B]:
    """``[fn(x) for x in items]`` on a thread pool (PIL releases the GIL while decoding)."""
    workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
    if workers <= 1 or len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
