"""Answers agents' artifact requests (``artifact/req``) with chunks (``artifact/chunk``) from the store.

Two layers: :class:`ReleaseServer` is the pure logic (request in, chunks out, no MQTT), and
:class:`ReleaseService` wires it to a :class:`~fleet.controller.mqtt.FleetMqtt` connection with a bounded worker
pool and an optional per-node rate limit.

Flow control is the agent's: it asks for a window of chunks and asks for the next window once it
has verified them, so a slow link is never flooded by more than one window. The server is
stateless per device; a request that gets lost (dropped here, lost by the broker) is simply asked
again by the agent after its timeout.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

from fleet.controller.mqtt import FleetMqtt
from fleet.protocol.codec import decode_for_channel, encode
from fleet.protocol.errors import FleetError, InvalidMessage, TransportError
from fleet.protocol.messages import ArtifactChunk, ArtifactRequest, digest_hex
from fleet.protocol.topics import Channel, all_nodes_filter, node_topic
from fleet.releases import ReleaseError, ReleaseManifest, ReleaseStore

log = logging.getLogger(__name__)

MAX_ERROR = 512  # ArtifactChunk.error's limit


def _full_digest(digest: str) -> str:
    return "sha256:" + digest_hex(digest)


@dataclass(frozen=True)
class Artifact:
    """The bytes served for one (target, base) pair, sliced and hashed once."""

    data: bytes
    digest: str  # sha256 of the whole artifact
    chunk_size: int
    base: str | None  # delta base payload digest; None for the full artifact
    chunk_sha256: tuple[str, ...]

    @classmethod
    def of(cls, data: bytes, chunk_size: int, base: str | None) -> Artifact:
        digests = tuple(
            "sha256:" + hashlib.sha256(data[start : start + chunk_size]).hexdigest()
            for start in range(0, len(data), chunk_size)
        )
        return cls(data, "sha256:" + hashlib.sha256(data).hexdigest(), chunk_size, base, digests)

    @property
    def total(self) -> int:
        return len(self.chunk_sha256)

    def chunk(self, index: int, target: str) -> ArtifactChunk:
        start = index * self.chunk_size
        return ArtifactChunk(
            digest=target,
            index=index,
            data=self.data[start : start + self.chunk_size],
            total=self.total,
            eof=index == self.total - 1,
            base=self.base,
            size=len(self.data),
            artifact=self.digest,
            sha256=self.chunk_sha256[index],
        )


def error_chunk(request: ArtifactRequest, reason: str, artifact: Artifact | None = None) -> ArtifactChunk:
    """The one reply to a request that cannot be served; it carries what the server does know."""
    return ArtifactChunk(
        digest=request.digest,
        index=request.first,
        data=b"",
        total=artifact.total if artifact else None,
        base=artifact.base if artifact else None,
        size=len(artifact.data) if artifact else None,
        artifact=artifact.digest if artifact else None,
        error=reason[:MAX_ERROR],
    )


class ReleaseServer:
    """Request -> chunks, from a release store, with a small LRU of artifacts in memory.

    The cache matters because a fleet downloads the same release in hundreds of small windows:
    without it every window would re-read the artifact and re-hash every chunk. Entries are
    content-addressed (payload digests), so they never go stale.
    """

    def __init__(self, store: ReleaseStore, *, cache_size: int = 4) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.store = store
        self.cache_size = cache_size
        self.cache_hits = 0
        self.cache_misses = 0
        self._cache: OrderedDict[tuple[str, str | None], Artifact] = OrderedDict()
        self._cache_lock = threading.Lock()
        # One loader at a time: when a new release goes out, every worker asks for it at once, and
        # reading it (or computing its delta) once is better than eight times in parallel.
        self._load_lock = threading.Lock()

    def chunks_for(self, request: ArtifactRequest) -> list[ArtifactChunk]:
        """Chunks ``[first, first + window)`` clipped to the artifact, or a single error chunk."""
        artifact = self.artifact_for(request.digest, request.delta_base)
        if artifact is None:
            return [error_chunk(request, f"unknown release {request.digest}")]
        if request.first >= artifact.total:
            reason = f"chunk {request.first} is past the end of the artifact ({artifact.total} chunks)"
            return [error_chunk(request, reason, artifact)]
        end = min(request.first + request.window, artifact.total)
        return [artifact.chunk(index, request.digest) for index in range(request.first, end)]

    def artifact_for(self, target: str, delta_base: str | None) -> Artifact | None:
        """What to serve for ``target`` to a device holding ``delta_base``; None for an unknown target."""
        key = (digest_hex(target), digest_hex(delta_base) if delta_base else None)
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._load_lock:
            cached = self._cached(key)  # another worker may have loaded it while we waited
            if cached is not None:
                return cached
            manifest = self.store.by_digest(target)
            if manifest is None:
                return None
            self.cache_misses += 1
            artifact = self._load(manifest, delta_base)
        with self._cache_lock:
            self._cache[key] = artifact
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return artifact

    def _cached(self, key: tuple[str, str | None]) -> Artifact | None:
        with self._cache_lock:
            artifact = self._cache.get(key)
            if artifact is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            return artifact

    def _load(self, target: ReleaseManifest, delta_base: str | None) -> Artifact:
        delta = self._delta_path(target, delta_base) if delta_base else None
        if delta is not None and delta_base is not None:
            log.info("serving %s as a delta from %s (%s)", target.label, delta_base, delta.name)
            return Artifact.of(_read(delta), target.chunk_size, _full_digest(delta_base))
        log.info("serving %s as the full artifact", target.label)
        return Artifact.of(_read(self.store.artifact_path(target)), target.chunk_size, None)

    def _delta_path(self, target: ReleaseManifest, delta_base: str) -> Path | None:
        """The delta from ``delta_base`` if the store knows that release and the delta is worth it."""
        base = self.store.by_digest(delta_base)
        if base is None:
            log.info("delta base %s of %s is not in the store: full artifact", delta_base, target.label)
            return None
        try:
            return self.store.delta(base, target)
        except FleetError as exc:
            # A delta that cannot be made is no reason to refuse the device: the full one works.
            log.warning("delta %s -> %s failed (%s): full artifact", base.label, target.label, exc)
            return None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"{path}: cannot read: {exc.strerror}") from exc


# --- the MQTT service ---------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per node: ``rate`` bytes/s, bursts of up to one second's worth.

    ``reserve`` takes the bytes at once (the bucket may go negative) and returns how long to wait
    before sending, so several workers serving the same node queue up behind each other fairly
    and a chunk bigger than the bucket still goes out.
    """

    MAX_IDLE_BUCKETS = 4096

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError("rate limit must be a positive number of bytes per second")
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}  # node -> (tokens, time of last update)
        self._lock = threading.Lock()

    def reserve(self, node: str, size: int) -> float:
        """Seconds to wait before sending ``size`` bytes to ``node``."""
        with self._lock:
            now = time.monotonic()
            tokens = self._tokens(node, now) - size
            self._buckets[node] = (tokens, now)
            self._forget_idle(now)
        return max(0.0, -tokens / self.rate)

    def _tokens(self, node: str, now: float) -> float:
        tokens, updated = self._buckets.get(node, (float(self.rate), now))
        return min(float(self.rate), tokens + (now - updated) * self.rate)

    def _forget_idle(self, now: float) -> None:
        # A full bucket is the same as no bucket: drop them so a large fleet does not grow the map forever.
        if len(self._buckets) > self.MAX_IDLE_BUCKETS:
            full = [node for node in self._buckets if self._tokens(node, now) >= self.rate]
            for node in full:
                del self._buckets[node]


