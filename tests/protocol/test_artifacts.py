"""Full artifacts and patch-from deltas, as pure functions on bytes."""

from __future__ import annotations

import pytest

from fleet.protocol.artifacts import (
    ArtifactMismatch,
    apply_delta,
    compress_full,
    decompress_full,
    make_delta,
    sha256_digest,
)
from tests.releases import binaryish, patch

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def versions() -> tuple[bytes, bytes]:
    base = binaryish(1, int(1.5 * MIB))
    return bytes(base), bytes(patch(base, 2, edits=4, edit_size=1024))


def test_full_round_trip() -> None:
    payload = bytes(binaryish(3, 200_000))
    assert decompress_full(compress_full(payload), sha256_digest(payload)) == payload


def test_full_flipped_byte_is_refused() -> None:
    payload = bytes(binaryish(3, 200_000))
    artifact = bytearray(compress_full(payload))
    artifact[len(artifact) // 2] ^= 0x01
    with pytest.raises(ArtifactMismatch):
        decompress_full(bytes(artifact), sha256_digest(payload))


def test_full_wrong_digest_names_both() -> None:
    payload = b"hello"
    with pytest.raises(ArtifactMismatch, match=r"decodes to sha256:2cf24dba.*expected sha256:0{64}"):
        decompress_full(compress_full(payload), "0" * 64)


def test_delta_round_trip_is_small(versions: tuple[bytes, bytes]) -> None:
    base, target = versions
    delta = make_delta(base, target)
    assert apply_delta(base, delta, sha256_digest(target)) == target
    full = compress_full(target)
    # A few KiB changed in 1.5 MiB: the delta is a small fraction of the full artifact.
    assert len(delta) < 0.1 * len(full), (len(delta), len(full))


def test_delta_against_another_base_is_refused(versions: tuple[bytes, bytes]) -> None:
    base, target = versions
    delta = make_delta(base, target)
    other_base = bytes(patch(bytearray(base), 9, edits=50, edit_size=4096))
    with pytest.raises(ArtifactMismatch):
        apply_delta(other_base, delta, sha256_digest(target))


def test_garbage_delta_is_refused() -> None:
    with pytest.raises(ArtifactMismatch, match="not a valid zstd frame"):
        apply_delta(b"base", b"not zstd at all", "0" * 64)
