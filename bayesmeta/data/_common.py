"""Helpers shared by the image task distributions: checks, class splits and image decoding."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
SPLITS = ("train", "val", "test")
_A = TypeVar("_A")
_B = TypeVar("_B")


@dataclass(frozen=True)
class ClassSplit:
    """One part of a seeded random partition of a data set's classes into train/val/test.

    A task distribution's ``split`` is one of these, or the name of its ``part`` (the other
    fields at their defaults). The partition depends only on the sorted set of what is
    partitioned, ``fractions`` and ``seed``, so the three parts of one seed never overlap.

    Parameters
    ----------
    part : {"train", "val", "test", "all"}
    seed : int
        Seed of the random partition.
    fractions : three floats summing to 1, or three ints, optional
        Train/val/test fractions, rounded by largest remainder, or three ints summing to the
        number of groups, giving exact sizes. ``None``: the data set's default (Omniglot: 0.6 /
        0.15 / 0.25 of the alphabets; :class:`~bayesmeta.data.ImageFolderTasks`:
        miniImageNet's 0.64 / 0.16 / 0.2 of the classes).
    by : {"alphabet", "character"}, optional
        What an :class:`~bayesmeta.data.Omniglot` split partitions; default "alphabet" where
        the data has alphabets (test tasks then come from unseen alphabets), else "character".
        Other data sets partition their classes and take ``None``.
    """

    part: str = "train"
    seed: int = 0
    fractions: tuple[float, float, float] | None = None
    by: str | None = None

    def __post_init__(self) -> None:
        if self.part not in SPLITS + ("all",):
            raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {self.part!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"split seed must be an int, got {self.seed!r}")
        if self.fractions is not None:
            split_sizes(1, self.fractions, "classes", check_only=True)
            object.__setattr__(self, "fractions", tuple(self.fractions))
        if self.by not in (None, "alphabet", "character"):
            raise ValueError(f"split by must be 'alphabet', 'character' or None, got {self.by!r}")

    @staticmethod
    def of(split: str | ClassSplit) -> ClassSplit:
        """``split`` as a :class:`ClassSplit` (a name is its ``part``)."""
        if isinstance(split, ClassSplit):
            return split
        if isinstance(split, str):
            return ClassSplit(split)
        raise TypeError(f"split must be a part's name or a ClassSplit, got {type(split).__name__}")


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


def split_sizes(
    n: int, fractions: Sequence[float], what: str, check_only: bool = False
) -> tuple[int, int, int]:
    """Sizes of the train/val/test splits of ``n`` groups.

    ``fractions`` are three numbers >= 0 summing to 1 (rounded by largest remainder, ties to the
    earlier split) or three ints summing to ``n`` (exact sizes). ``check_only``: check the
    fractions' form without ``n`` (returns ``(0, 0, 0)``).
    """
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        raise ValueError(f"split fractions must be three numbers, got {fractions!r}") from None
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"split fractions must be three numbers >= 0, got {fractions!r}")
    counts = all(isinstance(f, int) and not isinstance(f, bool) for f in fractions)
    if counts and check_only:
        return 0, 0, 0
    if counts:
        if sum(fractions) != n:
            raise ValueError(
                f"split fractions given as counts must sum to the number of {what} ({n}), "
                f"got {tuple(fractions)} (sum {sum(fractions)})"
            )
        return tuple(int(f) for f in fractions)  # type: ignore[return-value]
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions!r} (sum {sum(values)})")
    if check_only:
        return 0, 0, 0
    quotas = [v * n for v in values]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(3), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes[0], sizes[1], sizes[2]


def split_groups(
    names: Iterable[str], split: ClassSplit, default_fractions: Sequence[float], what: str
) -> list[str]:
    """The sorted names of one part of ``names``, a seeded random partition into
    train/val/test (``split.fractions``, else ``default_fractions``).

    ``split.part == "all"`` returns every name. The partition depends only on the sorted set of
    names, the fractions and the seed, so the three parts of one seed never overlap.
    """
    unique = sorted(set(names))
    if split.part == "all":
        return unique
    fractions = default_fractions if split.fractions is None else split.fractions
    sizes = split_sizes(len(unique), fractions, what)
    i = SPLITS.index(split.part)
    if sizes[i] == 0:
        raise ValueError(
            f"split {split.part!r} would be empty: split fractions {tuple(fractions)} of "
            f"{len(unique)} {what} give train/val/test sizes {sizes}; use more {what} or "
            "other fractions"
        )
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(split.seed))
    start = sum(sizes[:i])
    return sorted(unique[j] for j in perm.tolist()[start : start + sizes[i]])


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
