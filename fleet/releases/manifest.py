"""The release manifest: what a payload is, how to check it chunk by chunk, how to run it; signed.

The signature (Ed25519 by the PKI's release key) covers the canonical JSON of the raw document, so
it is checked on the raw map *before* the model sees it (see ``fleet.protocol.signing``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.protocol.errors import InvalidSignature
from fleet.protocol.ids import RELEASE_NAME_PATTERN
from fleet.protocol.messages import MAX_CHUNK_SIZE, ProbeSpec, ReleaseRef
from fleet.protocol.signing import sign_manifest, verify_manifest
from fleet.releases.errors import ReleaseError
from fleet.releases.payload import chunk_count

MANIFEST_FORMAT: Literal[1] = 1
MAX_CHUNKS = 1024
"""More chunk digests than this would make every desired-state document too big for a slow link."""

# Names and versions become directory names in the store and on devices: no separators, no dot
# first (no "..", no hidden files), and a length ReleaseRef accepts.
NAME_PATTERN = rf"^{RELEASE_NAME_PATTERN}$"
RESERVED_VERSIONS = frozenset({"deltas"})  # STORE/<name>/deltas holds the deltas

ReleaseName = Annotated[str, Field(pattern=NAME_PATTERN)]
ChunkDigest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class ReleaseProbe(ProbeSpec):
    """A release's health probe (``manifest.health``). ``env`` declares the workload environment
    variables ``${VAR}`` in ``target`` may take on a device (``env: [APP_PORT]``: one release,
    each device its own port); the agent expands those and nothing else, and only in a release's
    probe. Absent (None) it is left out of the signed document, so manifests without it keep
    their signatures; an older agent ignores it."""

    env: list[EnvName] | None = Field(default=None, max_length=64)

    def plain(self) -> ProbeSpec:
        """The probe without ``env`` (what a desired state or the local config would carry)."""
        return ProbeSpec.model_validate(self.model_dump(exclude={"env"}))

    def __eq__(self, other: object) -> bool:
        # A release probe that declares no variables is that very probe.
        if type(other) is ProbeSpec:
            return self.env is None and self.plain() == other
        return super().__eq__(other)

    def __hash__(self) -> int:
        return hash(self.plain()) if self.env is None else super().__hash__()


class ReleaseManifest(BaseModel):
    """The contents of ``manifest.json``; ``signature`` is ``None`` only before signing."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False)

    format: Literal[1] = MANIFEST_FORMAT
    name: ReleaseName
    version: ReleaseName
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    """sha256 of the uncompressed payload (the deterministic tar)."""
    size: int = Field(ge=1)
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_SIZE)
    chunk_digests: list[ChunkDigest] = Field(max_length=MAX_CHUNKS)
    entry: list[str] = Field(min_length=1)
    """The workload's command, relative to the unpacked release directory."""
    health: ReleaseProbe | None = None
    """Build with a ``ReleaseProbe`` to declare the variables its target may use (``env``)."""
    created_at: int = Field(ge=0)
    """Unix seconds; an integer so every JSON writer signs the same bytes."""
    signature: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ReleaseManifest:
        if self.version in RESERVED_VERSIONS:
            raise ValueError(f"version {self.version!r} is reserved")
        expected = chunk_count(self.size, self.chunk_size)
        if len(self.chunk_digests) != expected:
            raise ValueError(f"{len(self.chunk_digests)} chunk digests for {expected} chunks")
        return self

    @property
    def label(self) -> str:
        """``name@version``, the spelling the CLI takes."""
        return f"{self.name}@{self.version}"

    def ref(
        self, delta_bases: Sequence[str] = (), base_url: str | None = None, *, artifact_file: Path | None = None
    ) -> ReleaseRef:
        """What a desired-state document carries to fetch and verify this release (the signed
        manifest travels along: the agent checks it with the release key).

        With ``base_url`` (where the store directory is served over HTTPS) the ref also names the
        full artifact's URL, size and digest, so agents can fetch it with Range requests. The
        manifest does not know where it is stored, so the caller passes ``artifact_file``
        (``ReleaseStore.artifact_path(manifest)``); it is hashed here in blocks, once per call (a
        few ms per MiB): build the ref once per rollout and reuse it (it is immutable).
        """
        source: dict[str, Any] = {}
        if base_url is not None:
            if artifact_file is None:
                raise ValueError("ref(base_url=...) needs artifact_file to describe the artifact")
            from fleet.protocol.artifacts import sha256_stream

            with artifact_file.open("rb") as artifact:
                source = {
                    "url": base_url.rstrip("/") + f"/{self.name}/{self.version}/payload.tar.zst",
                    "artifact_size": artifact_file.stat().st_size,
                    "artifact_digest": sha256_stream(artifact),
                }
        return ReleaseRef(
            name=self.name,
            version=self.version,
            digest=self.digest,
            size=self.size,
            chunk_size=self.chunk_size,
            chunk_digests=list(self.chunk_digests),
            delta_bases=list(delta_bases),
            manifest=self.document(),
            **source,
        )

    def document(self) -> dict[str, Any]:
        """The JSON map written to disk (and signed); absent optional fields are left out."""
        doc: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        return doc

    def signed(self, private_key: Ed25519PrivateKey) -> ReleaseManifest:
        """A copy carrying the release key's signature over every other field."""
        unsigned = self.model_copy(update={"signature": None}).document()
        return self.model_copy(update={"signature": sign_manifest(unsigned, private_key)["signature"]})

    def to_json(self) -> bytes:
        return (json.dumps(self.document(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def parse_manifest(raw: object, *, source: Path | str) -> ReleaseManifest:
    """Validate a decoded manifest map; the error names ``source`` and the first bad field."""
    try:
        return ReleaseManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise ReleaseError(f"{source}: {where}: {first['msg']}") from exc


def read_manifest_document(path: Path) -> dict[str, Any]:
    """The raw JSON map of a manifest file (for signature checks before validation)."""
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise ReleaseError(f"{path}: no such manifest") from exc
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ReleaseError(f"{path}: a manifest must be a JSON object")
    return raw


def read_manifest_file(path: Path) -> ReleaseManifest:
    """A manifest as stored, without checking its signature (the store trusts its own disk)."""
    return parse_manifest(read_manifest_document(path), source=path)


def verify_manifest_file(path: Path, public_key: Ed25519PublicKey) -> ReleaseManifest:
    """The manifest at ``path``; ``InvalidSignature`` (naming the file) if unsigned or forged."""
    raw = read_manifest_document(path)
    try:
        verify_manifest(raw, public_key)
    except InvalidSignature as exc:
        raise InvalidSignature(f"{path}: {exc.reason}", field=exc.field) from exc
    return parse_manifest(raw, source=path)
