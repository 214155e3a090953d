"""Pydantic models of every payload in the wire contract (DESIGN.md section 2).

Validation is strict (no ``"12"`` -> ``12`` coercion; an int is accepted where a float is expected)
and unknown fields are ignored so an older reader accepts a newer writer. Times are float unix seconds.
"""

from __future__ import annotations

import base64
import binascii
import struct
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from fleet.protocol.topics import Channel

MAX_CHUNK_SIZE = 128 * 1024
_INT64_MAX = 2**63 - 1  # counters end up in SQLite, whose integers are signed 64-bit

DIGEST_PATTERN = r"^(sha256:)?[0-9a-f]{64}$"

Count = Annotated[int, Field(ge=0, le=_INT64_MAX)]
Seconds = Annotated[float, Field(ge=0)]
Timestamp = Annotated[float, Field(ge=0)]
Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]
"""A sha256 digest: 64 lowercase hex digits, optionally prefixed ``sha256:``."""


def digest_hex(digest: str) -> str:
    """The bare hex of a digest written with or without the ``sha256:`` prefix."""
    return digest.removeprefix("sha256:")


def _float32(value: float) -> float:
    """Round to what a float32 carries, printed back to 7 significant digits.

    Heartbeat measurements travel as float32 to keep heartbeats small; rounding here makes a
    decoded value compare equal to the one that was sent and print without float32 noise.
    """
    (narrow,) = struct.unpack("<f", struct.pack("<f", value))
    return float(f"{narrow:.7g}")


# The upper bound keeps values inside float32 range (packing a larger one would overflow).
Approximate = Annotated[float, Field(ge=0, le=1e30), AfterValidator(_float32)]


