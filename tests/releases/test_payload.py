"""The deterministic payload tar and its chunk digests."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from fleet.releases import ReleaseError, build_payload, chunk_digests
from tests.releases import make_tree


def test_same_tree_same_bytes_whatever_mtime_umask_or_location(tmp_path: Path) -> None:
    first = build_payload(make_tree(tmp_path / "a"))
    other = make_tree(tmp_path / "elsewhere" / "b")
    os.utime(other / "bin" / "app", (1_000_000, 1_000_000))
    (other / "etc" / "app.conf").chmod(0o600)  # a stricter umask on another build machine
    assert build_payload(other) == first


def test_content_change_changes_bytes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "a")
    before = build_payload(tree)
    (tree / "etc" / "app.conf").write_text("port = 8081\n")
    assert build_payload(tree) != before


def test_entries_are_sorted_and_normalised(tmp_path: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(build_payload(make_tree(tmp_path / "a")))) as archive:
        members = archive.getmembers()
    assert [member.name for member in members] == [
        "bin",
        "bin/app",
        "empty",
        "etc",
        "etc/app.conf",
        "etc/current.conf",
        "run",
    ]
    assert {(member.mtime, member.uid, member.gid, member.uname, member.gname) for member in members} == {
        (0, 0, 0, "", "")
    }
    modes = {member.name: member.mode for member in members}
    assert modes["bin/app"] == 0o755
    assert modes["etc/app.conf"] == 0o644
    link = next(member for member in members if member.name == "etc/current.conf")
    assert link.issym() and link.linkname == "app.conf"


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("abs", "/etc/passwd"),
        ("up", "../outside"),
        ("etc/deep", "../../outside"),
    ],
)
def test_symlink_escaping_the_tree_is_refused(tmp_path: Path, link: str, target: str) -> None:
    tree = make_tree(tmp_path / "a")
    (tree / link).symlink_to(target)
    with pytest.raises(ReleaseError, match=f"{link}: symlink to .* escapes the release tree"):
        build_payload(tree)


def test_chain_of_symlinks_escaping_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "a")
    # "etc/top" resolves to the tree root (fine on its own), so "etc/esc" -> "top/.." climbs out,
    # although it looks like "etc" when read without following links.
    (tree / "etc" / "top").symlink_to("..")
    (tree / "etc" / "esc").symlink_to("top/..")
    with pytest.raises(ReleaseError, match=r"esc: symlink to 'top/\.\.' escapes"):
        build_payload(tree)


def test_named_pipe_is_refused(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "a")
    os.mkfifo(tree / "pipe")
    with pytest.raises(ReleaseError, match="pipe: is a named pipe"):
        build_payload(tree)


def test_source_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ReleaseError, match="not a directory"):
        build_payload(tmp_path / "missing")


def test_hard_links_become_plain_files(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "a")
    twin = make_tree(tmp_path / "b")
    os.link(tree / "etc" / "app.conf", tree / "etc" / "copy.conf")
    shutil.copy(twin / "etc" / "app.conf", twin / "etc" / "copy.conf")
    assert build_payload(tree) == build_payload(twin)


def test_chunk_digests_cover_the_payload() -> None:
    payload = bytes(range(256)) * 41  # 10496 bytes: the last chunk is short
    digests = chunk_digests(payload, 1000)
    assert len(digests) == 11
    assert digests[0] == hashlib.sha256(payload[:1000]).hexdigest()
    assert digests[-1] == hashlib.sha256(payload[10000:]).hexdigest()
