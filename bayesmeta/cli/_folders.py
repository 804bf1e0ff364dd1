"""Folders the command line writes into: a marker that says which files are bayesmeta's, and a
lock that keeps a second process out while one writes.

A run folder is recognised by :data:`MARKER_NAME`, which only this package writes: a run id and
the files the package wrote there. ``bayesmeta train --force`` deletes those files and nothing
else; a folder without the marker is never cleared (a ``config.json`` alone proves nothing: other
tools write one too). While a command writes into a folder it holds an exclusive
:func:`fcntl.flock` on :data:`LOCK_NAME` there, recording its pid, host and start time, so that
a second process fails at once with one line naming the holder instead of interleaving its files
with the first's. The kernel drops a flock when its process dies, so a killed run never leaves a
stale lock behind (only a lock file, which the next process takes over).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import bayesmeta as bm
from bayesmeta.runs import UsageError, write_json

try:
    import fcntl
except ImportError:  # not on a POSIX system: no lock (the marker still guards deletion)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MARKER_NAME",
    "LOCK_NAME",
    "FolderLock",
    "read_marker",
    "write_marker",
    "record_files",
    "clear_run",
    "remove_leftovers",
    "holds_only_bookkeeping",
    "make_folder",
    "remove_made_folder",
]

MARKER_NAME = ".bayesmeta-run.json"
LOCK_NAME = ".bayesmeta.lock"
MARKER_FORMAT = "bayesmeta-run-1"


class FolderLock:
    """Exclusive lock on ``folder`` for as long as the ``with`` block runs.

    Parameters
    ----------
    folder : Path, an existing folder (the lock file is created in it)
    what : how messages name the folder, e.g. ``"run folder"``

    Raises
    ------
    UsageError
        If another process holds the lock (naming its pid, host and start time), or if the
        folder cannot be written.
    """

    def __init__(self, folder: Path, what: str = "run folder"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        path = self.folder / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                message = f"cannot write to {self.what} {self.folder}: {err.strerror or err}"
                raise UsageError(message) from err
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(os.pread(fd, 4096, 0))
                os.close(fd)
                raise UsageError(
                    f"{self.what} {self.folder} is in use by another bayesmeta process "
                    f"({holder}); wait for it to finish or stop it, or choose another folder"
                ) from None
            # The holder before us unlinks the file as it lets go: a lock on that unlinked
            # file guards nothing, so take the one now at the path instead.
            try:
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_utc": _now(),
            "command": " ".join(["bayesmeta", *sys.argv[1:]]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            # Unlinked while still held (see __enter__), so that no lock file is left in the
            # folder; a killed process leaves one, which the next holder simply takes over.
            with contextlib.suppress(OSError):
                (self.folder / LOCK_NAME).unlink()
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started_utc']}"
    except (ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The folder's marker, or ``None`` when it has none (or one that is not bayesmeta's)."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return marker


def write_marker(folder: Path, files: Iterable[str], run_id: str | None = None) -> dict:
    """Mark ``folder`` as a run folder whose bayesmeta files are ``files`` (a fresh run id
    unless ``run_id``); returns the marker."""
    marker = {
        "format": MARKER_FORMAT,
        "run_id": run_id or uuid.uuid4().hex,
        "created_utc": _now(),
        "bayesmeta_version": bm.__version__,
        "files": sorted(set(files)),
    }
    write_json(Path(folder) / MARKER_NAME, marker)
    return marker


def record_files(folder: Path, *names: str) -> None:
    """Add ``names`` to the files of ``folder``'s marker, before they are written (a kill in
    between leaves a listed file missing, never a bayesmeta file unlisted). A folder without
    a marker (written by an older version) is left without one."""
    marker = read_marker(folder)
    if marker is not None and not set(names) <= set(marker["files"]):
        write_marker(folder, [*marker["files"], *names], marker["run_id"])


def remove_leftovers(folder: Path, names: Iterable[str]) -> list[str]:
    """Delete the temporary files that a killed atomic write of one of ``names`` left in
    ``folder`` (``.NAME.*.tmp``, see :func:`bayesmeta.inference.checkpoint.atomic_write`);
    returns their names. Call it only under the folder's lock: a live writer's are in use."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_file():
                tmp.unlink()
                removed.append(tmp.name)
    return removed


def clear_run(folder: Path, allowed: Iterable[str]) -> list[str]:
    """Delete the files that ``folder``'s marker lists, if they are among ``allowed`` (the
    names bayesmeta writes there), their leftover temporary files, and the marker; returns
    what was deleted. Anything else in the folder stays.

    A listed folder (e.g. ``diagnostics``) is never deleted whole: only its entries that
    ``allowed`` names as ``"diagnostics/NAME"`` go, and the folder itself once it is empty, so
    that a file of the user's own inside it stays, with the folder."""
    marker = read_marker(folder)
    if marker is None:
        raise UsageError(f"{folder} is not marked as a bayesmeta run folder; nothing was deleted")
    allowed = set(allowed)
    names = [n for n in marker["files"] if n in allowed]
    deleted = remove_leftovers(folder, [*names, MARKER_NAME])
    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            deleted += _clear_subfolder(Path(folder), name, allowed)
            continue
        if path.exists() or path.is_symlink():
            path.unlink()
            deleted.append(name)
    (Path(folder) / MARKER_NAME).unlink(missing_ok=True)
    return deleted


def _clear_subfolder(folder: Path, name: str, allowed: set[str]) -> list[str]:
    """Delete the files of ``folder/name`` that ``allowed`` lists as ``name/FILE`` (and their
    leftover temporary files), then the subfolder if nothing else is left in it."""
    sub = folder / name
    inside = [n.split("/", 1)[1] for n in allowed if n.startswith(f"{name}/")]
    deleted = [f"{name}/{tmp}" for tmp in remove_leftovers(sub, inside)]
    for file in inside:
        path = sub / file
        if path.is_file() or path.is_symlink():
            path.unlink()
            deleted.append(f"{name}/{file}")
    with contextlib.suppress(OSError):  # (not empty: the user's own files stay)
        sub.rmdir()
        deleted.append(name)
    return deleted


def holds_only_bookkeeping(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but a lock file and a marker that lists no file present
    (e.g. a run that stopped before writing anything)."""
    marker = read_marker(folder)
    for path in Path(folder).iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.name != MARKER_NAME or marker is None:
            return False
    return marker is None or not any((Path(folder) / f).exists() for f in marker["files"])


def make_folder(folder: Path, what: str) -> Path | None:
    """Create ``folder`` and any missing parents; returns the topmost folder created (``None``
    if it existed), for :func:`remove_made_folder`. ``UsageError`` if it cannot be created."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} {folder} exists and is not a folder")
    top = None
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        top = parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {what} {folder}: {err.strerror or err}") from err
    return top


def remove_made_folder(folder: Path, top: Path | None) -> None:
    """Undo :func:`make_folder` when nothing was written: remove ``folder`` and its parents up
    to ``top`` while they are empty."""
    if top is None:
        return
    for path in [Path(folder), *Path(folder).parents]:
        try:
            path.rmdir()  # only ever an empty folder
        except OSError:
            return
        if path == top:
            return
