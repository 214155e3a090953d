"""The payload: a deterministic, uncompressed tar of a source directory, and its chunk digests.

Determinism is what makes digests comparable and deltas small: the same tree gives the same bytes
whatever the build machine's clock, umask, user or directory order. So entries are sorted, mtime,
uid and gid are 0, user and group names empty, and modes are normalised to 0755 (directories and
files with any execute bit) or 0644 (other files). Only regular files, directories and symlinks that
stay inside the tree are allowed: anything else would unpack differently (or dangerously) on a device.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from fleet.releases.errors import ReleaseError

_EXEC_MODE = 0o755
_PLAIN_MODE = 0o644
_LINK_MODE = 0o777


def build_payload(source: Path) -> bytes:
    """The deterministic tar of everything under ``source`` (not including ``source`` itself)."""
    if not source.is_dir():
        raise ReleaseError(f"{source}: not a directory")
    buffer = io.BytesIO()
    # PAX: unlimited name lengths and UTF-8 names; with integer mtime 0 it adds no extended headers
    # for ordinary entries, so the output stays byte-stable.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as archive:
        for relative, path in _walk_sorted(source):
            _add_entry(archive, source, relative, path)
    return buffer.getvalue()


def chunk_digests(payload: bytes, chunk_size: int) -> list[str]:
    """The bare sha256 hex of each ``chunk_size`` slice of ``payload`` (the last one may be short).

    Bare hex rather than ``sha256:<hex>``: the list travels in every desired-state document, where
    up to 1024 prefixes would only cost bytes on a slow link.
    """
    return [
        hashlib.sha256(payload[start : start + chunk_size]).hexdigest() for start in range(0, len(payload), chunk_size)
    ]


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def _walk_sorted(root: Path) -> Iterator[tuple[str, Path]]:
    """Every entry below ``root`` as (posix relative name, path), depth first, names sorted."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise ReleaseError(f"{root}: cannot list: {exc.strerror}") from exc
    stack = [(name, root / name) for name in reversed(names)]
    while stack:
        relative, path = stack.pop()
        yield relative, path
        if path.is_dir() and not path.is_symlink():
            try:
                children = sorted(os.listdir(path))
            except OSError as exc:
                raise ReleaseError(f"{path}: cannot list: {exc.strerror}") from exc
            stack.extend((f"{relative}/{name}", path / name) for name in reversed(children))


def _add_entry(archive: tarfile.TarFile, root: Path, relative: str, path: Path) -> None:
    try:
        info = path.lstat()
    except OSError as exc:
        raise ReleaseError(f"{path}: {exc.strerror}") from exc
    entry = tarfile.TarInfo(relative)
    entry.mtime = 0
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    try:
        if stat.S_ISDIR(info.st_mode):
            entry.type, entry.mode = tarfile.DIRTYPE, _EXEC_MODE
            archive.addfile(entry)
        elif stat.S_ISREG(info.st_mode):
            # Hard links become plain copies: a link type would depend on what else is in the tree.
            data = _read(path)
            entry.type, entry.size = tarfile.REGTYPE, len(data)
            entry.mode = _EXEC_MODE if info.st_mode & 0o111 else _PLAIN_MODE
            archive.addfile(entry, io.BytesIO(data))
        elif stat.S_ISLNK(info.st_mode):
            entry.type, entry.mode = tarfile.SYMTYPE, _LINK_MODE
            entry.linkname = _checked_link_target(root, relative, path)
            archive.addfile(entry)
        else:
            raise ReleaseError(
                f"{path}: is a {_kind(info.st_mode)}; a release holds only regular files, directories and symlinks"
            )
    except (UnicodeEncodeError, ValueError) as exc:
        raise ReleaseError(f"{path}: cannot be stored in the payload: {exc}") from exc


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc


def _checked_link_target(root: Path, relative: str, path: Path) -> str:
    """The symlink's target, refused unless it stays inside the tree both as written and as resolved."""
    target = os.readlink(path)
    if posixpath.isabs(target):
        raise ReleaseError(f"{path}: symlink to absolute path {target!r} escapes the release tree")
    # As written: the release is unpacked under another directory name on the device, so "../src/x"
    # from a tree called "src" would point elsewhere there even though it resolves inside here.
    lexical = posixpath.normpath(posixpath.join(posixpath.dirname(relative), target))
    # As resolved: a chain of links that are each fine on their own can still climb out.
    resolved = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    if lexical == ".." or lexical.startswith("../") or not resolved.is_relative_to(real_root):
        raise ReleaseError(f"{path}: symlink to {target!r} escapes the release tree")
    return target


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
