"""What is trusted before anything is installed: the signed manifest, then the assembled artifact.

The artifact is hashed and decoded from file to file in blocks, so memory stays flat; only a
delta's base payload is held whole, as zstd's dictionary.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.store import Download, Store
from agent.update.download import part_path, payload_path
from agent.update.releases import Releases, UpdateFailed
from fleet.protocol.errors import FleetError, InvalidMessage
from fleet.protocol.messages import ReleaseRef, digest_hex


def verified_manifest(
    target: ReleaseRef, key_path: Path | None, event: Callable[[str, str | None, dict[str, Any]], None]
) -> dict[str, Any]:
    """The desired release's manifest once its signature checks out with the release key and it
    agrees with the desired release; UpdateFailed otherwise."""
    from fleet.protocol.signing import load_public_key, verify_manifest

    if target.manifest is None:
        raise UpdateFailed("the desired release has no signed manifest")
    if key_path is None:
        raise UpdateFailed("no release_public_key configured: the agent installs only signed releases")
    try:
        verify_manifest(target.manifest, load_public_key(key_path.read_bytes()))
    except (InvalidMessage, OSError, FleetError) as exc:
        event("release_refused", str(exc), {"version": target.version})
        raise UpdateFailed(f"release {target.name}@{target.version} refused: {exc}") from exc
    manifest = target.manifest
    for field in ("name", "version", "digest", "size", "chunk_size"):
        if manifest.get(field) != getattr(target, field):
            raise UpdateFailed(f"desired release and its signed manifest disagree on {field}")
    return manifest


def decode_artifact(target: ReleaseRef, store: Store, releases: Releases) -> Path:
    """Check the assembled artifact and decode it to the payload file, in blocks (flat memory);
    InvalidMessage when it is not what the signed release promises."""
    from fleet.protocol.artifacts import apply_delta_stream, decompress_full_stream, sha256_stream

    download = store.download(target.digest)
    assert download is not None
    part, payload = part_path(releases.root, target.digest), payload_path(releases.root, target.digest)
    with part.open("rb") as artifact:
        # Chunks only ever land inside the artifact, so a longer file is not this artifact.
        if os.fstat(artifact.fileno()).st_size != download.size:
            raise InvalidMessage("the assembled artifact is not of its recorded size", field="artifact")
        if digest_hex(sha256_stream(artifact)) != digest_hex(download.artifact):
            raise InvalidMessage("the assembled artifact does not match its digest", field="artifact")
        artifact.seek(0)
        base = delta_base_payload(download, releases)
        # 0o600 like every release payload.tar (it is renamed into the release, never copied).
        with open(os.open(payload, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            try:
                if base is None:
                    decompress_full_stream(artifact, out, target.digest, target.size)
                else:
                    apply_delta_stream(base, artifact, out, target.digest, target.size)
            except InvalidMessage:
                payload.unlink(missing_ok=True)
                raise
            out.flush()
            os.fsync(out.fileno())  # it becomes the release's payload.tar by a rename
    return payload


def delta_base_payload(download: Download, releases: Releases) -> bytes | None:
    """The base payload a delta applies to (whole in memory: zstd needs its dictionary), or None."""
    if download.base is None:
        return None
    current = releases.current()
    if current is None or current.digest != download.base:
        raise InvalidMessage("the delta's base release is no longer installed", field="base")
    return (current.directory / ".fleet" / "payload.tar").read_bytes()
