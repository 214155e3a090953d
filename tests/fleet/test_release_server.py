"""The release server: pure request -> chunks logic, then the service over real brokers as a device sees it."""

from __future__ import annotations

import hashlib
import random
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fleet.cli.serve_cmd import serve
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.release_service import RateLimiter, ReleaseServer, ReleaseService
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


# --- pure: ReleaseServer ------------------------------------------------------------------------


def test_full_artifact_chunks_reassemble_to_the_artifact_file(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    chunks = server.chunks_for(req(releases.new.digest))
    assert len(chunks) > 3
    assert all(chunk.base is None and chunk.digest == releases.new.digest for chunk in chunks)
    assert reassemble(chunks) == releases.store.artifact_path(releases.new).read_bytes()


def test_delta_is_served_when_the_base_is_a_known_release(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    chunks = server.chunks_for(req(releases.new.digest, delta_base=releases.old.digest))
    assert {chunk.base for chunk in chunks} == {releases.old.digest}
    delta = reassemble(chunks)
    path = releases.store.delta(releases.old, releases.new)
    assert path is not None and delta == path.read_bytes()
    assert len(delta) < releases.store.artifact_path(releases.new).stat().st_size / 5
    payload = apply_delta(releases.store.payload(releases.old), delta, releases.new.digest)
    assert payload == releases.store.payload(releases.new)


def test_unknown_delta_base_falls_back_to_the_full_artifact(releases: Releases) -> None:
    chunks = ReleaseServer(releases.store).chunks_for(req(releases.new.digest, delta_base="ab" * 32))
    assert chunks[0].base is None
    assert reassemble(chunks) == releases.store.artifact_path(releases.new).read_bytes()


def test_unknown_release_is_one_error_chunk(releases: Releases) -> None:
    chunks = ReleaseServer(releases.store).chunks_for(req("sha256:" + "cd" * 32, first=3))
    assert len(chunks) == 1
    assert chunks[0].error == f"unknown release sha256:{'cd' * 32}"
    assert (chunks[0].index, chunks[0].data, chunks[0].eof) == (3, b"", False)


def test_first_past_the_end_is_an_error(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    total = len(server.chunks_for(req(releases.old.digest)))
    (chunk,) = server.chunks_for(req(releases.old.digest, first=total))
    assert chunk.error is not None and "past the end" in chunk.error
    assert (chunk.index, chunk.total, chunk.data) == (total, total, b"")


def test_window_is_clipped_to_the_artifact_and_eof_marks_the_last_chunk(releases: Releases) -> None:
    server = ReleaseServer(releases.store)
    total = len(server.chunks_for(req(releases.old.digest)))
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
        wait_until(lambda: service.stats().errors == 3, 10, "three bad requests counted")
        request(device, releases.old.digest, 0, 1)
        chunk = next_chunk(device)
        assert (chunk.index, chunk.error) == (0, None)
        assert device.drain(settle=0.3) and all(m.topic == chunk_topic() for m in device.seen)
        assert len(device.seen) == 1  # nothing answered the garbage
        assert service.mqtt.handler_errors == 0


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
    mosquitto: Endpoint, pki: Pki, service_identity: TlsIdentity, releases: Releases
) -> None:
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