@dataclass
class ServiceStats:
    requests: int = 0
    """Valid requests received (served or dropped)."""
    chunks_sent: int = 0
    """Chunks the broker acknowledged (error chunks included)."""
    bytes_sent: int = 0
    """Artifact bytes in acknowledged chunks (goodput, without message overhead)."""
    errors: int = 0
    """Invalid requests, error replies and windows not fully acknowledged."""
    dropped: int = 0
    """Requests not served: queue full, not connected or stopping."""


@dataclass(frozen=True)
class _Job:
    node: str
    request: ArtifactRequest


class ReleaseService:
    """Serves ``artifact/req`` of every node on one MQTT connection with ``max_transfers`` workers."""

    def __init__(
        self,
        mqtt: FleetMqtt,
        server: ReleaseServer,
        *,
        max_transfers: int = 8,
        queue_size: int | None = None,
        rate_limit: int | None = None,
        publish_timeout: float = 30.0,
        share: str | None = None,
    ) -> None:
        if max_transfers < 1:
            raise ValueError("max_transfers must be at least 1")
        self.mqtt = mqtt
        self.server = server
        self.max_transfers = max_transfers
        self.publish_timeout = publish_timeout
        self.share = share  # several controllers split the requests (rate limits then apply per controller)
        self.limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        # Bounded: a burst of requests beyond this is dropped (the agent asks again), not buffered
        # without limit. A request is a few dozen bytes; 8 per worker shed 2 % of a 10,000-device
        # wave started at once (bench/sim_scale.py), 64 per worker keeps the queue under ~30 s.
        self._queue: queue.Queue[_Job | None] = queue.Queue(queue_size or 64 * max_transfers)
        self._stats = ServiceStats()
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self._filter = all_nodes_filter(Channel.ARTIFACT_REQ)

    def stats(self) -> ServiceStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return ServiceStats(**{f.name: getattr(self._stats, f.name) for f in fields(ServiceStats)})

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._workers:
            raise RuntimeError("release service already started")
        self._stopping.clear()
        for number in range(self.max_transfers):
            worker = threading.Thread(target=self._work, name=f"release-transfer-{number}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.mqtt.subscribe(self._filter, self._on_request, qos=1, share=self.share)
        log.info("release service: serving %s (%d transfers at a time)", self._filter, self.max_transfers)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests, let the workers finish their current chunk and join them (bounded)."""
        self.mqtt.unsubscribe(self._filter)
        self._stopping.set()
        self._discard_queued()
        for _ in self._workers:
            try:
                self._queue.put_nowait(None)
            except queue.Full:  # cannot happen after the drain unless a late request slipped in
                self._discard_queued()
                self._queue.put_nowait(None)
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("release service: %s did not stop within %.1fs", worker.name, timeout)
        self._workers.clear()

    def _discard_queued(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._count(dropped=1)

    # ---- intake (paho's thread: decode and queue, nothing slow) ----------------------------

    def _on_request(self, topic: str, payload: bytes) -> None:
        try:
            node, _channel, message = decode_for_channel(topic, payload)
        except InvalidMessage as exc:
            self._count(errors=1)
            log.warning("release service: ignoring request: %s", exc)
            return
        if not isinstance(message, ArtifactRequest):  # only artifact/req is subscribed
            return
        self._count(requests=1)
        if self._stopping.is_set():
            self._count(dropped=1)
            return
        try:
            self._queue.put_nowait(_Job(node, message))
        except queue.Full:
            self._count(dropped=1)
            log.warning(
                "%s: release service busy, dropped request for %s chunk %d (the agent asks again)",
                node,
                message.digest,
                message.first,
            )

    # ---- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._serve(job)
            except Exception:
                # Deliberately broad: one bad request must not take a transfer slot away for good.
                self._count(errors=1)
                log.exception("%s: serving %s failed", job.node, job.request.digest)

    def _serve(self, job: _Job) -> None:
        request = job.request
        if not self.mqtt.connected.is_set():
            self._count(dropped=1)
            log.info("%s: not connected, dropped request for chunk %d", job.node, request.first)
            return
        try:
            chunks = self.server.chunks_for(request)
        except FleetError as exc:
            log.error("%s: cannot serve %s: %s", job.node, request.digest, exc)
            chunks = [error_chunk(request, f"release server failed: {exc}")]
        if chunks[0].error is not None:
            self._count(errors=1)
            log.info("%s: %s", job.node, chunks[0].error)
        log.debug("%s: chunks %d..%d of %s", job.node, chunks[0].index, chunks[-1].index, request.digest)
        self._send(job.node, chunks)

    def _send(self, node: str, chunks: list[ArtifactChunk]) -> None:
        """Publish the window (paced by the rate limit), then wait for the broker's PUBACKs."""
        topic = node_topic(node, Channel.ARTIFACT_CHUNK)
        sent = []
        for chunk in chunks:
            payload = encode(chunk)
            if not self._pace(node, len(payload)):
                return
            try:
                sent.append((chunk, self.mqtt.publish(topic, payload, qos=1)))
            except TransportError as exc:
                self._count(errors=1)
                log.warning("%s: %s", node, exc)
                break
        deadline = time.monotonic() + self.publish_timeout
        acked = [chunk for chunk, info in sent if FleetMqtt.wait_published(info, max(0.0, deadline - time.monotonic()))]
        self._count(chunks_sent=len(acked), bytes_sent=sum(len(chunk.data) for chunk in acked))
        if len(acked) < len(chunks):
            self._count(errors=1)
            log.warning(
                "%s: %d of %d chunks not acknowledged by the broker", node, len(chunks) - len(acked), len(chunks)
            )

    def _pace(self, node: str, size: int) -> bool:
        """Wait for the node's rate limit; False when the service is stopping meanwhile."""
        if self.limiter is None:
            return not self._stopping.is_set()
        delay = self.limiter.reserve(node, size)
        return not self._stopping.wait(delay) if delay > 0 else not self._stopping.is_set()
