from __future__ import annotations

import stat
from pathlib import Path

import pytest

from certs.errors import PkiError
from certs.files import PendingFile, write_files


def test_private_files_are_created_owner_only(tmp_path: Path) -> None:
    write_files([PendingFile(tmp_path / "k", b"secret", private=True), PendingFile(tmp_path / "c", b"public")])
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert (tmp_path / "k").read_bytes() == b"secret"
    assert (tmp_path / "c").read_bytes() == b"public"


def test_replacing_a_file_keeps_the_new_mode_private(tmp_path: Path) -> None:
    target = tmp_path / "k"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_files([PendingFile(target, b"new", private=True)])
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == b"new"


def test_a_failure_leaves_old_files_and_no_temp_files(tmp_path: Path) -> None:
    first = tmp_path / "first"
    first.write_bytes(b"old")
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file where a directory must go")
    with pytest.raises(PkiError, match=r"blocker/second: cannot write"):
        write_files([PendingFile(first, b"new"), PendingFile(blocker / "second", b"x")])
    assert first.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blocker", "first"]
