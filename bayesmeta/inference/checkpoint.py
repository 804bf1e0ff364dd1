"""Atomic checkpoints that load without unpickling code, and that notice damage.

A checkpoint is one ``torch.save`` file of tensors, numbers, strings, lists and dicts only, read
back with ``torch.load(weights_only=True)``. It is written to a temporary file in the same folder,
flushed and fsynced, then moved over the old one with ``os.replace``: a crash leaves either the
old checkpoint or the new one, never half of one.

``torch.load`` does not notice a flipped bit in a tensor's bytes (they are stored raw) or an
edited character in a string, so a damaged file would load as other weights or another
configuration without a word. Each checkpoint therefore carries the SHA-256 of its whole payload
(:func:`payload_digest`: tensors, and the config, run and history strings, numbers and every other
entry) under :data:`CHECKSUM_KEY`, checked on load; a file without one is refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write",
    "payload_digest",
    "writable_folder",
]

FORMAT = "bayesmeta-checkpoint-1"
#: Payload key of the whole payload's SHA-256 (hex, :func:`payload_digest`).
CHECKSUM_KEY = "payload_sha256"
# Read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(fh)`` atomically; returns the path.

    The bytes go to a temporary file in the same folder, flushed and fsynced, then moved over
    the old file with ``os.replace``, and the rename is fsynced: a crash leaves the old file or
    the new one, never half of one. The file gets the mode a plain ``open()`` would give it (an
    existing file keeps its own), not ``mkstemp``'s private 0600.

    A failed write (a full disk, a quota, the file size limit) removes the temporary file and
    raises an ``OSError`` whose ``filename`` is ``path``, also where ``write`` wrapped the
    error in another (``torch.save`` raises a ``RuntimeError`` for it).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is None or cause.filename is not None:
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from err
    # Persist the rename itself.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _os_error(err: BaseException) -> OSError | None:
    """The ``OSError`` that ``err`` is or was raised from (``None`` if it has none)."""
    seen: set[int] = set()
    cause: BaseException | None = err if isinstance(err, Exception) else None
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def writable_folder(path: str | os.PathLike, name: str = "checkpoint_dir") -> Path:
    """``path`` as a folder that files can be written into: created if missing (with its
    parents), then tried with a temporary file. ``ValueError`` naming ``name`` otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} must be a folder, got {str(path)!r}, which is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(
            f"{name} must be a writable folder, got {str(path)!r}: {err.strerror or err}"
        ) from err
    return path


def payload_digest(payload: Any) -> str:
    """SHA-256 (hex) of everything in ``payload``: every tensor (its place, i.e. the keys and
    indices that lead to it, dtype, shape and bytes), every other entry (its place, type and
    ``repr``: the config, run and history strings, numbers, flags) and the length of every dict
    and list, in a fixed order (dict keys sorted), so that a payload and the same payload loaded
    back give the same digest."""
    digest = hashlib.sha256()

    def visit(obj: Any, where: str) -> None:
        if isinstance(obj, torch.Tensor):
            data = obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{where}|{obj.dtype}|{tuple(obj.shape)}|".encode())
            digest.update(data.numpy().tobytes())
        elif isinstance(obj, dict):
            digest.update(f"{where}|dict|{len(obj)}\n".encode())
            for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
                visit(obj[key], f"{where}/{key!r}")
        elif isinstance(obj, (list, tuple)):
            digest.update(f"{where}|list|{len(obj)}\n".encode())
            for i, item in enumerate(obj):
                visit(item, f"{where}/{i}")
        else:  # str, int, float, bool, None, and whatever else weights_only reads back
            digest.update(f"{where}|{type(obj).__name__}|{obj!r}\n".encode())

    visit(payload, "")
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`) with the checksum of its
    whole content (:func:`payload_digest`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in payload.items() if k not in ("format", CHECKSUM_KEY)}
    body = {"format": FORMAT, **body}
    body[CHECKSUM_KEY] = payload_digest(body)
    return atomic_write(path, lambda fh: torch.save(body, fh))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles code); its content
    is checked against the checksum it carries (``ValueError`` naming the file if damaged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file
        raise ValueError(f"{path} is not a readable bayesmeta checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bayesmeta checkpoint (format {FORMAT!r} expected)")
    expected = payload.pop(CHECKSUM_KEY, None)
    if expected is None:
        raise ValueError(
            f"{path} is not a bayesmeta checkpoint: it carries no checksum ({CHECKSUM_KEY!r}), "
            "which save_checkpoint always writes"
        )
    if payload_digest(payload) != expected:
        raise ValueError(
            f"{path} is damaged: its content (tensors, config, run, history or another entry) "
            "does not match the SHA-256 written with it (the file changed after it was saved, "
            "e.g. a flipped bit or an edited string); restore it from a copy or retrain"
        )
    return payload
