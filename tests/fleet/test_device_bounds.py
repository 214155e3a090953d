"""A lying device, in process: the real registry, desired-state publisher, command tracker and rollout
engine wired as the controller wires them, fed the messages a device would send. The same story as
tests/fleet/test_lying_devices.py (real processes), on an injected clock; plus the ack bounds."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import certs
from fleet.controller.bounds import Rejects, reject_metrics
from fleet.controller.commands import MAX_ACKS, CommandTracker
from fleet.controller.desired import DesiredPublisher
from fleet.controller.facade import NodeOutcome, RolloutRequest, RolloutState
from fleet.controller.registry import Registry
from fleet.controller.rollouts import RolloutEngine
from fleet.controller.storage import Database
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import (
    Ack,
    AckStatus,
    Command,
    DesiredState,
    Heartbeat,
    Message,
    ReleaseRef,
    Reported,
    UpdateState,
)
from fleet.protocol.signing import load_private_key
from fleet.protocol.topics import Channel, node_topic, parse_node_topic
from fleet.releases import ReleaseStore, build_release
from tests.fakeclock import Clock

pytestmark = pytest.mark.timeout(60)

NODES = ("gw-a", "gw-b", "gw-c", "gw-liar")


class Desired:
    """The rollout engine's view of desired state, as the controller service adapts it."""

    def __init__(self, publisher: DesiredPublisher) -> None:
        self.publisher = publisher

    def publish_release(self, node: str, release: ReleaseRef | None) -> int:
        return self.publisher.publish_release(node, release)

    def current_release(self, node: str) -> ReleaseRef | None:
        current = self.publisher.current(node)
        return None if current is None else current.release


