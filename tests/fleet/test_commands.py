"""Command tracking: persisted before publish, ack trail and precedence, backoff, expiry; then a real agent."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.controller.commands import ACK_FILTER, CommandTracker
from fleet.controller.facade import BadRequest, NotFound
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.storage import Database
from fleet.protocol.codec import decode, encode
from fleet.protocol.errors import TransportError
from fleet.protocol.messages import Ack, AckStatus, Command
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess
from tests.conftest import Pki
from tests.fakeclock import Clock
from tests.mqtt import Endpoint, wait_until

pytestmark = pytest.mark.timeout(60)


class Wire:
    """What the tracker published, decoded; ``fail`` makes the next publishes raise like a full queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Command]] = []
        self.fail = False

    def __call__(self, topic: str, payload: bytes, qos: int) -> None:
        assert qos == 1
        if self.fail:
            raise TransportError("outgoing queue full")
        self.sent.append((topic, decode(topic, payload, Command)))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "fleet.db")
    yield database
    database.close()


@pytest.fixture
def tracker(db: Database, wire: Wire, clock: Clock) -> CommandTracker:
    return CommandTracker(db, wire, clock=clock, resend_after=10, max_resend_after=40, jitter=0)


def ack(
    tracker: CommandTracker,
    command_id: str,
    status: AckStatus,
    node: str = "gw-a",
    detail: str | None = None,
    ts: float = 1.0,
) -> None:
    message = Ack(id=command_id, status=status, detail=detail, ts=ts)
    tracker.on_ack(node_topic(node, Channel.ACK), encode(message))


# --- sending ----------------------------------------------------------------------------------


def test_send_persists_then_publishes_with_id_and_expiry(tracker: CommandTracker, wire: Wire, clock: Clock) -> None:
    view = tracker.send("gw-a", "restart", expires_in=60, rollout_id="r1")
    assert len(view.id) == 32
    assert (view.node, view.action, view.status, view.attempts) == ("gw-a", "restart", "pending", 1)
    assert view.created == clock.now
    assert view.expires_at == clock.now + 60
    [(topic, command)] = wire.sent
    assert topic == "fleet/v1/nodes/gw-a/cmd"
    assert (command.id, command.action, command.expires_at) == (view.id, "restart", clock.now + 60)
    assert tracker.get(view.id) == view
    assert tracker.for_rollout("r1") == [view]
    assert tracker.pending_count() == 1


def test_the_record_exists_before_the_publish(tracker: CommandTracker, wire: Wire, db: Database, clock: Clock) -> None:
    seen_in_db: list[tuple[object, ...]] = []

    def publish(topic: str, payload: bytes, qos: int) -> None:
        seen_in_db.extend(db.query("SELECT node, status FROM commands"))
        raise TransportError("broker gone")

    tracker.publish = publish
    view = tracker.send("gw-a", "ping")
    assert seen_in_db == [("gw-a", "pending")]
    assert tracker.get(view.id).status == "pending"
    assert tracker.counters["publish_errors"] == 1
    # The tracker resends it once the link is back.
    tracker.publish = wire
    clock.advance(10)
    assert tracker.resend_due() == 1
    assert [command.id for _topic, command in wire.sent] == [view.id]


@pytest.mark.parametrize(
    ("node", "action", "args", "expires_in"),
    [
        ("gw-a", "Restart!", None, 60),
        ("gw-a", "", None, 60),
        ("bad/node", "ping", None, 60),
        ("gw-a", "ping", {"blob": b"\x00"}, 60),
        ("gw-a", "ping", None, 0),
    ],
)
def test_invalid_commands_are_bad_requests_and_not_stored(
    tracker: CommandTracker, wire: Wire, node: str, action: str, args: dict[str, object] | None, expires_in: float
) -> None:
    with pytest.raises(BadRequest):
        tracker.send(node, action, args, expires_in=expires_in)
    assert wire.sent == []
    assert tracker.db.query("SELECT COUNT(*) FROM commands") == [(0,)]


