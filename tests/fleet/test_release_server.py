"""The release server: pure request -> chunks logic, then the service over real brokers as a device sees it."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from certs import issue_device
from fleet.cli.serve_cmd import serve
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.release_service import (
    DEFAULT_RATE_LIMIT,
    MAX_WINDOW,
    RateLimiter,
    ReleaseServer,
    ReleaseService,
    ServiceStats,
)
from fleet.protocol.artifacts import apply_delta, decompress_full
from fleet.protocol.codec import decode, encode
from fleet.protocol.errors import TransportError
from fleet.protocol.messages import ArtifactChunk, ArtifactRequest
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import ReleaseManifest, ReleaseStore, build_release
from tests.conftest import MosquittoProcess, Pki, free_port
from tests.mqtt import Endpoint, MqttClient, connected, wait_until
from tests.releases import binaryish, patch

pytestmark = pytest.mark.timeout(60)

NODE = "gw-a"
KIB = 1024


@dataclass(frozen=True)
class Releases:
    store: ReleaseStore
    old: ReleaseManifest  # app 1.0.0
    new: ReleaseManifest  # app 1.1.0, a patch of 1.0.0: a delta is worth it
    blob: ReleaseManifest  # incompressible, 64 KiB chunks: for the rate limit
    bulk: ReleaseManifest  # incompressible 1 MiB, 16 KiB chunks: what the fleet downloads in the flood test


def _tree(root: Path, content: bytes) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "app").write_bytes(content)
    (root / "run").write_bytes(b"#!/bin/sh\nexec ./bin/app\n")
    return root


@pytest.fixture(scope="module")
def releases(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Releases:
    root = tmp_path_factory.mktemp("releases")
    key = load_private_key(pki.paths.release_key.read_bytes())
    store = root / "store"
    # Program-like data plus an incompressible tail, so the full artifact spans a few dozen chunks.
    old_content = binaryish(7, 512 * KIB) + random.Random(6).randbytes(160 * KIB)
    new_content = patch(old_content, 8, edits=5, edit_size=64)
    blob_content = random.Random(9).randbytes(300 * KIB)

    def build(name: str, version: str, content: bytes, chunk_size: int) -> ReleaseManifest:
        source = _tree(root / f"{name}-{version}", content)
        return build_release(
            source,
            name=name,
            version=version,
            store=store,
            release_key=key,
            entry=["./run"],
            health=None,
            chunk_size=chunk_size,
        )

    return Releases(
        ReleaseStore(store),
        build("app", "1.0.0", bytes(old_content), 8 * KIB),
        build("app", "1.1.0", bytes(new_content), 8 * KIB),
        build("blob", "1.0.0", blob_content, 64 * KIB),
        build("bulk", "1.0.0", random.Random(10).randbytes(1024 * KIB), 16 * KIB),
    )


@pytest.fixture
def service_identity(pki: Pki) -> TlsIdentity:
    """The service's own controller identity: sharing one with a test client would kick both off."""
    return pki.own_controller("release-server")


@contextmanager
def running_service(
    endpoint: Endpoint, identity: TlsIdentity, store: ReleaseStore, **options: int | None
) -> Iterator[ReleaseService]:
    mqtt = FleetMqtt(endpoint.host, endpoint.port, identity, options=MqttOptions(reconnect_min=1, reconnect_max=2))
    mqtt.start()
    service = ReleaseService(mqtt, ReleaseServer(store), **options)  # type: ignore[arg-type]
    service.start()
    try:
        yield service
    finally:
        service.stop()
        mqtt.close()


# --- helpers: a device's side of the transfer --------------------------------------------------


def chunk_topic(node: str = NODE) -> str:
    return node_topic(node, Channel.ARTIFACT_CHUNK)


def request(device: MqttClient, digest: str, first: int, window: int, delta_base: str | None = None) -> None:
    message = ArtifactRequest(digest=digest, first=first, window=window, delta_base=delta_base)
    device.publish(node_topic(NODE, Channel.ARTIFACT_REQ), encode(message))


