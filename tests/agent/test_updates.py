"""Release updates end to end: real agent, real broker, the real release service, signed releases."""

from __future__ import annotations

import hashlib
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.controller.mqtt import FleetMqtt
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import (
    ArtifactChunk,
    ArtifactRequest,
    DesiredState,
    Event,
    ProbeSpec,
    ReleaseRef,
    Reported,
)
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import ReleaseManifest, ReleaseStore, build_release
from tests.agent.test_https_source import RangeServer
from tests.agentproc import AgentProcess
from tests.apps import app_tree
from tests.conftest import Pki, free_port
from tests.control import signed_desired
from tests.faultproxy import FaultProxy
from tests.mqtt import Endpoint, MqttClient, Received, connected, wait_until

pytestmark = pytest.mark.timeout(150)
NODE = "gw-a"
CHUNK = 16 * 1024


@dataclass
class Releases:
    store: ReleaseStore
    port: int  # the apps serve their health endpoint here
    v1: ReleaseManifest
    v2: ReleaseManifest
    bad: ReleaseManifest


@pytest.fixture
def releases(pki: Pki, tmp_path: Path) -> Releases:
    key = load_private_key(pki.paths.release_key.read_bytes())
    port = free_port()
    health = ProbeSpec(
        kind="http",
        target=f"http://127.0.0.1:{port}/healthz",
        initial_delay=0.3,
        period=0.3,
        timeout=1,
        failure_threshold=2,
    )
    store = tmp_path / "store"

    def build(version: str, **kwargs: object) -> ReleaseManifest:
        tree = app_tree(tmp_path / "src" / version, version, **kwargs)  # type: ignore[arg-type]
        return build_release(
            tree,
            name="app",
            version=version,
            store=store,
            release_key=key,
            entry=["./run"],
            health=health,
            chunk_size=CHUNK,
        )

    return Releases(
        ReleaseStore(store), port, build("1.0.0"), build("2.0.0", edits=40), build("3.0.0", healthy=False, edits=80)
    )


@dataclass
class Service:
    server: ReleaseServer
    service: ReleaseService


@pytest.fixture
def release_service(embedded: Endpoint, pki: Pki, releases: Releases) -> Iterator[Service]:
    mqtt = FleetMqtt(embedded.host, embedded.port, pki.own_controller("updates-server"))
    mqtt.start()
    server = ReleaseServer(releases.store)
    service = ReleaseService(mqtt, server)
    service.start()
    try:
        yield Service(server, service)
    finally:
        service.stop()
        mqtt.close()


@pytest.fixture
def watcher(embedded: Endpoint, pki: Pki) -> Iterator[MqttClient]:
    with connected(embedded, pki.operator("alice")) as client:
        client.subscribe(f"fleet/v1/nodes/{NODE}/#")
        yield client


def make_agent(endpoint: Endpoint, pki: Pki, workdir: Path, releases: Releases, **extra: object) -> AgentProcess:
    agent = AgentProcess(NODE, endpoint, pki.device(NODE), workdir)
    agent.write_config(
        release_public_key=str(pki.paths.release_pub),
        workload={
            "command": [sys.executable, "-c", "import time; time.sleep(3600)"],
            "env": {"APP_PORT": str(releases.port), "MARKER": str(workdir / "versions")},
            "restart_backoff": {"initial": "200ms", "maximum": "1s", "jitter": 0},
        },
        update={"window": 4, "request_timeout": "3s", "health_grace": "3s"},  # app start on a busy CI box
        **extra,
    )
    return agent


def set_desired(endpoint: Endpoint, pki: Pki, generation: int, manifest: ReleaseManifest, *bases: str) -> None:
    desired = DesiredState(generation=generation, release=manifest.ref(delta_bases=bases))
    with connected(endpoint, pki.controller()) as controller:
        controller.publish(
            node_topic(NODE, Channel.DESIRED), encode(signed_desired(pki.paths, NODE, desired)), retain=True
        )


def set_desired_ref(endpoint: Endpoint, pki: Pki, generation: int, ref: ReleaseRef) -> None:
    with connected(endpoint, pki.controller()) as controller:
        desired = DesiredState(generation=generation, release=ref)
        controller.publish(
            node_topic(NODE, Channel.DESIRED), encode(signed_desired(pki.paths, NODE, desired)), retain=True
        )


@pytest.fixture
def cdn(pki: Pki, releases: Releases) -> Iterator[RangeServer]:
    """The release store served over HTTPS with Range support (a CDN in front of the store)."""
    with RangeServer(releases.store.root, pki.paths.server_cert, pki.paths.server_key) as server:
        yield server