# --- acks -------------------------------------------------------------------------------------


def test_ack_trail_and_status_precedence(tracker: CommandTracker, clock: Clock) -> None:
    command = tracker.send("gw-a", "restart")
    ack(tracker, command.id, AckStatus.ACCEPTED)
    assert tracker.get(command.id).status == "accepted"
    clock.advance(1)
    ack(tracker, command.id, AckStatus.DONE, detail="restarted")
    ack(tracker, command.id, AckStatus.DUPLICATE)  # a resend the agent had already seen
    ack(tracker, command.id, AckStatus.ACCEPTED, ts=2.0)  # a late, reordered ack must not hide the result
    view = tracker.get(command.id)
    assert view.status == "done"
    assert [(a.status, a.detail) for a in view.acks] == [
        ("accepted", None),
        ("done", "restarted"),
        ("duplicate", None),
        ("accepted", None),
    ]
    assert view.acks[1].ts == clock.now
    assert tracker.pending_count() == 0


def test_a_redelivered_ack_is_recorded_once(tracker: CommandTracker) -> None:
    """QoS 1 is at-least-once: the same ack (same status and device time) may arrive twice."""
    command = tracker.send("gw-a", "ping")
    for _ in range(3):
        ack(tracker, command.id, AckStatus.DONE, ts=5.0)
    ack(tracker, command.id, AckStatus.DUPLICATE, ts=6.0)  # a new message: the agent saw a resend
    assert [a.status for a in tracker.get(command.id).acks] == ["done", "duplicate"]
    assert tracker.counters["redelivered_acks"] == 2


def test_duplicate_alone_is_recorded_as_duplicate(tracker: CommandTracker) -> None:
    command = tracker.send("gw-a", "ping")
    ack(tracker, command.id, AckStatus.DUPLICATE)
    assert tracker.get(command.id).status == "duplicate"
    ack(tracker, command.id, AckStatus.FAILED, detail="boom")
    assert tracker.get(command.id).status == "failed"


def test_unknown_and_foreign_acks_are_counted_and_ignored(tracker: CommandTracker) -> None:
    command = tracker.send("gw-a", "ping")
    ack(tracker, "no-such-command", AckStatus.DONE)
    ack(tracker, command.id, AckStatus.DONE, node="gw-b")  # gw-b cannot acknowledge gw-a's command
    tracker.on_ack(node_topic("gw-a", Channel.ACK), b'{"id": "x"}')  # malformed
    tracker.on_ack(node_topic("gw-a", Channel.HEARTBEAT), b'{"seq": 1}')  # not an ack topic
    assert tracker.counters["unknown_acks"] == 2
    assert tracker.counters["invalid_acks"] == 2
    view = tracker.get(command.id)
    assert (view.status, view.acks) == ("pending", [])


# --- resending and expiry ---------------------------------------------------------------------


def test_resend_with_capped_exponential_backoff(tracker: CommandTracker, wire: Wire, clock: Clock) -> None:
    command = tracker.send("gw-a", "ping", expires_in=1000)
    resent_at: list[float] = []
    start = clock.now
    while clock.now < start + 200:
        clock.advance(1)
        if tracker.resend_due():
            resent_at.append(clock.now - start)
    # Delays 10, 20, 40 (cap), 40, 40 ...
    assert resent_at == [10, 30, 70, 110, 150, 190]
    assert all(sent.id == command.id for _topic, sent in wire.sent)
    assert tracker.get(command.id).attempts == 7
    ack(tracker, command.id, AckStatus.ACCEPTED)
    clock.advance(100)
    assert tracker.resend_due() == 0  # acknowledged: never again


def test_resends_are_byte_identical(tracker: CommandTracker, clock: Clock) -> None:
    payloads: list[bytes] = []
    tracker.publish = lambda topic, payload, qos: payloads.append(payload)
    tracker.send("gw-a", "ping", {"verbose": True})
    clock.advance(10)
    tracker.resend_due()
    assert len(payloads) == 2
    assert payloads[0] == payloads[1]


