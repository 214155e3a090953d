"""``fleet sim`` against a real Mosquitto: devices connect over mTLS and speak the protocol."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from fleet.controller.release_service import Artifact
from fleet.protocol import (
    Ack,
    ArtifactRequest,
    Channel,
    Command,
    DesiredState,
    ReleaseRef,
    Reported,
    Status,
    all_nodes_filter,
    decode,
    encode,
    node_topic,
    parse_node_topic,
)
from fleet.tools.sim import SimSettings, Simulator
from tests.conftest import Pki
from tests.mqtt import Endpoint, MqttClient, Received, connected, wait_until

pytestmark = [pytest.mark.timeout(120), pytest.mark.mosquitto]


class SimThread:
    """A simulator running on its own event loop in a thread, stopped on exit."""

    def __init__(self, settings: SimSettings) -> None:
        self.simulator = Simulator(settings)
        self.report: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="sim", daemon=True)

    def _main(self) -> None:
        try:
            self.report = asyncio.run(self.simulator.run())
        except BaseException as exc:
            self.error = exc

    def stop(self) -> dict[str, Any]:
        wait_until(lambda: self.simulator._loop is not None or not self.thread.is_alive(), 30, "simulator started")
        self.simulator.request_stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "simulator did not stop"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


@contextmanager
def simulating(settings: SimSettings) -> Iterator[SimThread]:
    sim = SimThread(settings)
    sim.thread.start()
    try:
        yield sim
    finally:
        if sim.thread.is_alive():
            sim.simulator.request_stop()
            sim.thread.join(30)


def settings_for(pki: Pki, endpoint: Endpoint, prefix: str, agents: int, **options: Any) -> SimSettings:
    return SimSettings(
        agents=agents, host=endpoint.host, port=endpoint.port, certs=pki.paths.root, prefix=prefix, **options
    )


def channel_of(message: Received) -> tuple[str, Channel]:
    return parse_node_topic(message.topic)


def serve_download(controller: MqttClient, node: str, artifact: Artifact, target: str) -> None:
    """Answer the device's artifact requests as the controller would, until it has the last chunk."""
    while True:
        message = controller.expect(lambda m: m.topic == node_topic(node, Channel.ARTIFACT_REQ), timeout=20)
        request = decode(message.topic, message.payload, ArtifactRequest)
        last = min(request.first + request.window, artifact.total)
        for index in range(request.first, last):
            controller.publish(node_topic(node, Channel.ARTIFACT_CHUNK), encode(artifact.chunk(index, target)), qos=0)
        if last == artifact.total:
            return


def test_simulated_fleet_speaks_the_protocol(pki: Pki, mosquitto: Endpoint) -> None:
    settings = settings_for(pki, mosquitto, "simt-", 50, offline_fraction=0.2, heartbeat=1.0, duration=90, seed=7)
    with (
        connected(mosquitto, pki.operator("alice")) as alice,
        connected(mosquitto, pki.controller()) as controller,
    ):
        alice.subscribe("fleet/v1/nodes/+/status")
        alice.subscribe(all_nodes_filter(Channel.REPORTED))
        alice.subscribe(all_nodes_filter(Channel.ACK))
        controller.subscribe(all_nodes_filter(Channel.ARTIFACT_REQ))
        with simulating(settings) as sim:
            online: set[str] = set()

            def forty_online() -> bool:
                for message in alice.drain():
                    node, channel = channel_of(message)
                    if channel is Channel.STATUS and decode(message.topic, message.payload, Status).state == "online":
                        online.add(node)
                alice.seen.clear()
                return len(online) >= 40

            wait_until(forty_online, 40, "40 simulated devices online")
            devices = sim.simulator.devices
            expected_online = {d.node_id for d in devices if not d.offline}
            assert len(expected_online) == 40
            assert online == expected_online

            node = sorted(expected_online)[0]
            desired_topic = node_topic(node, Channel.DESIRED)

            # A config-only desired state is applied: its generation comes back in Reported.
            controller.publish(desired_topic, encode(DesiredState(generation=5, config={"a": 1})), retain=True)
            alice.expect(
                lambda m: (
                    m.topic == node_topic(node, Channel.REPORTED)
                    and decode(m.topic, m.payload, Reported).generation == 5
                )
            )

            # A release: downloaded chunk by chunk over MQTT, verified, then reported healthy.
            payload = os.urandom(20_000)
            target = "sha256:" + hashlib.sha256(payload).hexdigest()
            artifact = Artifact.of(payload, 1024, None)
            release = ReleaseRef(name="app", version="2.0.0", digest=target, size=len(payload), chunk_size=1024)
            controller.publish(desired_topic, encode(DesiredState(generation=6, release=release)), retain=True)
            # Like the agent, the device reports the new generation at once (downloading), then healthy.
            serve_download(controller, node, artifact, target)
            reported = decode(
                node_topic(node, Channel.REPORTED),
                alice.expect(
                    lambda m: (
                        m.topic == node_topic(node, Channel.REPORTED)
                        and decode(m.topic, m.payload, Reported).generation == 6
                        and decode(m.topic, m.payload, Reported).state != "downloading"
                    )
                ).payload,
                Reported,
            )
            assert (reported.version, reported.previous_version, reported.state) == ("2.0.0", "0.0.0", "healthy")

            # A lower generation is ignored (replay protection).
            controller.publish(desired_topic, encode(DesiredState(generation=2, config={"b": 2})), retain=True)

            # A command: accepted, then done; the same id again is a duplicate.
            command = encode(Command(id="sim-c1", action="rollback"))
            alice.publish(node_topic(node, Channel.CMD), command)
            statuses = []
            for _ in range(2):
                ack = alice.expect(lambda m: m.topic == node_topic(node, Channel.ACK))
                statuses.append(decode(ack.topic, ack.payload, Ack).status)
            assert statuses == ["accepted", "done"]
            # The rollback's Reported comes between the two acks.
            (rolled_back,) = [
                decode(m.topic, m.payload, Reported)
                for m in alice.seen
                if m.topic == node_topic(node, Channel.REPORTED)
                and decode(m.topic, m.payload, Reported).state == "rolled_back"
            ]
            assert (rolled_back.version, rolled_back.generation) == ("0.0.0", 6)
            alice.publish(node_topic(node, Channel.CMD), command)
            ack = alice.expect(lambda m: m.topic == node_topic(node, Channel.ACK))
            assert decode(ack.topic, ack.payload, Ack).status == "duplicate"

            wait_until(lambda: sim.simulator.stats.heartbeats_sent >= 80, 20, "two heartbeats per online device")
            report = sim.stop()

    assert report["devices"] == 50
    assert report["offline_by_design"] == 10
    assert report["ever_connected"] == 40
    assert report["connected_at_end"] == 40
    assert report["downloads_completed"] == 1
    assert report["bytes_downloaded"] == len(payload)
    assert report["desired_applied"] == 2
    assert report["commands_acked"] == 1
    assert report["heartbeats_sent"] >= 40
    assert report["errors"] == 0, report["error_samples"]
    assert report["connect_time_s"]["p95"] is not None
    print("sim report:", report)  # the connect rate is measured, not asserted


