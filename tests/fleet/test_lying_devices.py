"""Lying devices are contained: a real controller process, a real broker, devices speaking the protocol.

The devices are raw MQTT clients with device certificates from the test PKI: they publish valid
protocol messages (status, heartbeats, health, reported state, acks), and one of them lies. It
reports the largest generation the wire format allows (2^63-1) and ``failed``. The controller must
keep that device's lie to that device: a rollout that includes it still aborts cleanly, every other
node gets its baseline desired state and a rollback command, and the rollout ends ``aborted``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from certs import issue_device
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import (
    Ack,
    AckStatus,
    Command,
    DesiredState,
    Health,
    Heartbeat,
    Reported,
    Status,
    UpdateState,
)
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic
from fleet.releases import build_release
from tests.apps import app_tree
from tests.conftest import Pki
from tests.controllerproc import ControllerProcess
from tests.mqtt import Endpoint, MqttClient, Received, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HONEST = ("gw-h1", "gw-h2", "gw-h3")
LIAR = "gw-liar"
LABELS = {"fleet": "liars"}
HUGE = 2**63 - 1


@dataclass
class Device:
    """One device over mutual TLS with its own certificate: heartbeats, health, and a reported state
    that follows each desired state it receives (as ``installing``: it never finishes by itself)."""

    node: str
    client: MqttClient
    labels: dict[str, str]
    desired: list[DesiredState] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    generation: int = 0
    version: str | None = None
    lie: bool = False  # answer every desired state with generation 2^63-1 and failed
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Device:
        self.client.connect()
        for channel in (Channel.DESIRED, Channel.CMD):
            assert self.client.subscribe(node_topic(self.node, channel)) == [1]
        self.send(Channel.STATUS, Status(state="online", ts=time.time(), agent_version="raw-1"), retain=True)
        self.report(UpdateState.IDLE)
        for target in (self._beat, self._receive):
            thread = threading.Thread(target=target, name=f"{self.node}-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def send(self, channel: Channel, message: Any, *, retain: bool = False) -> None:
        self.client.publish(node_topic(self.node, channel), encode(message), qos=1, retain=retain)

    def report(self, state: UpdateState, generation: int | None = None) -> None:
        reported = Reported(
            generation=self.generation if generation is None else generation,
            version=self.version,
            state=state,
            labels=self.labels,
            ts=time.time(),
        )
        self.send(Channel.REPORTED, reported, retain=True)

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(0.5):
            seq += 1
            beat = Heartbeat(seq=seq, uptime=seq / 2, cpu=1.0, mem_free=1 << 20, disk_free=1 << 30)
            self.send(Channel.HEARTBEAT, beat)
            self.send(Channel.HEALTH, Health(version=self.version, healthy=True, ts=time.time()))

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                message: Received = self.client.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message.topic.endswith("/" + Channel.DESIRED.value):
                self._on_desired(decode(message.topic, message.payload, DesiredState))
            elif message.topic.endswith("/" + Channel.CMD.value):
                command = decode(message.topic, message.payload, Command)
                self.commands.append(command)
                self.send(Channel.ACK, Ack(id=command.id, status=AckStatus.ACCEPTED, ts=time.time()))

    def _on_desired(self, document: DesiredState) -> None:
        self.desired.append(document)
        if self.lie:
            self.report(UpdateState.FAILED, generation=HUGE)
            return
        self.generation = document.generation
        self.report(UpdateState.INSTALLING)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.client.close()


@dataclass
class Fleet:
    controller: ControllerProcess
    devices: dict[str, Device]

    def rollout(self, release: str, **options: Any) -> str:
        body = {"release": release, "selector": LABELS, "waves": ["100%"], "soak": 300, "wave_timeout": 600,
                "health_timeout": 60, "max_failures": "1"} | options  # fmt: skip
        return str(self.controller.post("/rollouts", body)["id"])

    def wait_rollout(self, rollout_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        view: dict[str, Any] = {}

        def done() -> bool:
            view.update(self.controller.get(f"/rollouts/{rollout_id}"))
            return view["state"] in states

        try:
            wait_until(done, timeout, f"rollout {rollout_id} in {states}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last view {view}") from None
        return view


@pytest.fixture
def fleet(embedded: Endpoint, pki: Pki, tmp_path: Path) -> Iterator[Fleet]:
    key = load_private_key(pki.paths.release_key.read_bytes())
    store = tmp_path / "store"
    tree = app_tree(tmp_path / "src", "1.0.0")
    build_release(tree, name="app", version="1.0.0", store=store, release_key=key, entry=["./run"], health=None,
                  chunk_size=64 * 1024)  # fmt: skip
    controller = ControllerProcess(pki, embedded, tmp_path, store, identity="ctl-liars")
    devices: dict[str, Device] = {}
    try:
        controller.start()
        for node in (*HONEST, LIAR):
            if not pki.paths.device(node).cert.exists():
                issue_device(pki.paths, node)
            client = MqttClient(embedded, pki.device(node), client_id=node)
            devices[node] = Device(node, client, dict(LABELS), lie=node == LIAR).start()
        wait_until(
            lambda: {n["id"] for n in controller.get("/nodes") if n["status"] == "online"} >= set(devices),
            30,
            "controller sees every device online",
        )
        yield Fleet(controller, devices)
    finally:
        for device in devices.values():
            device.stop()
        controller.stop()


def test_a_device_reporting_generation_2_63_cannot_stop_the_abort_of_the_others(fleet: Fleet) -> None:
    rollout = fleet.rollout("app@1.0.0")
    liar = fleet.devices[LIAR]
    wait_until(lambda: all(device.desired for device in fleet.devices.values()), 30, "every device got the target")
    targets = {node: device.desired[-1] for node, device in fleet.devices.items()}
    assert all(doc.release is not None and doc.release.version == "1.0.0" for doc in targets.values())
    # The liar has answered with generation 2^63-1 and failed; give the controller time to take it in
    # before an honest device fails too (whichever failure the controller counts first, it aborts).
    time.sleep(2.0)
    failing = fleet.devices[HONEST[0]]
    failing.report(UpdateState.FAILED)

    view = fleet.wait_rollout(rollout, {"aborted"})
    assert "fail" in (view["detail"] or "")

    for node in HONEST:
        device = fleet.devices[node]
        wait_until(
            lambda device=device: any(  # type: ignore[misc]
                doc.release is None and doc.generation > targets[device.node].generation for doc in device.desired
            ),
            30,
            f"{node} received its baseline desired state",
        )
        wait_until(
            lambda device=device: any(c.action == "rollback" for c in device.commands),  # type: ignore[misc]
            30,
            f"{node} received a rollback command",
        )
        actions = [c["action"] for c in fleet.controller.get(f"/nodes/{node}")["commands"]]
        assert "rollback" in actions
    # The lie is not taken over: the controller neither shows nor builds on the liar's generation.
    assert fleet.controller.get(f"/nodes/{LIAR}")["node"]["generation"] != HUGE
    assert liar.desired[-1].generation < 2**53
