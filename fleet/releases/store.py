"""The release store on disk: building releases into it, reading them back, deltas on demand.

Layout (see the package docstring) is content-addressed where it matters: a delta's file name is
made of the two payload digests, so a cached delta can never silently belong to another payload.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fleet.protocol.artifacts import apply_delta, compress_full, decompress_full, make_delta, sha256_digest
from fleet.protocol.messages import MAX_CHUNK_SIZE, ProbeSpec, digest_hex
from fleet.releases.errors import ArtifactMismatch, ReleaseError, ReleaseNotFound
from fleet.releases.manifest import (
    MAX_CHUNKS,
    NAME_PATTERN,
    RESERVED_VERSIONS,
    ReleaseManifest,
    parse_manifest,
    read_manifest_file,
    verify_manifest_file,
)
from fleet.releases.payload import build_payload, chunk_count, chunk_digests

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
ARTIFACT_FILE = "payload.tar.zst"
DELTAS_DIR = "deltas"
DELTA_WORTH_RATIO = 0.6
"""A delta is kept only below this fraction of the full artifact: the gain must pay for the extra
failure mode (a device whose base is not what the controller believes falls back to the full one)."""


def build_release(
    source: Path,
    *,
    name: str,
    version: str,
    store: Path,
    release_key: Ed25519PrivateKey,
    entry: list[str],
    health: ProbeSpec | None,
    chunk_size: int,
    force: bool = False,
) -> ReleaseManifest:
    """Pack ``source``, sign its manifest and add it to ``store`` as ``name@version``.

    Refuses an existing complete version unless ``force``. The manifest is written last, so a build
    interrupted at any point leaves a version directory that the store does not list.
    """
    _check_name("name", name)
    _check_name("version", version)
    _check_chunk_size(chunk_size)
    version_dir = store / name / version
    payload = build_payload(source)
    _check_chunk_count(len(payload), chunk_size)
    manifest = parse_manifest(
        {
            "name": name,
            "version": version,
            "digest": sha256_digest(payload),
            "size": len(payload),
            "chunk_size": chunk_size,
            "chunk_digests": chunk_digests(payload, chunk_size),
            "entry": entry,
            "health": health.model_dump() if health is not None else None,
            "created_at": int(time.time()),
        },
        source=f"release {name}@{version}",
    ).signed(release_key)
    manifest_path = version_dir / MANIFEST_FILE
    if manifest_path.exists():
        if not force:
            raise ReleaseError(f"{manifest_path}: {name}@{version} already exists (use --force to replace it)")
        # Hide the old version first: its manifest must never sit next to the new artifact.
        _remove_durably(manifest_path)
    _write_atomic(version_dir / ARTIFACT_FILE, compress_full(payload))
    _write_atomic(manifest_path, manifest.to_json())
    logger.info("built %s (%s, %d bytes)", manifest.label, manifest.digest, manifest.size)
    return manifest


class ReleaseStore:
    """Read access to a store directory, plus deltas computed on demand and cached.

    Listing and lookups trust the store's own disk (no signature check); :meth:`verify` re-checks
    signature, artifact digest and chunk digests.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def list(self) -> list[ReleaseManifest]:
        """Every complete release (one with a manifest), sorted by name, then version."""
        manifests = [read_manifest_file(path) for path in sorted(self.root.glob(f"*/*/{MANIFEST_FILE}"))]
        return sorted(manifests, key=lambda manifest: (manifest.name, _version_key(manifest.version)))

    def get(self, name: str, version: str) -> ReleaseManifest:
        """The manifest of ``name@version``; ``ReleaseNotFound`` if the store has no complete one."""
        path = self.manifest_path(name, version)
        if not (_is_valid_name(name) and _is_valid_name(version) and path.is_file()):
            raise ReleaseNotFound(f"{name}@{version}: no such release in {self.root}")
        manifest = read_manifest_file(path)
        if (manifest.name, manifest.version) != (name, version):
            raise ReleaseError(f"{path}: describes {manifest.label}, not {name}@{version}")
        return manifest

    def by_digest(self, digest: str) -> ReleaseManifest | None:
        """The release whose payload has ``digest`` (with or without ``sha256:``), if any."""
        wanted = digest_hex(digest)
        return next((manifest for manifest in self.list() if digest_hex(manifest.digest) == wanted), None)

    def manifest_path(self, name: str, version: str) -> Path:
        return self.root / name / version / MANIFEST_FILE

    def artifact_path(self, manifest: ReleaseManifest) -> Path:
        """The full artifact (zstd of the payload)."""
        return self.root / manifest.name / manifest.version / ARTIFACT_FILE

    def payload(self, manifest: ReleaseManifest) -> bytes:
        """The uncompressed payload, checked against the manifest's digest."""
        path = self.artifact_path(manifest)
        try:
            return decompress_full(_read(path), manifest.digest)
        except ArtifactMismatch as exc:
            raise ArtifactMismatch(f"{path}: {exc.reason}", field=exc.field) from exc

    def delta_path(self, base: ReleaseManifest, target: ReleaseManifest) -> Path:
        return self.root / target.name / DELTAS_DIR / f"{digest_hex(base.digest)}-{digest_hex(target.digest)}.zst"

    def delta(self, base: ReleaseManifest, target: ReleaseManifest) -> Path | None:
        """The cached delta from ``base`` to ``target``, computed now if needed; ``None`` if not worth it.

        "Not worth it" (at least ``DELTA_WORTH_RATIO`` of the full artifact) is cached too, as an empty
        ``.none`` file: the controller asks for the same pair once per device.
        """
        path = self.delta_path(base, target)
        refused = path.with_suffix(".none")
        if path.is_file():
            return path
        if refused.is_file():
            return None
        base_payload, target_payload = self.payload(base), self.payload(target)
        delta = make_delta(base_payload, target_payload)
        full_size = self.artifact_path(target).stat().st_size
        if len(delta) >= DELTA_WORTH_RATIO * full_size:
            logger.info(
                "delta %s -> %s is %d bytes, full artifact %d: not kept",
                base.label,
                target.label,
                len(delta),
                full_size,
            )
            _write_atomic(refused, b"")
            return None
        # Prove it decodes before anyone downloads it: a bad delta would fail on every device.
        apply_delta(base_payload, delta, target.digest)
        _write_atomic(path, delta)
        return path

    def verify(self, name: str, version: str, public_key: Ed25519PublicKey) -> ReleaseManifest:
        """Check the manifest's signature, the artifact's digest and every chunk digest."""
        self.get(name, version)  # "no such release" rather than "no such file", and names checked
        manifest = verify_manifest_file(self.manifest_path(name, version), public_key)
        payload = self.payload(manifest)
        path = self.artifact_path(manifest)
        if len(payload) != manifest.size:
            raise ArtifactMismatch(f"{path}: payload is {len(payload)} bytes, manifest says {manifest.size}")
        for index, (actual, expected) in enumerate(
            zip(chunk_digests(payload, manifest.chunk_size), manifest.chunk_digests, strict=True)
        ):
            if actual != expected:
                raise ArtifactMismatch(f"{path}: chunk {index} does not match its digest", field="chunk_digests")
        return manifest


