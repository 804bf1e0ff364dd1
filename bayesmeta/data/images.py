"""Class-per-folder image sets (e.g. miniImageNet as ``root/<class>/*.jpg``) as few-shot tasks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from bayesmeta.data._common import (
    SPLITS,
    ClassSplit,
    check_count,
    decode_image,
    list_dirs,
    list_images,
    split_groups,
    thread_map,
)
from bayesmeta.data.fewshot import FewShotClassification

__all__ = ["ImageFolderTasks", "load_image_folder", "folder_image"]

_RESAMPLE = Image.Resampling.LANCZOS
#: Train/val/test fractions of the classes when a split names none (miniImageNet's 64/16/20).
SPLIT_FRACTIONS = (0.64, 0.16, 0.2)


def folder_image(
    source: str | Path | BinaryIO, image_size: int | tuple[int, int], grayscale: bool = False
) -> torch.Tensor:
    """Read one image exactly as :func:`load_image_folder` (and so :class:`ImageFolderTasks`)
    prepares its images, for a learner meta-trained on them.

    Unlike :func:`bayesmeta.data.omniglot_image` it keeps the colours (or takes PIL's
    grayscale), resizes with the Lanczos filter and does not invert.

    Returns
    -------
    float32 Tensor of shape ``[C, H, W]`` in ``[0, 1]`` (``C`` = 1 or 3)
    """
    size = _check_size(image_size)
    name = str(getattr(source, "name", source))
    array = decode_image(source, name, size, "L" if grayscale else "RGB", _RESAMPLE)
    return torch.from_numpy(array.copy()).float().div_(255.0)


def _check_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        check_count("image_size", image_size)
        return image_size, image_size
    try:
        height, width = image_size  # type: ignore[misc]
        return check_count("image_size", height), check_count("image_size", width)
    except (TypeError, ValueError):
        raise ValueError(
            f"image_size must be a positive int or a pair (H, W) of them, got {image_size!r}"
        ) from None


def _class_folders(root: Path) -> list[Path]:
    """The folders under ``root`` that hold images, or a ``ValueError`` naming ``root``."""
    if not root.is_dir():
        raise ValueError(f"root must be an existing folder, got {str(root)!r} (not found)")
    folders = [d for d in list_dirs(root) if list_images(d)]
    if not folders:
        raise ValueError(f"root {str(root)!r} holds no <class>/<image> folders")
    return folders


def load_image_folder(
    root: str | Path,
    image_size: int | tuple[int, int],
    grayscale: bool = False,
    classes: Sequence[str] | None = None,
    num_workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a ``root/<class>/*.{png,jpg,...}`` tree into memory.

    Parameters
    ----------
    root : str or Path
    image_size : int or (int, int)
        Output size ``H = W`` or ``(H, W)``; images are resized with PIL's Lanczos filter
        (ignoring their aspect ratio, as in the usual miniImageNet preprocessing).
    grayscale : bool
        One channel instead of three (RGB).
    classes : sequence of str, optional
        Read only these class folders (default: every folder that holds images).
    num_workers : int, optional
        Threads that decode images (default: up to 8 CPUs).

    Returns
    -------
    images : uint8 Tensor of shape ``[M, C, H, W]``
    labels : int64 Tensor of shape ``[M]``
        Index into ``class_names``.
    class_names : list of str
        Sorted folder names.
    """
    folders = _class_folders(Path(root))
    if classes is not None:
        found = {d.name: d for d in folders}
        missing = sorted(set(classes) - set(found))
        if missing:
            raise ValueError(f"classes not found under root {str(root)!r}: {missing}")
        folders = [found[c] for c in sorted(set(classes))]
    return _load(
        folders, [d.name for d in folders], _check_size(image_size), grayscale, num_workers
    )


def _load(
    folders: Sequence[Path],
    names: list[str],
    size: tuple[int, int],
    grayscale: bool,
    num_workers: int | None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files = [(label, path) for label, d in enumerate(folders) for path in list_images(d)]
    mode = "L" if grayscale else "RGB"

    def decode(item: tuple[int, Path]) -> np.ndarray:
        return decode_image(item[1], str(item[1]), size, mode, _RESAMPLE)

    images = torch.from_numpy(np.stack(thread_map(decode, files, num_workers)))
    labels = torch.tensor([label for label, _ in files], dtype=torch.int64)
    return images, labels, names


class ImageFolderTasks(FewShotClassification):
    """N-way K-shot tasks over a class-per-folder image set, e.g. miniImageNet.

    Parameters
    ----------
    root : str or Path
        Either ``root/<class>/*.jpg`` (classes split at random by ``split``'s seed) or, when its
        only folders are among ``train``, ``val`` and ``test``, ``root/<split>/<class>/*.jpg``
        (the given splits, e.g. miniImageNet's Ravi & Larochelle 2017 split).
    ways, shots, queries : int
        ``N``, ``K``, ``Q``.
    split : {"train", "val", "test", "all"} or :class:`~bayesmeta.data.ClassSplit`
        The part of a seeded random partition of the classes (its default fractions give
        miniImageNet's 64/16/20 of 100 classes); the seed and fractions are unused with given
        split folders.
    image_size : int or (int, int)
        See :func:`load_image_folder` (84 for miniImageNet).
    grayscale : bool

    Notes
    -----
    Only the split's images are read. Class names are the folder names, prefixed with
    ``"<split>/"`` for given split folders with ``split="all"``.
    """

    def __init__(
        self,
        root: str | Path,
        ways: int,
        shots: int,
        queries: int,
        split: str | ClassSplit = "train",
        image_size: int | tuple[int, int] = 84,
        grayscale: bool = False,
    ) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            check_count(name, value)
        class_split = ClassSplit.of(split)
        if class_split.by is not None:
            raise ValueError(
                f"ImageFolderTasks splits classes; split by must be None, got {class_split.by!r}"
            )
        split = class_split.part
        size = _check_size(image_size)
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be an existing folder, got {str(root)!r} (not found)")
        given = list_dirs(root)
        if given and {d.name for d in given} <= set(SPLITS):
            parts = [d for d in given if split in ("all", d.name)]
            if not parts:
                raise ValueError(f"split {split!r} has no folder {str(root / split)!r}")
            folders = [c for d in parts for c in _class_folders(d)]
            prefix = split == "all"
            names = [f"{c.parent.name}/{c.name}" if prefix else c.name for c in folders]
        else:
            every = _class_folders(root)
            names = (d.name for d in every)
            keep = set(split_groups(names, class_split, SPLIT_FRACTIONS, "classes"))
            folders = [d for d in every if d.name in keep]
            names = [d.name for d in folders]
        images, labels, names = _load(folders, names, size, grayscale, None)
        self.root = root
        self.split, self.class_split = split, class_split
        super().__init__(images, labels, ways, shots, queries, class_names=names)
