"""Crash-safe writing of a set of files: each one atomic, all of them prepared before any is replaced."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from certs.errors import PkiError

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class PendingFile:
    path: Path
    data: bytes
    private: bool = False


def write_files(files: Sequence[PendingFile]) -> None:
    """Write every file via a temp file in its own directory, then rename them all into place.

    All the slow and failure-prone work (creating directories, writing, fsync) happens before the
    first rename, so an error leaves the old files untouched and no new file half-written.
    """
    staged: list[tuple[Path, PendingFile]] = []
    try:
        for pending in files:
            staged.append((_stage(pending), pending))
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    for temp, pending in staged:
        _replace(temp, pending.path)
    # The parents too: a directory created for a new identity must itself survive a power failure.
    directories = {pending.path.parent for pending in files}
    for directory in directories | {directory.parent for directory in directories}:
        _fsync_directory(directory)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so the renames in it survive a power failure (``PkiError`` naming it if not)."""
    _fsync_directory(directory)


def _stage(pending: PendingFile) -> Path:
    directory = pending.path.parent
    temp = directory / f".{pending.path.name}.{secrets.token_hex(6)}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Created with its final mode: a private key must never exist, not even briefly, world-readable.
        mode = _PRIVATE_MODE if pending.private else _PUBLIC_MODE
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            _write_all(fd, pending.data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise PkiError(f"{pending.path}: cannot write: {exc.strerror or exc}") from exc
    return temp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _replace(temp: Path, target: Path) -> None:
    try:
        os.replace(temp, target)
    except OSError as exc:
        raise PkiError(f"{target}: cannot write: {exc.strerror or exc}") from exc


def _fsync_directory(directory: Path) -> None:
    # Without this the renames themselves may be lost on power failure.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise PkiError(f"{directory}: cannot sync: {exc.strerror or exc}") from exc
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