def https_ref(cdn: RangeServer, releases: Releases, manifest: ReleaseManifest) -> ReleaseRef:
    return manifest.ref(base_url=cdn.base_url + "/", artifact_file=releases.store.artifact_path(manifest))


def wait_reported(watcher: MqttClient, state: str, version: str | None = None, timeout: float = 60) -> Reported:
    def matches(message: Received) -> bool:
        if message.topic != node_topic(NODE, Channel.REPORTED):
            return False
        reported = decode(message.topic, message.payload, Reported)
        return reported.state.value == state and (version is None or reported.version == version)

    message = watcher.expect(matches, timeout)
    return decode(message.topic, message.payload, Reported)


def events(watcher: MqttClient, kind: str) -> list[Event]:
    found = []
    for message in watcher.drain():
        if message.topic == node_topic(NODE, Channel.EVENTS):
            event = decode(message.topic, message.payload, Event)
            if event.kind == kind:
                found.append(event)
    return found


def serving(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode()


def test_full_update_then_delta_update(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, release_service: Service, watcher: MqttClient
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start()
        set_desired(embedded, pki, 1, releases.v1)
        wait_reported(watcher, "healthy", "1.0.0")
        assert serving(releases.port) == "1.0.0"
        full_bytes = release_service.service.stats().bytes_sent
        # Made ahead, as a rollout's start does: the release service never computes a delta for a request.
        releases.store.prepare(releases.v2, [releases.v1.digest])
        assert releases.store.wait_prepared(60)
        set_desired(embedded, pki, 2, releases.v2, releases.v1.digest)
        reported = wait_reported(watcher, "healthy", "2.0.0")
        assert reported.previous_version == "1.0.0"
        assert serving(releases.port) == "2.0.0"
        delta_bytes = release_service.service.stats().bytes_sent - full_bytes
        assert delta_bytes < full_bytes / 3, f"delta update sent {delta_bytes} bytes, full {full_bytes}"
        current = (agent.state_dir / "current").resolve()
        assert current == (agent.state_dir / "releases" / "2.0.0").resolve()
        pid = agent.pid
        assert agent.process is not None and agent.process.poll() is None and agent.pid == pid
    finally:
        agent.stop()


def test_unhealthy_release_is_rolled_back_by_the_agent(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, release_service: Service, watcher: MqttClient
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start()
        set_desired(embedded, pki, 1, releases.v1)
        wait_reported(watcher, "healthy", "1.0.0")
        set_desired(embedded, pki, 2, releases.bad, releases.v1.digest)
        started = time.monotonic()
        reported = wait_reported(watcher, "rolled_back", "1.0.0")
        assert time.monotonic() - started < 30
        assert "3.0.0" in (reported.detail or "")
        wait_until(lambda: serving_or_none(releases.port) == "1.0.0", 20, "old release serving again")
        assert (agent.state_dir / "current").resolve().name == "1.0.0"
    finally:
        agent.stop()


def serving_or_none(port: int) -> str | None:
    try:
        return serving(port)
    except OSError:
        return None


def test_forged_manifest_is_refused_and_nothing_installed(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, release_service: Service, watcher: MqttClient
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    forged = releases.v1.ref()
    assert forged.manifest is not None
    tampered = forged.model_copy(update={"manifest": {**forged.manifest, "entry": ["/bin/sh", "-c", "evil"]}})
    try:
        agent.start()
        with connected(embedded, pki.controller()) as controller:
            desired = DesiredState(generation=1, release=tampered)
            controller.publish(
                node_topic(NODE, Channel.DESIRED), encode(signed_desired(pki.paths, NODE, desired)), retain=True
            )
        reported = wait_reported(watcher, "failed")
        assert "refused" in (reported.detail or "")
        assert events(watcher, "release_refused")
        assert not (agent.state_dir / "releases").exists()
        assert release_service.service.stats().chunks_sent == 0
    finally:
        agent.stop()


def test_corrupted_chunk_is_refused_and_fetched_again(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, release_service: Service, watcher: MqttClient
) -> None:
    original = release_service.server.chunks_for
    corrupted: list[int] = []

    def flip_one_byte(request: ArtifactRequest) -> list[ArtifactChunk]:
        chunks = original(request)
        if not corrupted and len(chunks) > 1:
            bad = chunks[1]
            corrupted.append(bad.index)
            chunks[1] = bad.model_copy(update={"data": bytes([bad.data[0] ^ 0xFF]) + bad.data[1:]})
        return chunks

    release_service.server.chunks_for = flip_one_byte  # type: ignore[method-assign]
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start()
        set_desired(embedded, pki, 1, releases.v1)
        wait_reported(watcher, "healthy", "1.0.0")
        refused = events(watcher, "chunk_refused")
        assert [event.data["index"] for event in refused] == corrupted
    finally:
        agent.stop()


def test_download_survives_a_link_cut_every_few_chunks(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, release_service: Service, watcher: MqttClient
) -> None:
    with FaultProxy("127.0.0.1", embedded.port) as proxy:
        agent = make_agent(Endpoint("amqtt", "127.0.0.1", proxy.port), pki, tmp_path / "agent", releases)
        try:
            agent.start()
            proxy.cut_after(3 * CHUNK, repeat=True)
            set_desired(embedded, pki, 1, releases.v1)
            wait_reported(watcher, "healthy", "1.0.0", timeout=120)
            cuts = proxy.stats.cuts
        finally:
            agent.stop()
    total = -(-releases.store.artifact_path(releases.v1).stat().st_size // CHUNK)
    sent = release_service.service.stats().chunks_sent
    assert cuts >= 2
    # Each cut can lose at most the window in flight; everything else is fetched once.
    assert sent <= total + cuts * 4 + 4, f"{sent} chunks sent for {total} with {cuts} cuts"


@pytest.mark.parametrize(
    "failpoint",
    ["update.chunk_stored", "update.downloaded", "update.unpacked", "update.link_switched", "update.health_window"],
)
def test_kill9_at_every_step_ends_on_one_consistent_release(
    embedded: Endpoint,
    pki: Pki,
    tmp_path: Path,
    releases: Releases,
    release_service: Service,
    watcher: MqttClient,
    failpoint: str,
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start()
        set_desired(embedded, pki, 1, releases.v1)
        wait_reported(watcher, "healthy", "1.0.0")
        agent.stop()
        chunks_before = release_service.service.stats().chunks_sent
        agent.start(failpoints=failpoint)
        set_desired(embedded, pki, 2, releases.v2)  # full artifact: more chunks to resume
        assert agent.wait_exit(60) == -9
        agent.start()
        reported = wait_reported(watcher, "healthy", "2.0.0")
        assert reported.previous_version == "1.0.0"
        assert serving(releases.port) == "2.0.0"
        assert (agent.state_dir / "current").resolve().name == "2.0.0"
        assert sorted(p.name for p in (agent.state_dir / "releases").iterdir()) == ["1.0.0", "2.0.0"]
        total = -(-releases.store.artifact_path(releases.v2).stat().st_size // CHUNK)
        sent = release_service.service.stats().chunks_sent - chunks_before
        assert sent <= total + 4, f"resumed, not restarted: {sent} chunks for {total}"
    finally:
        agent.stop()


# ---- the HTTPS source (no release service running: MQTT transfer cannot be what happened) -------


def test_update_over_https_range_requests_without_the_release_service(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, cdn: RangeServer, watcher: MqttClient
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    ref = https_ref(cdn, releases, releases.v1)
    artifact = releases.store.artifact_path(releases.v1).read_bytes()
    assert ref.url == f"{cdn.base_url}/app/1.0.0/payload.tar.zst"
    assert (ref.artifact_size, ref.artifact_digest) == (len(artifact), "sha256:" + hashlib.sha256(artifact).hexdigest())
    try:
        agent.start()
        set_desired_ref(embedded, pki, 1, ref)
        wait_reported(watcher, "healthy", "1.0.0")
        assert serving(releases.port) == "1.0.0"
        total = -(-releases.store.artifact_path(releases.v1).stat().st_size // CHUNK)
        assert [start for _path, start, _end in cdn.control.ranges] == [i * CHUNK for i in range(total)]
        assert not events(watcher, "https_fallback")
    finally:
        agent.stop()


def test_kill9_mid_https_download_resumes_over_https(
    embedded: Endpoint, pki: Pki, tmp_path: Path, releases: Releases, cdn: RangeServer, watcher: MqttClient
) -> None:
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start(failpoints="update.chunk_stored")
        set_desired_ref(embedded, pki, 1, https_ref(cdn, releases, releases.v1))
        assert agent.wait_exit(60) == -9
        before = len(cdn.control.ranges)
        assert before >= 1
        agent.start()
        wait_reported(watcher, "healthy", "1.0.0")
        assert serving(releases.port) == "1.0.0"
        resumed = [start for _path, start, _end in cdn.control.ranges[before:]]
        # Chunk 0 was fsynced and recorded before the kill: the restart asks from chunk 1 on.
        total = -(-releases.store.artifact_path(releases.v1).stat().st_size // CHUNK)
        assert resumed == [i * CHUNK for i in range(1, total)]
    finally:
        agent.stop()
