"""Omniglot few-shot tasks (Lake et al. 2015), split by alphabet or by character."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from bayesmeta.data import _omniglot_files
from bayesmeta.data._common import ClassSplit, check_count, split_groups
from bayesmeta.data.fewshot import FewShotClassification

__all__ = ["Omniglot", "omniglot_image", "packaged_omniglot_root"]

#: Lake's two small background sets, shipped with the package (MIT; see LICENSE there).
_PACKAGED = Path(__file__).resolve().parent / "omniglot_small"
_PACKAGED_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


def packaged_omniglot_root() -> Path:
    """The folder of Omniglot data shipped inside the package, what :class:`Omniglot` reads
    when given no ``root``: Lake's two small background sets, ``images_background_small1.zip``
    and ``images_background_small2.zip`` (8 alphabets, 242 characters of 20 drawings each;
    2.9 MB, MIT, from github.com/brendenlake/omniglot),
    with their ``LICENSE`` and ``SHA256SUMS`` (checked when a zip is first read).

    Raises ``FileNotFoundError`` naming the missing file when the package was installed
    without its data.
    """
    for name in _PACKAGED_ZIPS:
        if not (_PACKAGED / name).is_file():
            raise FileNotFoundError(
                f"the packaged Omniglot file {_PACKAGED / name} is missing: bayesmeta was "
                "installed without its package data; reinstall it, or pass a root"
            )
    return _PACKAGED


def omniglot_image(source: str | Path | bytes | BinaryIO, image_size: int = 28) -> torch.Tensor:
    """Read a character image exactly as :class:`Omniglot` prepares its own, so that a learner
    meta-trained on Omniglot sees a user's drawings as it saw its training images.

    Parameters
    ----------
    source : path, bytes or binary file of an image (PNG, JPEG, ...)
        A drawing with dark strokes on a light background, as Omniglot's.
    image_size : int
        Side ``S`` of the square result (the ``image_size`` the learner was trained with).

    Returns
    -------
    float32 Tensor of shape ``[1, S, S]`` in ``[0, 1]``
        Grayscale, resized with PIL's box filter (ignoring the aspect ratio), inverted so that
        strokes are bright (1.0) on a dark background (0.0), divided by 255: one query or
        support image for ``learner.adapt`` / ``predict`` (stack them to ``[T, B, 1, S, S]``).
    """
    check_count("image_size", image_size)
    name = "<bytes>" if isinstance(source, bytes) else str(getattr(source, "name", source))
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    array = _omniglot_files.decode_character(data, name, image_size)
    return torch.from_numpy(array).float().div_(255.0)


#: Train/val/test fractions of the alphabets (or characters) when a split names none.
SPLIT_FRACTIONS = (0.6, 0.15, 0.25)


def _check_options(counts: dict[str, int], rotations, rootless_download) -> None:
    """Refuse, naming the argument, settings Omniglot cannot take."""
    for name, value in counts.items():
        check_count(name, value)
    if rotations not in (True, False, "all"):
        raise ValueError(f"rotations must be True, False or 'all', got {rotations!r}")
    if rootless_download:
        raise ValueError(
            "download=True needs a root: a writable folder to download torchvision's full "
            "Omniglot into (without a root the packaged small background sets are read)"
        )


def _choose(characters, names, split: ClassSplit, by: str) -> list[int]:
    """The indices of the split's characters: by alphabet or by character."""
    if by == "alphabet":
        alphabets = (a for a, _, _ in characters)
        keep = set(split_groups(alphabets, split, SPLIT_FRACTIONS, "alphabets"))
        return [i for i, (a, _, _) in enumerate(characters) if a in keep]
    keep = set(split_groups(names, split, SPLIT_FRACTIONS, "characters"))
    return [i for i, n in enumerate(names) if n in keep]