@dataclass
class World:
    clock: Clock
    db: Database
    registry: Registry
    desired: DesiredPublisher
    commands: CommandTracker
    engine: RolloutEngine
    documents: dict[str, list[DesiredState]]
    sent: dict[str, list[Command]]

    def receive(self, node: str, message: Message, channel: Channel) -> None:
        """What the controller service does with a node's message (``Controller._ingest``)."""
        topic = node_topic(node, channel)
        self.registry.on_message(topic, encode(message))
        if isinstance(message, Reported):
            self.desired.observe_reported(parse_node_topic(topic)[0], message.generation)

    def report(self, node: str, generation: int, state: UpdateState, version: str | None = None) -> None:
        labels = {"fleet": "t"}
        reported = Reported(generation=generation, version=version, state=state, labels=labels, ts=self.clock.now)
        self.receive(node, reported, Channel.REPORTED)

    def tick(self, seconds: float = 0.5) -> None:
        self.clock.advance(seconds)
        for node in NODES:
            self.receive(node, Heartbeat(seq=1, uptime=1, cpu=1, mem_free=1, disk_free=1), Channel.HEARTBEAT)
        self.engine.tick()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    key = load_private_key(certs.init_pki(tmp_path / "pki").release_key.read_bytes())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "app").write_text("#!/bin/sh\n")
    build_release(tmp_path / "src", name="app", version="2.0.0", store=tmp_path / "store", release_key=key,
                  entry=["app"], health=None, chunk_size=4096)  # fmt: skip
    clock = Clock()
    db = Database(tmp_path / "fleet.db")
    documents: dict[str, list[DesiredState]] = {node: [] for node in NODES}
    sent: dict[str, list[Command]] = {node: [] for node in NODES}

    def publish_retained(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        documents[parse_node_topic(topic)[0]].append(decode(topic, payload, DesiredState))

    def publish(topic: str, payload: bytes, qos: int) -> None:
        sent[parse_node_topic(topic)[0]].append(decode(topic, payload, Command))

    registry = Registry(db, clock=clock)
    desired = DesiredPublisher(db, publish_retained, clock=clock)
    commands = CommandTracker(db, publish, clock=clock)
    engine = RolloutEngine(db, registry, Desired(desired), commands, ReleaseStore(tmp_path / "store"), clock=clock)
    yield World(clock, db, registry, desired, commands, engine, documents, sent)
    db.close()


def test_a_liar_reporting_generation_2_63_and_failed_cannot_stop_the_abort(world: World) -> None:
    for node in NODES:
        world.report(node, 0, UpdateState.IDLE)
    rollout = world.engine.start(RolloutRequest(release="app@2.0.0", selector={"fleet": "t"}, waves=["100%"],
                                                soak=300, max_failures="1"))  # fmt: skip
    assert all(world.documents[node][-1].release is not None for node in NODES)
    target = {node: world.documents[node][-1].generation for node in NODES}
    world.report("gw-liar", 2**63 - 1, UpdateState.FAILED, version="6.6.6")
    world.tick()
    assert world.engine.get(rollout.id).state == RolloutState.RUNNING  # the lie changed nothing
    world.report("gw-a", target["gw-a"], UpdateState.FAILED)  # an honest failure aborts
    world.tick()
    view = world.engine.get(rollout.id)
    assert view.state == RolloutState.ABORTED
    for node in NODES:  # the liar included: its lie was never taken over, so it is restored too
        baseline = world.documents[node][-1]
        assert baseline.release is None and baseline.generation == target[node] + 1
        assert [command.action for command in world.sent[node]] == ["rollback"]
    assert world.registry.node_view("gw-liar").generation == 0
    assert world.registry.rejects.counts() == {"reported.generation": 1}
    # The publisher refused to build on it too (a generation below 2^53 can pass the registry and
    # still lead ours by too much: then only this one counts).
    assert world.desired.rejects.counts() == {"desired.observed_generation": 1}
    metrics = reject_metrics(world.registry.rejects, world.desired.rejects, world.commands.rejects)
    assert metrics == {
        'fleet_device_values_rejected_total{field="desired.observed_generation"}': 1.0,
        'fleet_device_values_rejected_total{field="reported.generation"}': 1.0,
    }
    assert view.nodes["gw-a"] == NodeOutcome.FAILED


# ---- acks ----------------------------------------------------------------------------------------


def test_a_device_cannot_grow_the_ack_trail_of_its_command(world: World) -> None:
    command = world.commands.send("gw-a", "ping")
    for index in range(MAX_ACKS + 10):
        ack = Ack(id=command.id, status=AckStatus.ACCEPTED, detail="z" * 5000, ts=world.clock.now + index)
        world.commands.on_ack(node_topic("gw-a", Channel.ACK), encode(ack))
    trail = world.commands.get(command.id).acks
    assert len(trail) == MAX_ACKS
    assert all(len(ack.detail or "") == 1024 for ack in trail)
    counts = world.commands.rejects.counts()
    assert counts == {"ack.count": 10, "ack.detail": MAX_ACKS + 10}


def test_an_ack_from_the_far_future_is_stamped_with_the_receipt_time(world: World) -> None:
    command = world.commands.send("gw-a", "ping")
    ack = Ack(id=command.id, status=AckStatus.DONE, ts=world.clock.now + 30 * 86_400)
    world.commands.on_ack(node_topic("gw-a", Channel.ACK), encode(ack))
    assert world.commands.get(command.id).status == "done"
    assert world.commands.rejects.counts() == {"ack.ts": 1}


def test_reject_metrics_sum_per_field() -> None:
    first, second = Rejects(), Rejects()
    first.reject("gw-a", "heartbeat.cpu", "1e9 is above 1e5")
    second.reject("gw-b", "heartbeat.cpu", "1e9 is above 1e5")
    second.reject("gw-b", "ack.ts", "off", action="receipt time used")
    assert reject_metrics(first, second) == {
        'fleet_device_values_rejected_total{field="ack.ts"}': 1.0,
        'fleet_device_values_rejected_total{field="heartbeat.cpu"}': 2.0,
    }
    assert first.count() == 1 and second.count("ack.ts") == 1