def next_chunk(device: MqttClient, node: str = NODE, timeout: float = 10.0) -> ArtifactChunk:
    message = device.expect(lambda received: received.topic == chunk_topic(node), timeout)
    return decode(message.topic, message.payload, ArtifactChunk)


def receive_window(device: MqttClient, first: int, window: int) -> dict[int, ArtifactChunk]:
    """The chunks answering one request (QoS 1 may repeat one: keyed by index)."""
    chunks: dict[int, ArtifactChunk] = {}
    expected = window
    while len(chunks) < expected:
        chunk = next_chunk(device)
        assert chunk.error is None, chunk.error
        assert chunk.total is not None
        expected = min(first + window, chunk.total) - first
        chunks[chunk.index] = chunk
    return chunks


def download(device: MqttClient, digest: str, *, delta_base: str | None = None, window: int = 8) -> bytes:
    """Request windows until eof, check every chunk and the whole artifact, return the artifact."""
    chunks: dict[int, ArtifactChunk] = {}
    first = 0
    while not chunks or not chunks[max(chunks)].eof:
        request(device, digest, first, window, delta_base)
        chunks.update(receive_window(device, first, window))
        first = max(chunks) + 1
    return reassemble(list(chunks.values()))


def reassemble(chunks: list[ArtifactChunk]) -> bytes:
    ordered = sorted(chunks, key=lambda chunk: chunk.index)
    assert [chunk.index for chunk in ordered] == list(range(len(ordered)))
    for chunk in ordered:
        assert chunk.sha256 == "sha256:" + hashlib.sha256(chunk.data).hexdigest()
        assert chunk.total == len(ordered)
        assert chunk.eof == (chunk.index == len(ordered) - 1)
    artifact = b"".join(chunk.data for chunk in ordered)
    assert len(artifact) == ordered[0].size
    assert ordered[0].artifact == "sha256:" + hashlib.sha256(artifact).hexdigest()
    return artifact


def req(digest: str, first: int = 0, window: int = 256, delta_base: str | None = None) -> ArtifactRequest:
    return ArtifactRequest(digest=digest, first=first, window=window, delta_base=delta_base)


def every_chunk(server: ReleaseServer, digest: str, delta_base: str | None = None) -> list[ArtifactChunk]:
    """The whole artifact, window after window (a window is at most ``server.max_window`` chunks)."""
    chunks = server.chunks_for(req(digest, delta_base=delta_base))
    while chunks[-1].error is None and not chunks[-1].eof:
        chunks += server.chunks_for(req(digest, first=chunks[-1].index + 1, delta_base=delta_base))
    return chunks


def delta_files(store: ReleaseStore) -> list[Path]:
    return sorted(store.root.glob("*/deltas/*"))