class Message(BaseModel):
    """Base of every wire message."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    # Top-level float fields the codec may pack as float32 (approximate measurements only).
    WIRE_FLOAT32: ClassVar[frozenset[str]] = frozenset()


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    VERIFYING = "verifying"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class AckStatus(StrEnum):
    ACCEPTED = "accepted"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"


class ReleaseRef(Message):
    """The release a node should run: what to fetch and how to verify it chunk by chunk."""

    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    digest: Digest
    size: Count
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_SIZE)
    chunk_digests: list[Digest] | None = None
    chunk_digest_ref: str | None = Field(default=None, min_length=1)
    delta_bases: list[Digest] = Field(default_factory=list)
    # The signed release manifest (fleet.releases): the agent verifies it with the release key and
    # takes entry point and health probe from it. Optional only for config-only desired states.
    manifest: dict[str, Any] | None = None
    # An HTTPS source of the full zstd artifact (a CDN, or the release store served as files): the
    # agent fetches it with Range requests when no delta applies, and falls back to MQTT when it
    # fails. Size and digest are of the artifact file (the payload digest above is checked too).
    url: str | None = Field(default=None, min_length=1, max_length=2048)
    artifact_size: int | None = Field(default=None, gt=0)
    artifact_digest: Digest | None = None


class ProbeSpec(Message):
    """A health probe, timed like a Kubernetes liveness probe."""

    kind: Literal["http", "tcp", "exec"]
    target: str = Field(min_length=1)
    initial_delay: Seconds = 0.0
    period: float = Field(default=10.0, gt=0)
    timeout: float = Field(default=1.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1, le=1000)


class DesiredState(Message):
    """The full desired-state document of one node (retained on ``desired``)."""

    generation: Count
    release: ReleaseRef | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    health: ProbeSpec | None = None
    signature: str | None = None
    issued_at: Timestamp | None = None
    # Binding (fleet.protocol.signing): the node and the channel the signed document is for, so a
    # document signed for one node or channel is refused on another. Optional on the wire (an
    # agent with ``insecure_unsigned_control`` reads unsigned documents without them).
    node: str | None = Field(default=None, max_length=64)
    kind: str | None = Field(default=None, max_length=32)


class Reported(Message):
    """What the agent has applied and is running (retained on ``reported``)."""

    generation: Count
    version: str | None = None
    previous_version: str | None = None
    state: UpdateState = Field(strict=False)  # non-strict so the wire string becomes the enum
    config_digest: str | None = None
    progress: float | None = Field(default=None, ge=0, le=1)
    """Fraction of the current step done, 0..1."""
    detail: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ts: Timestamp


class Status(Message):
    """Online/offline (the offline one is also the last will)."""

    state: Literal["online", "offline"]
    ts: Timestamp | None = None
    agent_version: str | None = None


class Heartbeat(Message):
    """Liveness and resources; uptime, cpu and latency travel as float32 (about 7 digits)."""

    WIRE_FLOAT32: ClassVar[frozenset[str]] = frozenset({"uptime", "cpu", "latency_ms"})

    seq: Count
    uptime: Approximate
    cpu: Approximate
    """Percent."""
    mem_free: Count
    disk_free: Count
    latency_ms: Approximate | None = None
    version: str | None = None


class ProbeResult(Message):
    name: str
    ok: bool
    detail: str | None = None
    latency_ms: float | None = Field(default=None, ge=0)


class Health(Message):
    version: str | None = None
    healthy: bool
    probes: list[ProbeResult] = Field(default_factory=list)
    consecutive_failures: Count = 0
    ts: Timestamp


class Command(Message):
    """An operator or controller request; ``id`` makes it exactly-once in effect."""

    id: str = Field(pattern=r"^\S{1,128}$")
    action: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,63}$")
    args: dict[str, Any] = Field(default_factory=dict)
    expires_at: Timestamp | None = None
    signature: str | None = None
    issued_at: Timestamp | None = None
    node: str | None = Field(default=None, max_length=64)  # binding, as in DesiredState
    kind: str | None = Field(default=None, max_length=32)


class Ack(Message):
    id: str = Field(pattern=r"^\S{1,128}$")
    status: AckStatus = Field(strict=False)  # non-strict so the wire string becomes the enum
    detail: str | None = None
    ts: Timestamp


class Event(Message):
    kind: str = Field(min_length=1, max_length=64)
    detail: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    ts: Timestamp


class ArtifactRequest(Message):
    """Ask for ``window`` chunks of an artifact starting at chunk ``first``."""

    digest: Digest
    first: Count
    window: int = Field(ge=1, le=256)
    delta_base: Digest | None = None


class ArtifactChunk(Message):
    """One chunk of an artifact. In JSON, ``data`` is a base64 string (standard or URL-safe alphabet)."""

    model_config = ConfigDict(ser_json_bytes="base64")

    digest: Digest  # the payload this artifact decodes to
    index: Count
    data: bytes = Field(max_length=MAX_CHUNK_SIZE)
    total: Count | None = None  # number of chunks of the artifact
    eof: bool = False
    base: Digest | None = None  # the artifact is a delta from this payload; None: full artifact
    size: Count | None = None  # artifact size in bytes
    artifact: Digest | None = None  # sha256 of the whole artifact
    sha256: Digest | None = None  # sha256 of this chunk's data
    error: str | None = Field(default=None, max_length=512)  # the server cannot serve the request

    @field_validator("data", mode="before")
    @classmethod
    def _base64_from_json(cls, value: object) -> object:
        # JSON has no bytes; a string here is the documented base64 form of the chunk. Pydantic's own
        # JSON output uses the URL-safe alphabet, people usually the standard one: take both.
        if isinstance(value, str):
            try:
                return base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("data must be bytes, or a base64 string in JSON") from exc
        return value


CHANNEL_MODEL: dict[Channel, type[Message]] = {
    Channel.DESIRED: DesiredState,
    Channel.REPORTED: Reported,
    Channel.STATUS: Status,
    Channel.HEARTBEAT: Heartbeat,
    Channel.HEALTH: Health,
    Channel.CMD: Command,
    Channel.ACK: Ack,
    Channel.EVENTS: Event,
    Channel.ARTIFACT_REQ: ArtifactRequest,
    Channel.ARTIFACT_CHUNK: ArtifactChunk,
}