# --- checks -------------------------------------------------------------------------------------


def _is_valid_name(value: str) -> bool:
    return re.fullmatch(NAME_PATTERN, value) is not None


def _check_name(what: str, value: str) -> None:
    # Checked before anything else: the value becomes a directory name in the store.
    if not _is_valid_name(value):
        raise ReleaseError(f"{what} {value!r}: use letters, digits and . _ + - (not first), at most 128 characters")
    if what == "version" and value in RESERVED_VERSIONS:
        raise ReleaseError(f"version {value!r}: reserved (the store keeps deltas under that name)")


def _check_chunk_size(chunk_size: int) -> None:
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ReleaseError(f"chunk size {chunk_size}: must be between 1 and {MAX_CHUNK_SIZE} bytes")


def _check_chunk_count(size: int, chunk_size: int) -> None:
    count = chunk_count(size, chunk_size)
    if count <= MAX_CHUNKS:
        return
    needed = chunk_count(size, MAX_CHUNKS)
    if needed > MAX_CHUNK_SIZE:
        raise ReleaseError(
            f"payload of {size} bytes needs more than {MAX_CHUNKS} chunks even at the largest chunk size "
            f"({MAX_CHUNK_SIZE} bytes): make the release smaller"
        )
    raise ReleaseError(
        f"payload of {size} bytes would be {count} chunks of {chunk_size} bytes, at most {MAX_CHUNKS} allowed: "
        f"use --chunk-size {_round_up_kib(needed)}KiB or more (max {MAX_CHUNK_SIZE // 1024}KiB)"
    )


def _round_up_kib(size: int) -> int:
    return -(-size // 1024)


def _version_key(version: str) -> list[tuple[int, int | str]]:
    """Natural order: 1.10.0 after 1.9.0 (numbers compare as numbers, before any text)."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version) if part]


# --- crash-safe files ---------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file, complete."""
    _make_dirs_durably(path.parent)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # served to devices; mkstemp's 0600 helps nobody here
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise ReleaseError(f"{path}: cannot write: {exc.strerror}") from exc
    _fsync_dir(path.parent)


def _remove_durably(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot remove: {exc.strerror}") from exc
    _fsync_dir(path.parent)


def _make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` that also syncs each new directory's parent, so the new entries survive a crash."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReleaseError(f"{directory}: cannot create: {exc.strerror}") from exc
    for created in reversed(missing):
        _fsync_dir(created.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise ReleaseError(f"{directory}: cannot open to sync: {exc.strerror}") from exc
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