def copy_of(releases: Releases, tmp_path: Path, *manifests: ReleaseManifest) -> ReleaseStore:
    """A store of its own holding ``manifests`` (and no deltas)."""
    store = ReleaseStore(tmp_path / "store")
    for manifest in manifests:
        for path in (
            releases.store.manifest_path(manifest.name, manifest.version),
            releases.store.artifact_path(manifest),
        ):
            copy = store.root / path.relative_to(releases.store.root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(path.read_bytes())
    return store


# --- pure: ReleaseServer ------------------------------------------------------------------------


def test_full_artifact_chunks_reassemble_to_the_artifact_file(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    chunks = every_chunk(server, releases.new.digest)
    assert len(chunks) > 3
    assert all(chunk.base is None and chunk.digest == releases.new.digest for chunk in chunks)
    assert reassemble(chunks) == releases.store.artifact_path(releases.new).read_bytes()


def test_prepared_delta_is_served(releases: Releases) -> None:
    assert releases.store.prepare(releases.new, [releases.old.digest]) in (0, 1)  # 0: an earlier test made it
    assert releases.store.wait_prepared(60)
    server = ReleaseServer(releases.store)
    chunks = every_chunk(server, releases.new.digest, delta_base=releases.old.digest)
    assert {chunk.base for chunk in chunks} == {releases.old.digest}
    delta = reassemble(chunks)
    path = releases.store.prepared_delta(releases.new, releases.old.digest)
    assert path is not None and delta == path.read_bytes()
    assert len(delta) < releases.store.artifact_path(releases.new).stat().st_size / 5
    payload = apply_delta(releases.store.payload(releases.old), delta, releases.new.digest)
    assert payload == releases.store.payload(releases.new)
    assert server.full_for_delta == 0


def test_a_download_begun_on_the_full_artifact_continues_on_it_past_the_end_of_a_new_delta(
    releases: Releases,
) -> None:
    # The delta was prepared while the device was fetching the full artifact: it asks on, with its base.
    assert releases.store.prepare(releases.new, [releases.old.digest]) in (0, 1)
    assert releases.store.wait_prepared(60)
    server = ReleaseServer(releases.store)
    delta = every_chunk(server, releases.new.digest, delta_base=releases.old.digest)
    full = every_chunk(server, releases.new.digest)
    assert len(delta) < 8 < len(full)
    chunks = server.chunks_for(req(releases.new.digest, first=8, window=4, delta_base=releases.old.digest))
    assert [(chunk.index, chunk.base, chunk.artifact) for chunk in chunks] == [
        (index, None, full[0].artifact) for index in range(8, 12)
    ]
    assert [chunk.data for chunk in chunks] == [chunk.data for chunk in full[8:12]]
    (past,) = server.chunks_for(req(releases.new.digest, first=len(full), delta_base=releases.old.digest))
    assert past.error is not None and "past the end" in past.error


def test_unprepared_delta_pair_gets_the_full_artifact_and_no_delta_is_made(releases: Releases, tmp_path: Path) -> None:
    store = copy_of(releases, tmp_path, releases.old, releases.new)  # the module's store may hold deltas
    server = ReleaseServer(store)
    full = store.artifact_path(releases.new).read_bytes()
    windows = 0
    # A known base (a delta would be worth it), an unknown one, and the target itself.
    for base in (releases.old.digest, "ab" * 32, releases.new.digest):
        chunks = every_chunk(server, releases.new.digest, delta_base=base)
        assert {chunk.base for chunk in chunks} == {None}
        assert reassemble(chunks) == full
        windows += -(-len(chunks) // server.max_window)
    assert delta_files(store) == []  # nothing computed, nothing written
    assert store.delta_stats().queued == 0
    assert server.full_for_delta == windows
    # Every base shares the full artifact's cache entry: asking with ever new bases cannot thrash it.
    assert server.cache_misses == 1


def test_window_is_clamped_to_max_window(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    assert server.max_window == MAX_WINDOW == 32
    chunks = server.chunks_for(req(releases.bulk.digest, first=1, window=256))
    assert releases.bulk.size // releases.bulk.chunk_size > MAX_WINDOW + 1  # the artifact has more to give
    assert [chunk.index for chunk in chunks] == list(range(1, 1 + MAX_WINDOW))
    small = ReleaseServer(releases.store, max_window=3)
    assert [chunk.index for chunk in small.chunks_for(req(releases.bulk.digest, first=5, window=8))] == [5, 6, 7]
    assert len(small.chunks_for(req(releases.bulk.digest, first=5, window=2))) == 2


def test_prepare_makes_deltas_in_the_background_once(releases: Releases, tmp_path: Path) -> None:
    store = copy_of(releases, tmp_path, releases.old, releases.new)
    unknown = "sha256:" + "ab" * 32
    # The target itself and duplicates are not queued; an unknown base is, and skipped by the worker.
    queued = store.prepare(releases.new, [releases.old.digest, releases.old.digest, releases.new.digest, unknown])
    assert queued == 2
    assert store.wait_prepared(60)
    stats = store.delta_stats()
    assert (stats.queued, stats.made, stats.skipped, stats.failed) == (2, 1, 1, 0)
    assert store.prepared_delta(releases.new, releases.old.digest) is not None
    assert store.prepared_delta(releases.new, unknown) is None
    assert store.prepare(releases.new, [releases.old.digest]) == 0  # made: not again
    store.close()
    assert store.prepare(releases.new, [unknown]) == 0  # closed: nothing is queued any more


def test_unknown_release_is_one_error_chunk(releases: Releases) -> None:
    chunks = ReleaseServer(releases.store).chunks_for(req("sha256:" + "cd" * 32, first=3))
    assert len(chunks) == 1
    assert chunks[0].error == f"unknown release sha256:{'cd' * 32}"
    assert (chunks[0].index, chunks[0].data, chunks[0].eof) == (3, b"", False)


def test_first_past_the_end_is_an_error(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    total = len(every_chunk(server, releases.old.digest))
    (chunk,) = server.chunks_for(req(releases.old.digest, first=total))
    assert chunk.error is not None and "past the end" in chunk.error
    assert (chunk.index, chunk.total, chunk.data) == (total, total, b"")


def test_window_is_clipped_to_the_artifact_and_eof_marks_the_last_chunk(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    total = len(every_chunk(server, releases.old.digest))
    head = server.chunks_for(req(releases.old.digest, first=0, window=2))
    assert [(chunk.index, chunk.eof) for chunk in head] == [(0, False), (1, False)]
    tail = server.chunks_for(req(releases.old.digest, first=total - 2, window=5))
    assert [(chunk.index, chunk.eof) for chunk in tail] == [(total - 2, False), (total - 1, True)]


def test_artifacts_are_cached_by_target_and_base(releases: Releases) -> None:
    server = ReleaseServer(releases.store, cache_size=1)
    for _ in range(3):
        server.chunks_for(req(releases.old.digest, window=1))
    assert (server.cache_misses, server.cache_hits) == (1, 2)
    server.chunks_for(req(releases.new.digest, window=1))  # evicts the old release (cache of one)
    server.chunks_for(req(releases.old.digest.removeprefix("sha256:"), window=1))  # bare hex: same key
    assert (server.cache_misses, server.cache_hits) == (3, 2)


def test_rate_limiter_paces_each_node_separately() -> None:
    limiter = RateLimiter(1000)
    assert limiter.reserve("a", 1000) == 0  # a full second's burst
    assert limiter.reserve("a", 500) == pytest.approx(0.5, abs=0.05)
    assert limiter.reserve("a", 500) == pytest.approx(1.0, abs=0.05)  # queues behind the first wait
    assert limiter.reserve("b", 800) == 0


# --- over MQTT, both brokers ------------------------------------------------------------------


def test_device_downloads_the_full_artifact(
    broker: Endpoint, pki: Pki, service_identity: TlsIdentity, releases: Releases
) -> None:
    with (
        running_service(broker, service_identity, releases.store) as service,
        connected(broker, pki.device(NODE)) as device,
    ):
        device.subscribe(chunk_topic())
        started = time.monotonic()
        artifact = download(device, releases.new.digest, window=4)
        elapsed = time.monotonic() - started
        assert decompress_full(artifact, releases.new.digest) == releases.store.payload(releases.new)
        chunks = -(-len(artifact) // releases.new.chunk_size)
        # The worker counts a chunk once the broker acknowledged it, which may be after the device has it.
        wait_until(lambda: service.stats().chunks_sent == chunks, 10, "every chunk acknowledged")
        stats = service.stats()
    print(f"{broker.kind}: {chunks} chunks, {len(artifact)} bytes in {elapsed:.2f}s ({chunks / elapsed:.0f} chunks/s)")
    assert (stats.bytes_sent, stats.errors, stats.dropped) == (len(artifact), 0, 0)
    assert stats.requests == -(-chunks // 4)


def test_device_downloads_a_delta(
    broker: Endpoint, pki: Pki, service_identity: TlsIdentity, releases: Releases
) -> None:
    with (
        running_service(broker, service_identity, releases.store),
        connected(broker, pki.device(NODE)) as device,
    ):
        device.subscribe(chunk_topic())
        delta = download(device, releases.new.digest, delta_base=releases.old.digest)
    payload = apply_delta(releases.store.payload(releases.old), delta, releases.new.digest)
    assert payload == releases.store.payload(releases.new)


def mosquitto_pub(broker: Endpoint, pki: Pki, node: str, message: str | bytes) -> None:
    """Publish as the device itself: operators may not publish on ``artifact/req``."""
    device = pki.device(node)
    assert device.cert is not None and device.key is not None
    argv = ["mosquitto_pub", "--cafile", str(device.ca), "--cert", str(device.cert), "--key", str(device.key)]
    argv += ["-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", node_topic(node, Channel.ARTIFACT_REQ)]
    if isinstance(message, bytes):
        subprocess.run([*argv, "-s"], input=message, check=True, timeout=20)
    else:
        subprocess.run([*argv, "-m", message], check=True, timeout=20)


def test_json_request_from_mosquitto_pub_is_answered(
    broker: Endpoint, pki: Pki, service_identity: TlsIdentity, releases: Releases
) -> None:
    # The device's certificate is busy with mosquitto_pub, so an operator (who may read) watches.
    with (
        running_service(broker, service_identity, releases.store),
        connected(broker, pki.operator("alice")) as watcher,
    ):
        watcher.subscribe(chunk_topic("gw-b"))
        mosquitto_pub(broker, pki, "gw-b", f'{{"digest":"{releases.old.digest}","first":1,"window":2}}')
        received = {chunk.index: chunk for chunk in (next_chunk(watcher, "gw-b") for _ in range(2))}
    chunks = [received[index] for index in sorted(received)]
    artifact = releases.store.artifact_path(releases.old).read_bytes()
    size = releases.old.chunk_size
    assert [chunk.index for chunk in chunks] == [1, 2]
    assert b"".join(chunk.data for chunk in chunks) == artifact[size : 3 * size]


def test_garbage_requests_are_ignored_and_service_keeps_serving(
    broker: Endpoint, pki: Pki, service_identity: TlsIdentity, releases: Releases
) -> None:
    with (
        running_service(broker, service_identity, releases.store) as service,
        connected(broker, pki.device(NODE)) as device,
    ):
        device.subscribe(chunk_topic())
        req_topic = node_topic(NODE, Channel.ARTIFACT_REQ)
        device.publish(req_topic, b"\xc1 not msgpack")
        device.publish(req_topic, b'{"digest": "nope", "first": 0, "window": 1}')
        device.publish(req_topic, b'{"digest": "' + releases.old.digest.encode() + b'", "first": 0, "window": 999}')
        # One node's requests wait one at a time: a bad request may be replaced by the next before it is read.
        wait_until(lambda: service.stats().errors + service.stats().replaced == 3, 10, "three bad requests counted")
        request(device, releases.old.digest, 0, 1)
        chunk = next_chunk(device)
        assert (chunk.index, chunk.error) == (0, None)
        assert device.drain(settle=0.3) and all(m.topic == chunk_topic() for m in device.seen)
        assert len(device.seen) == 1  # nothing answered the garbage
        assert service.mqtt.handler_errors == 0


# --- one device flooding must not starve the others (issue 11) ----------------------------------

FLEET = tuple(f"fleet-{index:02d}" for index in range(20))
FLOODER = "flooder"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet_nodes(pki: Pki) -> tuple[str, ...]:
    for node in (*FLEET, FLOODER):
        if not pki.paths.device(node).cert.exists():
            issue_device(pki.paths, node)
    return FLEET


@dataclass
class Fetched:
    artifact: bytes
    stalls: int  # windows asked for again after a timeout


def fetch_artifact(device: MqttClient, node: str, digest: str, window: int = 8, timeout: float = 5.0) -> Fetched:
    """A well-behaved device: window after window, asking again for what a timeout left missing."""
    chunks: dict[int, ArtifactChunk] = {}
    total: int | None = None
    stalls = 0
    while total is None or len(chunks) < total:
        first = next(index for index in itertools.count() if index not in chunks)
        message = ArtifactRequest(digest=digest, first=first, window=window)
        device.publish(node_topic(node, Channel.ARTIFACT_REQ), encode(message))
        deadline = time.monotonic() + timeout
        while not all(
            index in chunks for index in range(first, first + window if total is None else min(first + window, total))
        ):
            try:
                received = device.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                stalls += 1
                break
            chunk = decode(received.topic, received.payload, ArtifactChunk)
            assert chunk.error is None, chunk.error
            total = chunk.total
            chunks[chunk.index] = chunk
    return Fetched(reassemble(list(chunks.values())), stalls)


def fleet_download(
    endpoint: Endpoint, pki: Pki, nodes: tuple[str, ...], release: ReleaseManifest, expected: bytes
) -> tuple[float, int]:
    """Seconds until every node has the whole artifact (connected and subscribed beforehand), and
    how many windows the nodes had to ask for again after a timeout."""
    clients = [MqttClient(endpoint, pki.device(node)).connect() for node in nodes]
    try:
        for node, client in zip(nodes, clients, strict=True):
            client.subscribe(chunk_topic(node))
        with ThreadPoolExecutor(len(nodes)) as pool:
            started = time.monotonic()
            futures = [
                pool.submit(fetch_artifact, client, node, release.digest)
                for node, client in zip(nodes, clients, strict=True)
            ]
            fetched = [future.result(timeout=120) for future in futures]
            elapsed = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    assert all(one.artifact == expected for one in fetched)
    return elapsed, sum(one.stalls for one in fetched)


@contextmanager
def flooding(
    endpoint: Endpoint, pki: Pki, releases: Releases, channel: Channel = Channel.ARTIFACT_REQ
) -> Iterator[subprocess.Popen[str]]:
    """The flooder as its own process: every target with every base (and unknown ones), window 256."""
    device = pki.device(FLOODER)
    unknown = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]
    targets = [releases.new.digest, releases.old.digest, releases.blob.digest, releases.bulk.digest, unknown[0]]
    bases = [releases.old.digest, releases.new.digest, releases.blob.digest, *unknown]
    argv = [sys.executable, "-m", "tests.fleet.flood_device", endpoint.host, str(endpoint.port)]
    argv += [str(device.ca), str(device.cert), str(device.key), FLOODER, *targets]
    argv += [arg for base in bases for arg in ("--base", base)] + ["--channel", channel.value]
    process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline()) == {"started": True}
        yield process
    finally:
        if process.poll() is None and process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


class ServiceProcess:
    """tests/fleet/release_server_process.py: a ReleaseService (default options) in its own process."""

    def __init__(self, endpoint: Endpoint, identity: TlsIdentity, store: ReleaseStore) -> None:
        argv = [sys.executable, "-m", "tests.fleet.release_server_process", endpoint.host, str(endpoint.port)]
        argv += [str(identity.ca), str(identity.cert), str(identity.key), str(store.root)]
        self.process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        assert json.loads(self.stdout.readline()) == {"ready": True}

    def stats(self) -> ServiceStats:
        self.stdin.write("stats\n")
        self.stdin.flush()
        return ServiceStats(**json.loads(self.stdout.readline()))

    def stop(self) -> None:
        self.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.stdout.close()


def flood_arrived(service: ServiceProcess, requests_before: int) -> bool:
    return service.stats().requests - requests_before > 200


@pytest.mark.timeout(300)
def test_a_flooding_device_does_not_starve_the_fleet(
    service_identity: TlsIdentity, mosquitto: Endpoint, pki: Pki, releases: Releases, fleet_nodes: tuple[str, ...]
) -> None:
    """20 devices download 1 MiB with and without one device flooding requests; the service, the
    flooder and the broker each run in their own process.

    No timing is asserted (CI runs on two busy cores): the times and their ratio are printed (issue
    11 asks for at most 1.5x). FLOOD_ROUNDS=N repeats the measurement; FLOOD_CONTROL=1 adds a round
    where the same flood goes to a channel no service reads (what the flooding process and the
    broker cost the machine by themselves).
    """
    rounds = int(os.environ.get("FLOOD_ROUNDS", "1"))
    artifact = releases.store.artifact_path(releases.bulk).read_bytes()
    deltas_before = delta_files(releases.store)
    service = ServiceProcess(mosquitto, service_identity, releases.store)
    try:
        fleet_download(mosquitto, pki, fleet_nodes[:1], releases.bulk, artifact)  # subscribed and warm
        for round_number in range(1, rounds + 1):
            quiet, quiet_stalls = fleet_download(mosquitto, pki, fleet_nodes, releases.bulk, artifact)
            if os.environ.get("FLOOD_CONTROL"):
                with flooding(mosquitto, pki, releases, Channel.EVENTS):
                    time.sleep(1)
                    control, _ = fleet_download(mosquitto, pki, fleet_nodes, releases.bulk, artifact)
                print(f"round {round_number}: {control:.2f}s with a flood on a channel nobody serves")
            before = service.stats()
            with flooding(mosquitto, pki, releases) as flooder:
                flood_started = time.monotonic()
                # The flood is on before the fleet starts: the service has seen plenty of it.
                wait_until(partial(flood_arrived, service, before.requests), 30, "the flood arrives")
                flooded, flooded_stalls = fleet_download(mosquitto, pki, fleet_nodes, releases.bulk, artifact)
                assert flooder.stdin is not None and flooder.stdout is not None
                flooder.stdin.close()
                report = json.loads(flooder.stdout.readline())
                flood_seconds = time.monotonic() - flood_started
            after = service.stats()
            print(
                f"round {round_number}: 20 devices x {releases.bulk.size // KIB} KiB: {quiet:.2f}s quiet, "
                f"{flooded:.2f}s while one device floods: ratio {flooded / quiet:.2f}; flooder sent "
                f"{report['sent']} requests in {flood_seconds:.1f}s and got {report['chunks']} chunks "
                f"({report['bytes'] // KIB} KiB); service: {after.requests - before.requests} requests, "
                f"{after.replaced - before.replaced} replaced, {after.clamped - before.clamped} clamped, "
                f"{after.full_for_delta - before.full_for_delta} full-for-delta, "
                f"{after.refused - before.refused} refused, {after.dropped - before.dropped} dropped; "
                f"windows asked again after a timeout: {quiet_stalls} quiet, {flooded_stalls} flooded"
            )
            # Its share: one request waiting at a time (the rest replaced), windows clamped, and no
            # more bytes than its rate limit allows (a second's burst, then 1 MiB/s).
            assert report["sent"] > 200
            assert after.replaced - before.replaced > report["sent"] / 2
            assert after.clamped > before.clamped
            assert after.full_for_delta > before.full_for_delta
            assert report["bytes"] <= DEFAULT_RATE_LIMIT * (flood_seconds + 1) + MAX_WINDOW * 64 * KIB
            assert after.errors == after.refused  # nothing failed but the flooder's unknown releases
    finally:
        service.stop()
    assert delta_files(releases.store) == deltas_before  # the flood made no delta


# --- transport behaviour -----------------------------------------------------------------------


def test_service_survives_a_broker_restart(
    pki: Pki, service_identity: TlsIdentity, releases: Releases, tmp_path: Path
) -> None:
    process = MosquittoProcess(pki.paths, tmp_path / "mosquitto")
    process.start(pki.controller())
    endpoint = Endpoint("mosquitto", "127.0.0.1", process.port)
    try:
        with running_service(endpoint, service_identity, releases.store) as service:
            process.stop()
            wait_until(lambda: not service.mqtt.connected.is_set(), 10, "service notices the broker is gone")
            process.start(pki.controller())
            wait_until(service.mqtt.connected.is_set, 15, "service reconnects")
            with connected(endpoint, pki.device(NODE)) as device:
                device.subscribe(chunk_topic())
                request(device, releases.old.digest, 0, 2)
                assert sorted(receive_window(device, 0, 2)) == [0, 1]
            assert service.mqtt.connects == 2
    finally:
        process.stop()


def test_rate_limit_paces_a_device(
    service_identity: TlsIdentity, mosquitto: Endpoint, pki: Pki, releases: Releases
) -> None:
    # The service identity first: Mosquitto's ACL names the controllers that exist when it starts.
    with (
        running_service(mosquitto, service_identity, releases.store, rate_limit=64 * KIB) as service,
        connected(mosquitto, pki.device(NODE)) as device,
    ):
        device.subscribe(chunk_topic())
        started = time.monotonic()
        request(device, releases.blob.digest, 0, 4)  # 4 x 64 KiB: 1 s of burst, then 3 s of pacing
        chunks = receive_window(device, 0, 4)
        elapsed = time.monotonic() - started
        wait_until(lambda: service.stats().bytes_sent == 256 * KIB, 10, "every chunk acknowledged")
    assert sum(len(chunk.data) for chunk in chunks.values()) == 256 * KIB
    print(f"256 KiB at 64 KiB/s took {elapsed:.2f}s")
    assert 2.7 <= elapsed < 10


def test_unreachable_broker_is_a_transport_error(service_identity: TlsIdentity) -> None:
    mqtt = FleetMqtt("127.0.0.1", free_port(), service_identity, options=MqttOptions(connect_timeout=1))
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"cannot connect to MQTT broker 127\.0\.0\.1:\d+: .*refused"):
        mqtt.start()
    assert time.monotonic() - started < 3


def test_identity_from_another_ca_is_a_transport_error(embedded: Endpoint, pki: Pki) -> None:
    foreign = pki.foreign_device("gw-a")
    assert foreign.cert is not None and foreign.key is not None
    identity = TlsIdentity(pki.paths.ca_cert, foreign.cert, foreign.key)
    mqtt = FleetMqtt(embedded.host, embedded.port, identity, options=MqttOptions(connect_timeout=1))
    with pytest.raises(TransportError, match="cannot connect to MQTT broker"):
        mqtt.start()


def test_handler_exceptions_are_counted_and_do_not_stop_delivery(
    embedded: Endpoint, pki: Pki, service_identity: TlsIdentity
) -> None:
    mqtt = FleetMqtt(embedded.host, embedded.port, service_identity)
    mqtt.start()
    received: list[bytes] = []

    def handler(topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        received.append(payload)

    try:
        mqtt.subscribe(node_topic(NODE, Channel.EVENTS), handler)
        with connected(embedded, pki.device(NODE)) as device:
            # SUBSCRIBE is asynchronous: publish until the first message arrives.
            def pinged() -> bool:
                device.publish(node_topic(NODE, Channel.EVENTS), b"ping")
                return bool(received)

            wait_until(pinged, 10, "subscription active", interval=0.1)
            device.publish(node_topic(NODE, Channel.EVENTS), b"boom")
            device.publish(node_topic(NODE, Channel.EVENTS), b"fine")
            wait_until(lambda: received[-1:] == [b"fine"], 10, "the message after the failing one")
        assert mqtt.handler_errors == 1
    finally:
        mqtt.close()


# --- the CLI's error path ------------------------------------------------------------------------


def run_serve(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, list(args), env={"FLEET_CERTS": None, "FLEET_BROKER": None})
    return result.exit_code, result.output


def test_cli_refuses_a_bad_broker_value(tmp_path: Path, pki: Pki) -> None:
    code, output = run_serve("--store", str(tmp_path), "--certs", str(pki.paths.root), "--broker", "localhost")
    assert code == 2
    assert "--broker 'localhost': expected HOST:PORT" in output


def test_cli_names_missing_certificates(tmp_path: Path) -> None:  # before touching the network
    code, output = run_serve("--store", str(tmp_path), "--certs", str(tmp_path / "nope"), "--broker", "127.0.0.1:1")
    assert code == 2
    assert f"{tmp_path / 'nope' / 'ca.pem'}: no such file" in output


def test_cli_names_a_missing_controller_identity(tmp_path: Path, pki: Pki) -> None:
    code, output = run_serve(
        "--store", str(tmp_path), "--certs", str(pki.paths.root), "--broker", "127.0.0.1:1", "--identity", "ghost"
    )  # fmt: skip
    assert code == 2
    assert f"{pki.paths.controller('ghost').cert}: no such file" in output