def test_failures_and_link_drops(pki: Pki, mosquitto: Endpoint) -> None:
    """Devices in --fail-fraction report failure on --fail-version; dropped links come back."""
    settings = settings_for(
        pki,
        mosquitto,
        "simf-",
        10,
        heartbeat=1.0,
        duration=90,
        fail_version="3.0.0",
        fail_fraction=1.0,
        disconnect_rate=30.0,
        seed=3,
    )
    payload = os.urandom(3000)
    target = "sha256:" + hashlib.sha256(payload).hexdigest()
    artifact = Artifact.of(payload, 1024, None)
    release = ReleaseRef(name="app", version="3.0.0", digest=target, size=len(payload), chunk_size=1024)
    node = settings.node_id(0)
    with (
        connected(mosquitto, pki.operator("alice")) as alice,
        connected(mosquitto, pki.controller()) as controller,
    ):
        alice.subscribe(all_nodes_filter(Channel.REPORTED))
        controller.subscribe(all_nodes_filter(Channel.ARTIFACT_REQ))
        with simulating(settings) as sim:
            wait_until(lambda: sum(d.connected for d in sim.simulator.devices) == 10, 30, "10 devices connected")
            controller.publish(
                node_topic(node, Channel.DESIRED), encode(DesiredState(generation=1, release=release)), retain=True
            )
            serve_download(controller, node, artifact, target)
            failed = alice.expect(
                lambda m: (
                    m.topic == node_topic(node, Channel.REPORTED)
                    and decode(m.topic, m.payload, Reported).generation == 1
                    and decode(m.topic, m.payload, Reported).state != "downloading"
                ),
                timeout=20,
            )
            assert decode(failed.topic, failed.payload, Reported).state == "failed"
            wait_until(lambda: sim.simulator.stats.connection_losses >= 3, 30, "injected link drops")
            report = sim.stop()
    assert report["disconnects_injected"] >= 3
    assert report["connect_attempts"] > 10
    assert report["downloads_completed"] == 1


def test_a_failing_loop_ends_the_simulation_with_its_error(
    pki: Pki, mosquitto: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator's loops run in a TaskGroup: a bug in one surfaces at once, nothing swallowed."""

    async def broken_ticker(self: Simulator) -> None:
        await asyncio.sleep(0.5)
        raise RuntimeError("ticker bug")

    monkeypatch.setattr(Simulator, "_ticker", broken_ticker)
    simulator = Simulator(settings_for(pki, mosquitto, "simx-", 2, duration=60))
    started = time.monotonic()
    with pytest.raises(ExceptionGroup) as caught:
        asyncio.run(simulator.run())
    assert caught.group_contains(RuntimeError, match="ticker bug")
    assert time.monotonic() - started < 20
    assert all(device.client is None or not device.client.socket_open for device in simulator.devices)
