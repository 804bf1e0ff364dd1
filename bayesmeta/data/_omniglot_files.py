"""Finding and decoding Omniglot on disk: torchvision's folders, Lake's zips, or a plain tree.

Decoded characters are cached per source (a zip or a folder tree) in a module-level dict, keyed by
the resolved path, a size/mtime fingerprint and the image size, because decoding the 4840 PNGs
of the small background sets takes about a second and tests build many distributions. A zip
listed in a ``SHA256SUMS`` file beside it is checked against it before it is first decoded.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from bayesmeta.data._common import decode_image, is_image_file, list_dirs, list_images, thread_map

# (alphabet or None, character, images uint8 [n, 1, H, W])
Character = tuple[str | None, str, torch.Tensor]

_HALVES = ("images_background*", "images_evaluation*")
LOOKED_FOR = (
    "torchvision's folders omniglot-py/images_background and omniglot-py/images_evaluation; "
    "Lake's folders images_background*/ and images_evaluation*/; "
    "Lake's zips images_background*.zip and images_evaluation*.zip (e.g. "
    "images_background_small1.zip); "
    "an <alphabet>/<character>/*.png tree; a <class>/*.png tree"
)
#: A file beside zips that lists their SHA256 as ``sha256sum`` writes it (``<hex>  <name>``).
SUMS_NAME = "SHA256SUMS"
_CACHE: dict[tuple, list[Character]] = {}


@dataclass(frozen=True)
class Source:
    """One place to read characters from: ``kind`` is "zip", "alphabets" or "classes"."""

    kind: str
    path: Path


def find_sources(root: Path) -> list[Source]:
    """Every source under ``root``, by the first layout that matches.

    Order: ``root/omniglot-py`` folders, then zips, then ``root`` folders, then zips, then ``root``
    as a tree of alphabets or of classes. Raises ``ValueError`` listing what was looked for.
    """
    if not root.is_dir():
        raise ValueError(f"root must be an existing folder, got {str(root)!r} (not found)")
    for base in (root / "omniglot-py", root):
        if not base.is_dir():
            continue
        halves = sorted({p for pattern in _HALVES for p in base.glob(pattern)})
        folders = [p for p in halves if p.is_dir()]
        if folders:
            return [Source("alphabets", p) for p in folders]
        zips = [p for p in halves if p.is_file() and p.suffix.lower() == ".zip"]
        if zips:
            return [Source("zip", p) for p in zips]
    kind = _tree_kind(root)
    if kind is None:
        what = "is empty" if not any(root.iterdir()) else "holds none of these"
        raise ValueError(f"root {str(root)!r} {what}; looked for {LOOKED_FOR}")
    return [Source(kind, root)]


def _tree_kind(root: Path) -> str | None:
    """The layout of a plain tree: "classes", "alphabets" or None (see `find_sources`)."""
    has_images = {d: bool(list_images(d)) for d in list_dirs(root)}
    if not has_images:
        return None
    if all(has_images.values()):
        return "classes"
    nested = [d for d, direct in has_images.items() if not direct]
    if any(has_images.values()):
        raise ValueError(
            f"root {str(root)!r} mixes class folders holding images with folders that hold "
            f"none (e.g. {nested[0].name!r}); expected a <class>/*.png or an "
            "<alphabet>/<character>/*.png tree"
        )
    if any(list_images(c) for d in nested for c in list_dirs(d)):
        return "alphabets"
    return None


def read_source(source: Source, image_size: int) -> list[Character]:
    """The characters of one source, decoded (cached; see the module docstring)."""
    if source.kind == "zip":
        stat = source.path.stat()
        key = ("zip", str(source.path.resolve()), stat.st_size, stat.st_mtime_ns, image_size)
        if key not in _CACHE:
            check_sha256(source.path)
            _CACHE[key] = _read_zip(source.path, image_size)
        return _CACHE[key]
    files = _tree_files(source)
    digest = hashlib.sha1()
    for alphabet, character, path in files:
        stat = path.stat()
        digest.update(
            f"{alphabet}/{character}/{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode()
        )
    key = (source.kind, str(source.path.resolve()), digest.hexdigest(), image_size)
    if key not in _CACHE:
        members = [((a, c), p, str(p)) for a, c, p in files]
        _CACHE[key] = _decode_characters(members, image_size)
    return _CACHE[key]


def check_sha256(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` when a ``SHA256SUMS`` beside it lists another
    SHA256 for it (a damaged or changed file); a file it does not list, or no such file, passes."""
    sums = path.parent / SUMS_NAME
    if not sums.is_file():
        return
    expected = None
    for line in sums.read_text().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == path.name:
            expected = fields[0].lower()
    if expected is None:
        return
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{str(path)!r} does not match its SHA256 in {str(sums)!r} (expected {expected}, "
            f"found {actual}): the file is damaged or was changed; restore it"
        )


def clear_cache() -> None:
    _CACHE.clear()


def _tree_files(source: Source) -> list[tuple[str | None, str, Path]]:
    if source.kind == "classes":
        return [(None, c.name, p) for c in list_dirs(source.path) for p in list_images(c)]
    return [
        (a.name, c.name, p)
        for a in list_dirs(source.path)
        for c in list_dirs(a)
        for p in list_images(c)
    ]


def _read_zip(path: Path, image_size: int) -> list[Character]:
    try:
        with zipfile.ZipFile(path) as archive:
            members = []
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                parts = info.filename.split("/")
                if info.is_dir() or not is_image_file(parts[-1]) or "__MACOSX" in parts:
                    continue
                if len(parts) < 2:
                    continue
                alphabet = parts[-3] if len(parts) >= 3 else None
                try:
                    data = archive.read(info)
                except (zlib.error, EOFError) as err:  # corrupt or cut deflate data
                    raise ValueError(
                        f"cannot read zip {str(path)!r}: member {info.filename!r} is damaged "
                        f"({type(err).__name__}: {err})"
                    ) from err
                members.append(((alphabet, parts[-2]), data, f"{path}:{info.filename}"))
    except zipfile.BadZipFile as err:  # (also a CRC mismatch)
        raise ValueError(f"cannot read zip {str(path)!r}: {err}") from err
    return _decode_characters(members, image_size)


def decode_character(source: str | Path | BinaryIO, name: str, image_size: int) -> np.ndarray:
    """One drawing as the tasks hold it: uint8 ``[1, S, S]``, grayscale, resized from 105 x 105
    with PIL's box filter and inverted, since Omniglot draws dark strokes on white and the
    tasks want strokes bright (255) on a dark background (0)."""
    return 255 - decode_image(source, name, (image_size, image_size), "L", Image.Resampling.BOX)


def _decode_characters(
    members: list[tuple[tuple[str | None, str], bytes | Path, str]],
    image_size: int,
) -> list[Character]:
    """Decode ``(key, bytes or path, name)`` members, inverted so strokes are bright."""

    def decode(member: tuple[tuple[str | None, str], bytes | Path, str]) -> np.ndarray:
        _, data, name = member
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        return decode_character(source, name, image_size)

    if not members:
        return []
    # Sorted so that each character's images are one slice (slices beat index tensors here).
    members = sorted(members, key=lambda m: (m[0][0] or "", m[0][1]))
    images = torch.from_numpy(np.stack(thread_map(decode, members, None)))
    characters = []
    start = 0
    for (alphabet, character), group in itertools.groupby(m[0] for m in members):
        stop = start + sum(1 for _ in group)
        characters.append((alphabet, character, images[start:stop]))
        start = stop
    return characters
