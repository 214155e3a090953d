"""Releases: deterministic payloads, signed manifests, full zstd artifacts and patch-from deltas.

Store layout (``fleet release build --store STORE``)::

    STORE/<name>/<version>/manifest.json       signed manifest, written last: it marks the version complete
    STORE/<name>/<version>/payload.tar.zst     full artifact: zstd -19 of the payload
    STORE/<name>/deltas/<base>-<target>.zst    zstd patch-from delta between two payloads (hex digests)
    STORE/<name>/deltas/<base>-<target>.none   "a delta is not worth it for this pair" (cached answer)

The payload is the uncompressed deterministic tar of the source directory (see ``payload``); every
digest (manifest ``digest``, ``chunk_digests``, delta file names) is of that uncompressed payload, so
a full artifact and a delta both end in bytes checked against the same signed manifest.

Every file is written to a temp file in the same directory, fsynced, renamed into place and the
directory fsynced; a version directory without ``manifest.json`` is an interrupted build and is
ignored. Payloads are handled in memory: releases are expected to be tens of MiB at most (the chunk
limit caps them at 1024 x 128 KiB anyway).
"""

from fleet.protocol.artifacts import apply_delta, compress_full, decompress_full, make_delta, sha256_digest
from fleet.releases.errors import ArtifactMismatch, ReleaseError, ReleaseNotFound
from fleet.releases.manifest import MAX_CHUNKS, ReleaseManifest, ReleaseProbe, verify_manifest_file
from fleet.releases.payload import build_payload, chunk_digests
from fleet.releases.store import DELTA_WORTH_RATIO, DeltaStats, ReleaseStore, build_release

__all__ = [
    "DELTA_WORTH_RATIO",
    "MAX_CHUNKS",
    "ArtifactMismatch",
    "DeltaStats",
    "ReleaseError",
    "ReleaseManifest",
    "ReleaseNotFound",
    "ReleaseProbe",
    "ReleaseStore",
    "apply_delta",
    "build_payload",
    "build_release",
    "chunk_digests",
    "compress_full",
    "decompress_full",
    "make_delta",
    "sha256_digest",
    "verify_manifest_file",
]