def test_unacknowledged_commands_expire(tracker: CommandTracker, wire: Wire, clock: Clock) -> None:
    short = tracker.send("gw-a", "ping", expires_in=25)
    answered = tracker.send("gw-a", "ping", expires_in=25)
    ack(tracker, answered.id, AckStatus.ACCEPTED)
    clock.advance(25)
    assert tracker.resend_due() == 0
    assert tracker.get(short.id).status == "expired"
    assert tracker.get(answered.id).status == "accepted"  # acknowledged commands are the agent's now
    assert tracker.counters["expired"] == 1
    # An ack that arrives after all still counts: the command did run.
    ack(tracker, short.id, AckStatus.DONE)
    assert tracker.get(short.id).status == "done"


def test_for_node_is_newest_first_and_limited(tracker: CommandTracker, clock: Clock) -> None:
    ids = []
    for _ in range(5):
        clock.advance(1)
        ids.append(tracker.send("gw-a", "ping").id)
    tracker.send("gw-b", "ping")
    assert [view.id for view in tracker.for_node("gw-a", limit=3)] == ids[::-1][:3]
    with pytest.raises(NotFound):
        tracker.get("nope")


def test_a_new_tracker_on_the_same_file_resends_what_is_pending(
    tracker: CommandTracker, db: Database, clock: Clock
) -> None:
    command = tracker.send("gw-a", "ping")
    wire = Wire()
    restarted = CommandTracker(db, wire, clock=clock, resend_after=10, max_resend_after=40, jitter=0)
    clock.advance(10)
    assert restarted.resend_due() == 1
    assert [sent.id for _topic, sent in wire.sent] == [command.id]


# --- a real agent over both brokers -----------------------------------------------------------


@pytest.fixture
def controller_identity(pki: Pki) -> TlsIdentity:
    """A controller identity of our own: sharing controller.pem with other tests would kick both off."""
    return pki.own_controller("ctl-commands")


def test_a_command_sent_while_the_agent_is_down_is_done_exactly_once(
    broker: Endpoint, pki: Pki, controller_identity: TlsIdentity, tmp_path: Path
) -> None:
    db = Database(tmp_path / "fleet.db")
    mqtt = FleetMqtt(broker.host, broker.port, controller_identity, options=MqttOptions(reconnect_max=2))
    tracker = CommandTracker(db, mqtt.publish, resend_after=0.5, max_resend_after=2)
    mqtt.subscribe(ACK_FILTER, tracker.on_ack)
    mqtt.start()
    stop = threading.Event()

    def tick() -> None:  # the controller's tick thread, in small
        while not stop.wait(0.1):
            tracker.resend_due()

    ticker = threading.Thread(target=tick, name="test-command-tick")
    agent = AgentProcess("gw-a", broker, pki.device("gw-a"), tmp_path / "agent")
    try:
        agent.start()
        agent.stop()  # the agent has a session now, but is away when the command is sent
        ticker.start()
        command = tracker.send("gw-a", "ping", expires_in=60)
        wait_until(lambda: tracker.get(command.id).attempts >= 2, 10, "a resend while the agent is down")
        agent.start()
        wait_until(lambda: tracker.get(command.id).status == "done", 20, "the command done")
        # Resends in flight when the first ack came back are answered "duplicate", never run again.
        ack_statuses = [a.status for a in tracker.get(command.id).acks]
        wait_until(lambda: tracker.pending_count() == 0, 5, "nothing pending")
        assert ack_statuses.count("done") == 1
        assert ack_statuses[-1] in {"done", "duplicate"}
        assert agent.log_text().count(f"executing command {command.id}") == 1
        assert tracker.counters["unknown_acks"] == 0
    finally:
        stop.set()
        if ticker.is_alive():
            ticker.join(5)
        agent.kill9()
        mqtt.close()
        db.close()