class Omniglot(FewShotClassification):
    """N-way K-shot tasks over Omniglot characters.

    Parameters
    ----------
    root : str or Path, optional
        Default: Lake's two small background sets shipped with the package
        (:func:`packaged_omniglot_root`). Else a folder holding one of these layouts, detected
        in this order (the first found is read):

        1. folders ``omniglot-py/images_background*/`` and ``omniglot-py/images_evaluation*/``,
           each ``<alphabet>/<character>/*.png`` (torchvision's layout, what ``download=True``
           makes), else zips of those names in ``omniglot-py/``;
        2. the same folders directly in ``root`` (Lake's repository unzipped), else the zips
           ``images_background*.zip`` / ``images_evaluation*.zip``, read in place (e.g. the
           small background sets ``images_background_small1.zip`` and ``..._small2.zip``);
        3. ``root`` as an ``<alphabet>/<character>/*.png`` tree, or a ``<class>/*.png`` tree
           (then there are no alphabets).

        All halves or zips found are merged, each character counted once (by alphabet and name:
        Greek and Latin are in both small sets, and the first copy is kept). A zip listed in a
        ``SHA256SUMS`` file beside it must match its SHA256 (else ``ValueError`` names it).
    ways, shots, queries : int
        ``N``, ``K``, ``Q`` (default 5-way 1-shot with 15 queries, as ``bayesmeta train``).
    split : {"train", "val", "test", "all"} or :class:`~bayesmeta.data.ClassSplit`
        The part of a seeded random partition of the alphabets (or of the characters, where
        the data has no alphabets or ``ClassSplit(by="character")``) into train/val/test. The
        default fractions (0.6, 0.15, 0.25) give 5/1/2 of the 8 alphabets in the small
        background sets and 30/8/12 of the 50 of the full set.
        ``ClassSplit("train", by="character", fractions=(1100, 100, 423))`` is the size of the
        Vinyals et al. (2016) split of the 1623 characters as used by Finn et al. (2017) (a
        different random draw of the characters).
    rotations : bool or "all"
        Add 90/180/270 degree turns of every character as new classes: ``True`` on the train
        split only (not on "val", "test" or "all"), ``"all"`` on every split, ``False`` never.
    image_size : int
        Side of the square images; resized from 105 x 105 with PIL's box filter.
    download : bool
        First call :meth:`download` (torchvision's download of both halves; needs network the
        first time), then read the folders it made. Needs a ``root`` to download into.

    Each character's alphabet is its class group: :meth:`within_groups` draws all ``N``
    characters of a task from one alphabet (Lake et al.'s 20-way one-shot protocol).

    Attributes
    ----------
    alphabets : list of str
        The split's alphabets (empty without alphabets).
    characters : list of str
        The split's characters as ``"<alphabet>/<character>"`` (or ``"<class>"``), before
        rotation; ``class_names`` adds the rotated ones (``"...@rot90"``).
    num_characters, num_classes, num_images : int

    Notes
    -----
    Images are single-channel uint8 with strokes bright (255, i.e. 1.0 in tasks) on a dark
    background. Splits are taken before rotation, so no turn of a test character is a train
    class. Decoded images are cached per file for the life of the process; see
    :meth:`clear_cache`.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        split: str | ClassSplit = "train",
        rotations: bool | str = True,
        image_size: int = 28,
        download: bool = False,
    ) -> None:
        counts = dict(ways=ways, shots=shots, queries=queries, image_size=image_size)
        split = ClassSplit.of(split)
        _check_options(counts, rotations, root is None and download)
        self.root = packaged_omniglot_root() if root is None else Path(root)
        if download:
            self.download(self.root)
        sources = _omniglot_files.find_sources(self.root)
        characters = _merge(_omniglot_files.read_source(s, image_size) for s in sources)
        has_alphabets = all(a is not None for a, _, _ in characters)
        by = split.by or ("alphabet" if has_alphabets else "character")
        if by == "alphabet" and not has_alphabets:
            raise ValueError(
                "split by='alphabet' needs an <alphabet>/<character> layout, but "
                f"{str(self.root)!r} holds classes without alphabets; use by='character'"
            )
        names = [c if a is None else f"{a}/{c}" for a, c, _ in characters]
        chosen = _choose(characters, names, split, by)
        images = [characters[i][2] for i in chosen]
        labels = torch.cat([torch.full((len(x),), j) for j, x in enumerate(images)])
        self.split, self.split_by, self.class_split = split.part, by, split
        self.characters = [names[i] for i in chosen]
        self.alphabets = sorted({characters[i][0] for i in chosen}) if has_alphabets else []
        groups = None
        if has_alphabets:
            index = {a: i for i, a in enumerate(self.alphabets)}
            groups = torch.tensor([index[characters[i][0]] for i in chosen])
        rotate = rotations == "all" or (rotations is True and split.part == "train")
        super().__init__(
            torch.cat(images),
            labels,
            ways,
            shots,
            queries,
            class_names=self.characters,
            rotate_classes=rotate,
            class_groups=groups,
        )

    @property
    def num_characters(self) -> int:
        """The split's number of characters before rotation."""
        return len(self.characters)

    @staticmethod
    def download(root: str | Path) -> None:
        """Fetch both halves of torchvision's full Omniglot into ``root`` (created if missing)
        as ``root/omniglot-py/images_{background,evaluation}/``. Torchvision checks the zips' MD5
        and skips a half whose zip is already there; a half whose folder is there without its
        zip (unpacked by hand) is left as it is. Raises ``OSError`` naming the half and the
        folder when a download fails."""
        import torchvision.datasets  # slow to import, and only needed here

        base = Path(root) / "omniglot-py"
        Path(root).mkdir(parents=True, exist_ok=True)
        for background in (True, False):
            half = "images_background" if background else "images_evaluation"
            if (base / half).is_dir() and not (base / f"{half}.zip").exists():
                continue  # put there by hand: torchvision would want its zip back
            try:
                torchvision.datasets.Omniglot(str(root), background=background, download=True)
            except (OSError, RuntimeError) as err:  # offline (URLError), or a bad MD5
                raise OSError(
                    f"cannot download Omniglot's {half} into {root}: {err}; without network, "
                    f"put the folder {base / half} there yourself"
                ) from err

    @staticmethod
    def clear_cache() -> None:
        """Forget every decoded Omniglot image held by this process."""
        _omniglot_files.clear_cache()


def _merge(
    sources: Iterable[list[_omniglot_files.Character]],
) -> list[_omniglot_files.Character]:
    """The union of the sources' characters, each (alphabet, character) once, sorted."""
    merged: dict[tuple[str | None, str], _omniglot_files.Character] = {}
    for characters in sources:
        for character in characters:
            merged.setdefault((character[0], character[1]), character)
    return [merged[k] for k in sorted(merged, key=lambda k: (k[0] or "", k[1]))]
