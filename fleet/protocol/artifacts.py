"""Pure zstd encode/decode of release payloads: full artifacts and "patch-from" deltas.

Part of the wire contract (the agent decodes what the controller's release server sends), so it
lives in ``fleet.protocol``: no file access, bytes in and bytes out; :func:`decompress_full` and
:func:`apply_delta` check the result's sha256. zstandard is imported here only: the agent imports
this module lazily, when an update starts.

The ``*_stream`` variants do the same from one open binary file to another in fixed-size blocks,
hashing as they go, so a device never holds the artifact or the payload in memory (only a delta's
base payload, which zstd needs whole as its dictionary). They also bound the output to the size the
signed manifest promises: a forged frame cannot fill the disk.

A delta is the target payload compressed with the base payload as a raw-content dictionary and
long-distance matching (what ``zstd --patch-from`` does), with a window that spans both payloads so
matches anywhere in the base stay reachable. Both sides always work on *uncompressed* payloads:
diffing compressed archives finds almost nothing in common (93-98% of the full size, measured).
"""

from __future__ import annotations

import hashlib
import math
from typing import BinaryIO

import zstandard

from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import digest_hex


class ArtifactMismatch(InvalidMessage):
    """An artifact or delta does not decode to the payload its manifest promises.

    An ``InvalidMessage``: on the agent side it is the same kind of refusal as a forged document
    (nothing is installed, the reason goes to ``events``); retrying the same bytes cannot help.
    """


FULL_LEVEL = 19
DELTA_LEVEL = 19
BLOCK = 256 * 1024
"""Streaming block size: large enough to be fast, small next to any artifact worth streaming."""


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>``: the digest spelling of manifests."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress_full(payload: bytes) -> bytes:
    """The full artifact: zstd level 19 with the content size in the frame header."""
    return zstandard.ZstdCompressor(level=FULL_LEVEL, write_content_size=True).compress(payload)


def decompress_full(artifact: bytes, expected_digest: str) -> bytes:
    """The payload inside a full artifact; ``ArtifactMismatch`` unless it hashes to ``expected_digest``."""
    try:
        payload = zstandard.ZstdDecompressor().decompress(artifact)
    except zstandard.ZstdError as exc:
        raise ArtifactMismatch(f"full artifact is not a valid zstd frame: {exc}", field="artifact") from exc
    _check_digest(payload, expected_digest, what="full artifact")
    return payload


def make_delta(base_payload: bytes, target_payload: bytes) -> bytes:
    """``target_payload`` compressed against ``base_payload`` (zstd patch-from)."""
    window_log = _window_log(len(base_payload) + len(target_payload))
    params = zstandard.ZstdCompressionParameters.from_level(
        DELTA_LEVEL,
        source_size=len(target_payload),
        dict_size=len(base_payload),
        enable_ldm=True,
        window_log=window_log,
        write_content_size=True,
    )
    compressor = zstandard.ZstdCompressor(dict_data=_raw_dictionary(base_payload), compression_params=params)
    return compressor.compress(target_payload)


def apply_delta(base_payload: bytes, delta: bytes, expected_digest: str) -> bytes:
    """The target payload from ``base_payload`` and a delta; ``ArtifactMismatch`` on any mismatch."""
    try:
        content_size = zstandard.get_frame_parameters(delta).content_size
    except zstandard.ZstdError as exc:
        raise ArtifactMismatch(f"delta is not a valid zstd frame: {exc}", field="delta") from exc
    if content_size <= 0:
        # make_delta always records it; without it the window cannot be bounded (nor the output).
        raise ArtifactMismatch("delta frame does not record its content size", field="delta")
    # Allow exactly the window make_delta may have used, not zstd's default limit (which is smaller
    # than a large base + target) and not an unbounded one.
    max_window = 1 << _window_log(len(base_payload) + content_size)
    decompressor = zstandard.ZstdDecompressor(dict_data=_raw_dictionary(base_payload), max_window_size=max_window)
    try:
        payload = decompressor.decompress(delta)
    except zstandard.ZstdError as exc:
        # A delta made against another base usually fails here (dictionary id or checksum) or decodes
        # to garbage that the digest check below refuses.
        raise ArtifactMismatch(f"delta does not apply to this base: {exc}", field="delta") from exc
    _check_digest(payload, expected_digest, what="delta applied to its base")
    return payload


def sha256_stream(source: BinaryIO, limit: int | None = None) -> str:
    """``sha256:<hex>`` of ``source`` from its position to EOF, or of its next ``limit`` bytes."""
    digest = hashlib.sha256()
    remaining = limit
    while remaining is None or remaining > 0:
        block = source.read(BLOCK if remaining is None else min(BLOCK, remaining))
        if not block:
            break
        digest.update(block)
        if remaining is not None:
            remaining -= len(block)
    return "sha256:" + digest.hexdigest()


def decompress_full_stream(artifact: BinaryIO, out: BinaryIO, expected_digest: str, expected_size: int) -> None:
    """:func:`decompress_full` from file to file; ``ArtifactMismatch`` unless the output is exactly
    ``expected_size`` bytes hashing to ``expected_digest``."""
    _stream(zstandard.ZstdDecompressor(), artifact, out, expected_digest, expected_size, what="full artifact")


def apply_delta_stream(
    base_payload: bytes, delta: BinaryIO, out: BinaryIO, expected_digest: str, expected_size: int
) -> None:
    """:func:`apply_delta` from file to file (the base stays in memory: it is zstd's dictionary)."""
    # The window make_delta used is bounded by base + target; the target size is the signed one.
    max_window = 1 << _window_log(len(base_payload) + expected_size)
    decompressor = zstandard.ZstdDecompressor(dict_data=_raw_dictionary(base_payload), max_window_size=max_window)
    _stream(decompressor, delta, out, expected_digest, expected_size, what="delta applied to its base")


def _stream(
    decompressor: zstandard.ZstdDecompressor,
    source: BinaryIO,
    out: BinaryIO,
    expected_digest: str,
    expected_size: int,
    *,
    what: str,
) -> None:
    digest = hashlib.sha256()
    written = 0
    try:
        with decompressor.stream_reader(source, read_size=BLOCK, closefd=False) as reader:
            while block := reader.read(BLOCK):
                written += len(block)
                if written > expected_size:
                    raise ArtifactMismatch(f"{what} decodes to more than {expected_size} bytes", field="size")
                digest.update(block)
                out.write(block)
    except zstandard.ZstdError as exc:
        # A delta made against another base usually fails here (dictionary id or checksum).
        raise ArtifactMismatch(f"{what} is not a valid zstd frame for this payload: {exc}", field="artifact") from exc
    if digest.hexdigest() != digest_hex(expected_digest):
        raise ArtifactMismatch(
            f"{what} decodes to sha256:{digest.hexdigest()}, expected sha256:{digest_hex(expected_digest)}",
            field="digest",
        )


def _raw_dictionary(base_payload: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base_payload, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _window_log(total_size: int) -> int:
    """The smallest window (as a log2) covering ``total_size`` bytes, within zstd's limits."""
    wanted = math.ceil(math.log2(max(total_size, 1)))
    return min(max(wanted, zstandard.WINDOWLOG_MIN), zstandard.WINDOWLOG_MAX)


def _check_digest(payload: bytes, expected_digest: str, *, what: str) -> None:
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest_hex(expected_digest):
        raise ArtifactMismatch(
            f"{what} decodes to sha256:{actual}, expected sha256:{digest_hex(expected_digest)}", field="digest"
        )
