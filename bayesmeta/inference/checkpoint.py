"""Atomic checkpoints that load without unpickling code.

A checkpoint is one ``torch.save`` file of tensors, numbers, strings, lists and dicts only, read
back with ``torch.load(weights_only=True)``. It is written to a temporary file in the same folder,
flushed and fsynced, then moved over the old one with ``os.replace``: a crash leaves either the
old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write"]

FORMAT = "bayesmeta-checkpoint-1"
# Read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(fh)`` atomically; returns the path.

    The bytes go to a temporary file in the same folder, flushed and fsynced, then moved over
    the old file with ``os.replace``, and the rename is fsynced: a crash leaves the old file or
    the new one, never half of one. The file gets the mode a plain ``open()`` would give it (an
    existing file keeps its own), not ``mkstemp``'s private 0600.
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Persist the rename itself.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda fh: torch.save({"format": FORMAT, **payload}, fh))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file
        raise ValueError(f"{path} is not a readable bayesmeta checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a bayesmeta checkpoint (format {FORMAT!r} expected)")
    return payload
