"""A desired release must be the workload the agent runs (issue 11): another release name is refused
unless the desired config says ``allow_release_change: true``; release payloads are 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import DesiredState, Event, Reported
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import ReleaseManifest, build_release
from tests.agent.test_updates import (  # noqa: F401 - fixtures
    CHUNK,
    NODE,
    Releases,
    Service,
    make_agent,
    release_service,
    releases,
    serving,
    wait_reported,
    watcher,
)
from tests.apps import app_tree
from tests.conftest import Pki
from tests.control import signed_desired
from tests.mqtt import Endpoint, MqttClient, Received, connected

pytestmark = pytest.mark.timeout(150)


def set_desired(endpoint: Endpoint, pki: Pki, generation: int, manifest: ReleaseManifest, **config: object) -> None:
    desired = signed_desired(
        pki.paths, NODE, DesiredState(generation=generation, release=manifest.ref(), config=config)
    )
    with connected(endpoint, pki.controller()) as controller:
        controller.publish(node_topic(NODE, Channel.DESIRED), encode(desired), retain=True)


def wait_event(client: MqttClient, kind: str, timeout: float = 30) -> Event:
    def matches(message: Received) -> bool:
        if message.topic != node_topic(NODE, Channel.EVENTS):
            return False
        return decode(message.topic, message.payload, Event).kind == kind

    message = client.expect(matches, timeout)
    return decode(message.topic, message.payload, Event)


def test_a_release_of_another_name_is_refused_unless_the_desired_state_allows_it(
    embedded: Endpoint,
    pki: Pki,
    tmp_path: Path,
    releases: Releases,  # noqa: F811
    release_service: Service,  # noqa: F811
    watcher: MqttClient,  # noqa: F811
) -> None:
    other = build_release(
        app_tree(tmp_path / "src-other", "9.0.0"),
        name="other",
        version="9.0.0",
        store=releases.store.root,
        release_key=load_private_key(pki.paths.release_key.read_bytes()),
        entry=["./run"],
        health=releases.v1.health,
        chunk_size=CHUNK,
    )
    agent = make_agent(embedded, pki, tmp_path / "agent", releases)
    try:
        agent.start()
        set_desired(embedded, pki, 1, releases.v1)
        wait_reported(watcher, "healthy", "1.0.0")
        payload = agent.state_dir / "releases" / "1.0.0" / ".fleet" / "payload.tar"
        assert stat.S_IMODE(payload.stat().st_mode) == 0o600
        set_desired(embedded, pki, 2, other)
        event = wait_event(watcher, "desired_rejected")
        assert "other" in (event.detail or "") and "app" in (event.detail or "")
        assert (agent.state_dir / "current").resolve().name == "1.0.0"
        assert not any(
            m.topic == node_topic(NODE, Channel.REPORTED) and decode(m.topic, m.payload, Reported).generation == 2
            for m in watcher.drain()
        )
        # The controller says so: the node switches to the other workload.
        set_desired(embedded, pki, 3, other, allow_release_change=True)
        reported = wait_reported(watcher, "healthy", "9.0.0")
        assert reported.generation == 3
        assert serving(releases.port) == "9.0.0"
    finally:
        agent.stop()
