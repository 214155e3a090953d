"""Answers agents' artifact requests (``artifact/req``) with chunks (``artifact/chunk``) from the store.

Two layers: :class:`ReleaseServer` is the pure logic (request in, chunks out, no MQTT), and
:class:`ReleaseService` wires it to a :class:`~fleet.controller.mqtt.FleetMqtt` connection with a bounded worker
pool and a per-node rate limit.

Flow control is the agent's: it asks for a window of chunks and asks for the next window once it
has verified them, so a slow link is never flooded by more than one window. The server is
stateless per device; a request that gets lost (dropped here, lost by the broker) is simply asked
again by the agent after its timeout.

One device must not be able to starve the others (issue 11), so every request is cheap to take in
and bounded to serve:

* no delta is ever computed for a request: deltas are made ahead of time
  (:meth:`~fleet.releases.ReleaseStore.prepare`, called when a rollout starts); a (target, base)
  pair without a prepared delta is answered with the full artifact, which every agent accepts;
* a node has at most one request being served and one waiting: a newer request replaces the
  waiting one (``replaced``), and the waiting nodes are served in arrival order, so a flooding
  node holds one worker while the others share the rest;
* a window is at most ``max_window`` chunks (``clamped``), and each node is paced by
  ``rate_limit`` bytes/s (``DEFAULT_RATE_LIMIT`` unless told otherwise; 0 turns it off);
* the MQTT thread only reads the node out of the topic: decoding happens in the worker, once per
  request actually served, so a flood of requests costs the intake a dictionary update each.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, fields
from pathlib import Path

from fleet.controller.mqtt import FleetMqtt
from fleet.protocol.codec import decode_for_channel, encode
from fleet.protocol.errors import FleetError, InvalidMessage, TransportError
from fleet.protocol.messages import ArtifactChunk, ArtifactRequest, digest_hex
from fleet.protocol.topics import NODES, Channel, all_nodes_filter, node_topic
from fleet.releases import ReleaseError, ReleaseManifest, ReleaseStore

log = logging.getLogger(__name__)

MAX_ERROR = 512  # ArtifactChunk.error's limit
_REQ_PREFIX = f"{NODES}/"
_REQ_SUFFIX = f"/{Channel.ARTIFACT_REQ.value}"
MAX_REQUEST_BYTES = 1024
"""A valid request is well under 300 bytes; anything bigger is refused before it waits in memory."""
MAX_WINDOW = 32
"""Chunks sent for one request at most (the protocol allows asking for 256): a 60-byte request must
not buy megabytes. Agents ask for 8 by default. A larger window is clamped, not refused, but an agent
that asked for more waits for the rest until its request timeout before asking again: agents should
not be configured above this."""
DEFAULT_RATE_LIMIT = 1024 * 1024
"""Artifact bytes per second per node unless the service is told otherwise (``rate_limit=0``: no limit).
A 10 MiB release takes a device 10 s at this rate; the burst is a second's worth."""


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
    content-addressed (payload digests), so they never go stale. A delta base without a prepared
    delta shares the full artifact's entry, so asking with ever new bases cannot thrash the cache.

    Never computes a delta: see :meth:`ReleaseStore.prepare`.
    """

    def __init__(self, store: ReleaseStore, *, cache_size: int = 4, max_window: int = MAX_WINDOW) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        if max_window < 1:
            raise ValueError("max_window must be at least 1")
        self.store = store
        self.cache_size = cache_size
        self.max_window = max_window
        self.cache_hits = 0
        self.cache_misses = 0
        self.full_for_delta = 0  # delta requests answered with the full artifact (no prepared delta)
        self._cache: OrderedDict[tuple[str, str | None], Artifact] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._manifests: dict[str, ReleaseManifest] = {}  # payload hex -> manifest, for the delta file's name
        # One loader per artifact: when a new release goes out, every worker asks for it at once, and
        # reading it once is better than eight times in parallel; loading one artifact never holds
        # up a worker that wants another.
        self._loading: dict[tuple[str, str | None], threading.Lock] = {}

    def chunks_for(self, request: ArtifactRequest) -> list[ArtifactChunk]:
        """Chunks ``[first, first + window)`` clipped to the artifact and to ``max_window``, or a single error chunk."""
        artifact = self.artifact_for(request.digest, request.delta_base)
        if artifact is None:
            return [error_chunk(request, f"unknown release {request.digest}")]
        if request.first >= artifact.total and artifact.base is not None:
            # Past the end of the delta: a device that began on the full artifact before the delta
            # was prepared is asking for its next window. It continues on the full one (a window
            # that starts inside the delta switches it to the delta: chunks name their artifact).
            full = self.artifact_for(request.digest, None)
            if full is not None and request.first < full.total:
                artifact = full
        if request.first >= artifact.total:
            reason = f"chunk {request.first} is past the end of the artifact ({artifact.total} chunks)"
            return [error_chunk(request, reason, artifact)]
        end = min(request.first + min(request.window, self.max_window), artifact.total)
        return [artifact.chunk(index, request.digest) for index in range(request.first, end)]

    def artifact_for(self, target: str, delta_base: str | None) -> Artifact | None:
        """What to serve for ``target`` to a device holding ``delta_base``; None for an unknown target.

        The delta from ``delta_base`` if one has been prepared, else the full artifact.
        """
        target_hex = digest_hex(target)
        manifest = self._manifest(target_hex)
        if manifest is None:
            return None
        base_hex = None
        if delta_base is not None:
            if self.store.prepared_delta(manifest, delta_base) is not None:
                base_hex = digest_hex(delta_base)
            else:
                with self._cache_lock:
                    self.full_for_delta += 1
        key = (target_hex, base_hex)
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._cache_lock:
            loading = self._loading.setdefault(key, threading.Lock())
        try:
            with loading:
                cached = self._cached(key)  # another worker may have loaded it while we waited
                if cached is not None:
                    return cached
                fresh = self.store.by_digest(target_hex)  # a rebuilt store is read again on every miss
                if fresh is None:
                    return None
                with self._cache_lock:
                    self.cache_misses += 1
                artifact = self._load(fresh, base_hex)
        finally:
            with self._cache_lock:
                self._loading.pop(key, None)
        with self._cache_lock:
            self._cache[(target_hex, digest_hex(artifact.base) if artifact.base else None)] = artifact
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return artifact

    def _manifest(self, target_hex: str) -> ReleaseManifest | None:
        with self._cache_lock:
            known = self._manifests.get(target_hex)
        if known is not None:
            return known
        manifest = self.store.by_digest(target_hex)
        if manifest is not None:
            with self._cache_lock:
                self._manifests[target_hex] = manifest
        return manifest

    def _cached(self, key: tuple[str, str | None]) -> Artifact | None:
        with self._cache_lock:
            artifact = self._cache.get(key)
            if artifact is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            return artifact

    def _load(self, target: ReleaseManifest, base_hex: str | None) -> Artifact:
        delta = self.store.prepared_delta(target, base_hex) if base_hex is not None else None
        if delta is not None and base_hex is not None:
            try:
                data = _read(delta)
            except ReleaseError as exc:  # removed meanwhile: the full artifact works too
                log.warning("%s: prepared delta unreadable (%s): full artifact", target.label, exc)
            else:
                log.info("serving %s as a delta from %s (%s)", target.label, base_hex, delta.name)
                return Artifact.of(data, target.chunk_size, _full_digest(base_hex))
        log.info("serving %s as the full artifact", target.label)
        return Artifact.of(_read(self.store.artifact_path(target)), target.chunk_size, None)


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
    """Requests received (served, replaced or dropped; invalid ones too)."""
    chunks_sent: int = 0
    """Chunks the broker acknowledged (error chunks included)."""
    bytes_sent: int = 0
    """Artifact bytes in acknowledged chunks (goodput, without message overhead)."""
    errors: int = 0
    """Invalid requests, error replies and windows not fully acknowledged."""
    dropped: int = 0
    """Requests not served: queue full, not connected or stopping."""
    replaced: int = 0
    """Requests not served because a newer one of the same node arrived while they waited."""
    clamped: int = 0
    """Served requests whose window was cut to ``max_window`` chunks."""
    refused: int = 0
    """Requests answered with an error chunk (unknown release, past the end, server failure)."""
    full_for_delta: int = 0
    """Delta requests answered with the full artifact: no delta prepared for the pair."""


@dataclass(frozen=True)
class _Job:
    node: str
    topic: str
    payload: bytes


class ReleaseService:
    """Serves ``artifact/req`` of every node on one MQTT connection with ``max_transfers`` workers.

    Scheduling is per node: a node is served by at most one worker at a time and has at most one
    request waiting (the newest: an agent that asks again has given up on the older one). Waiting
    nodes are taken in the order they started waiting, so each node with work gets its turn.
    ``queue_size`` bounds the nodes waiting; a request beyond it is dropped (the agent asks again).
    """

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
        """``rate_limit``: bytes/s per node; None for ``DEFAULT_RATE_LIMIT``, 0 for no limit."""
        if max_transfers < 1:
            raise ValueError("max_transfers must be at least 1")
        if rate_limit is not None and rate_limit < 0:
            raise ValueError("rate_limit must be 0 (no limit) or a positive number of bytes per second")
        self.mqtt = mqtt
        self.server = server
        self.max_transfers = max_transfers
        self.publish_timeout = publish_timeout
        self.share = share  # several controllers split the requests (rate limits then apply per controller)
        rate = DEFAULT_RATE_LIMIT if rate_limit is None else rate_limit
        self.limiter = RateLimiter(rate) if rate > 0 else None
        # Bounded: a burst beyond this many waiting nodes is dropped (the agent asks again), not
        # buffered without limit. 8 per worker shed 2 % of a 10,000-device wave started at once
        # (bench/sim_scale.py), 64 per worker keeps the queue under ~30 s.
        self.queue_size = queue_size or 64 * max_transfers
        self._waiting: dict[str, _Job] = {}  # node -> its newest request not yet taken by a worker
        self._ready: deque[str] = deque()  # nodes with a waiting request and no worker, oldest first
        self._active: set[str] = set()  # nodes a worker is serving
        self._stats = ServiceStats()
        self._stats_lock = threading.Lock()
        # One lock for the counters and the schedule: the intake takes it once per request.
        self._schedule = threading.Condition(self._stats_lock)
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
        # QoS 0: a request is worth nothing once the agent has asked again (it does after its
        # timeout), so the broker need not hold, resend or count requests in flight for us, and a
        # flood is not queued at the broker ahead of other nodes' requests behind an inflight window.
        self.mqtt.subscribe(self._filter, self._on_request, qos=0, share=self.share)
        limit = f"{self.limiter.rate} bytes/s per node" if self.limiter else "no rate limit"
        log.info(
            "release service: serving %s (%d transfers at a time, %s, windows of at most %d chunks)",
            self._filter,
            self.max_transfers,
            limit,
            self.server.max_window,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking requests, let the workers finish their current chunk and join them (bounded)."""
        self.mqtt.unsubscribe(self._filter)
        self._stopping.set()
        with self._schedule:
            self._stats.dropped += len(self._waiting)
            self._waiting.clear()
            self._ready.clear()
            self._schedule.notify_all()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("release service: %s did not stop within %.1fs", worker.name, timeout)
        self._workers.clear()

    # ---- intake (paho's thread: file the request under its node, nothing slow) -------------

    def _on_request(self, topic: str, payload: bytes) -> None:
        # Called for every request of every node, floods included: no decoding, no regex, one lock.
        # The node id is checked in the worker, before anything is published to it.
        if not (topic.startswith(_REQ_PREFIX) and topic.endswith(_REQ_SUFFIX)):  # only artifact/req is subscribed
            return
        node = topic[len(_REQ_PREFIX) : -len(_REQ_SUFFIX)]
        with self._schedule:
            stats = self._stats
            stats.requests += 1
            if len(payload) > MAX_REQUEST_BYTES:  # not kept waiting: a request is a few dozen bytes
                stats.errors += 1
                return
            if self._stopping.is_set():
                stats.dropped += 1
                return
            if node in self._waiting:
                self._waiting[node] = _Job(node, topic, payload)  # keeps its place in the line
                stats.replaced += 1
                return
            if len(self._waiting) >= self.queue_size:
                stats.dropped += 1
                busy = True
            else:
                busy = False
                self._waiting[node] = _Job(node, topic, payload)
                if node not in self._active:
                    self._ready.append(node)
                    self._schedule.notify()
        if busy:
            log.warning("%s: release service busy, dropped a request (the agent asks again)", node)

    # ---- workers ---------------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        with self._schedule:
            while not self._ready:
                if self._stopping.is_set():
                    return None
                self._schedule.wait()
            if self._stopping.is_set():
                return None
            node = self._ready.popleft()
            self._active.add(node)
            return self._waiting.pop(node)

    def _done(self, node: str) -> None:
        with self._schedule:
            self._active.discard(node)
            if node in self._waiting:  # it asked again while being served: back in line
                self._ready.append(node)
                self._schedule.notify()

    def _work(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            try:
                self._serve(job)
            except Exception:
                # Deliberately broad: one bad request must not take a transfer slot away for good.
                self._count(errors=1)
                log.exception("%s: serving a request failed", job.node)
            finally:
                self._done(job.node)

    def _serve(self, job: _Job) -> None:
        try:
            _node, _channel, request = decode_for_channel(job.topic, job.payload)  # checks the node id too
        except InvalidMessage as exc:
            self._count(errors=1)
            log.warning("release service: ignoring request: %s", exc)
            return
        if not isinstance(request, ArtifactRequest):  # cannot happen: the intake took artifact/req only
            return
        if not self.mqtt.connected.is_set():
            self._count(dropped=1)
            log.info("%s: not connected, dropped request for chunk %d", job.node, request.first)
            return
        if request.window > self.server.max_window:
            self._count(clamped=1)
        try:
            chunks = self.server.chunks_for(request)
        except FleetError as exc:
            log.error("%s: cannot serve %s: %s", job.node, request.digest, exc)
            chunks = [error_chunk(request, f"release server failed: {exc}")]
        if request.delta_base is not None and chunks[0].base is None and chunks[0].error is None:
            self._count(full_for_delta=1)
        if chunks[0].error is not None:
            self._count(errors=1, refused=1)
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
