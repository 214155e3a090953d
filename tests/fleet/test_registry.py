"""The registry: nodes from their messages, statuses on an injected clock, batched persistence; a real agent."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.controller.bounds import MAX_TEXT
from fleet.controller.facade import BadRequest, NodeStatus, NotFound
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.registry import FILTERS, Registry
from fleet.controller.storage import Database
from fleet.protocol.codec import MAX_PAYLOAD, encode
from fleet.protocol.messages import Event, Health, Heartbeat, Message, ProbeResult, Reported, Status, UpdateState
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess
from tests.conftest import Pki
from tests.fakeclock import Clock
from tests.mqtt import Endpoint, wait_until

pytestmark = pytest.mark.timeout(60)


def heartbeat(seq: int = 1) -> Heartbeat:
    return Heartbeat(seq=seq, uptime=10.0, cpu=5.0, mem_free=1000, disk_free=2000, version="1.0.0")


def reported(labels: dict[str, str] | None = None, generation: int = 3) -> Reported:
    return Reported(
        generation=generation,
        version="1.2.0",
        previous_version="1.1.0",
        state=UpdateState.HEALTHY,
        labels=labels or {},
        ts=1.0,
    )


def health(healthy: bool = True) -> Health:
    probes = [] if healthy else [ProbeResult(name="http", ok=False, detail="503")]
    return Health(version="1.2.0", healthy=healthy, probes=probes, ts=1.0)


SAMPLES: dict[Channel, Message] = {
    Channel.STATUS: Status(state="online", ts=1.0, agent_version="0.9"),
    Channel.HEARTBEAT: heartbeat(),
    Channel.HEALTH: health(),
    Channel.REPORTED: reported({"ring": "canary"}),
    Channel.EVENTS: Event(kind="update", detail="started", ts=1.0),
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


@pytest.fixture
def registry(db_path: Path, clock: Clock) -> Iterator[Registry]:
    db = Database(db_path)
    yield Registry(db, clock=clock, stale_after=90, offline_after=300, health_history=5)
    db.close()


def send(registry: Registry, node: str, message: Message, channel: Channel) -> None:
    registry.on_message(node_topic(node, channel), encode(message))


# --- nodes appear from their messages -----------------------------------------------------------


@pytest.mark.parametrize("channel", list(SAMPLES))
def test_a_node_appears_from_its_first_message_of_any_kind(registry: Registry, channel: Channel) -> None:
    assert not registry.known("gw-a")
    send(registry, "gw-a", SAMPLES[channel], channel)
    assert registry.known("gw-a")
    assert [view.id for view in registry.nodes()] == ["gw-a"]
    assert registry.node_view("gw-a").status is NodeStatus.ONLINE
    assert registry.counters["invalid_messages"] == 0


def test_each_message_kind_updates_its_fields(registry: Registry, clock: Clock) -> None:
    for channel, message in SAMPLES.items():
        send(registry, "gw-a", message, channel)
    view = registry.node_view("gw-a")
    assert view.agent_version == "0.9"
    assert (view.version, view.previous_version, view.update_state, view.generation) == (
        "1.2.0",
        "1.1.0",
        "healthy",
        3,
    )
    assert view.labels == {"ring": "canary"}
    assert view.healthy is True
    assert view.health_ts == view.reported_ts == view.last_seen == clock.now
    assert view.heartbeat["seq"] == 1
    assert view.heartbeat["mem_free"] == 1000
    assert [event.kind for event in registry.recent_events("gw-a")] == ["update"]
    assert registry.counters["heartbeats"] == 1


def replay(registry: Registry, node: str, message: Message, channel: Channel) -> None:
    registry.on_replay(node_topic(node, channel), encode(message))


def test_a_replayed_retained_message_is_not_a_sign_of_life(registry: Registry, clock: Clock) -> None:
    """What every controller restart does: the broker replays the last will of an offline node."""
    send(registry, "gw-a", reported(), Channel.REPORTED)
    send(registry, "gw-a", Status(state="offline", ts=2.0), Channel.STATUS)
    before = registry.node_view("gw-a")
    clock.advance(600)
    replay(registry, "gw-a", Status(state="offline", ts=2.0), Channel.STATUS)
    replay(registry, "gw-a", reported(), Channel.REPORTED)
    after = registry.node_view("gw-a")
    assert after == before.model_copy(update={"status": NodeStatus.OFFLINE})
    assert (after.last_seen, after.reported_ts) == (before.last_seen, before.reported_ts)
    assert registry.counters["replays_known"] == 2


def test_a_replay_that_says_something_new_is_applied_without_refreshing_last_seen(
    registry: Registry, clock: Clock
) -> None:
    send(registry, "gw-a", reported(generation=3), Channel.REPORTED)
    seen = registry.node_view("gw-a").last_seen
    clock.advance(30)
    replay(registry, "gw-a", reported(generation=4), Channel.REPORTED)  # reported while we were down
    view = registry.node_view("gw-a")
    assert view.generation == 4
    assert view.reported_ts == clock.now  # news to us now: a rollout waiting on it must see it
    assert view.last_seen == seen


def test_a_node_known_only_from_replays_is_not_online(registry: Registry) -> None:
    replay(registry, "gw-new", Status(state="online", ts=1.0), Channel.STATUS)
    view = registry.node_view("gw-new")
    assert view.status is NodeStatus.OFFLINE  # until it says something live
    assert view.last_seen is None
    send(registry, "gw-new", heartbeat(), Channel.HEARTBEAT)
    assert registry.node_view("gw-new").status is NodeStatus.ONLINE


def test_json_payloads_are_accepted(registry: Registry) -> None:
    body = {"seq": 7, "uptime": 1.5, "cpu": 2, "mem_free": 3, "disk_free": 4, "future_field": "ignored"}
    registry.on_message(node_topic("gw-j", Channel.HEARTBEAT), json.dumps(body).encode())
    registry.on_message(node_topic("gw-j", Channel.STATUS), b'  {"state": "online"}')
    view = registry.node_view("gw-j")
    assert view.heartbeat["seq"] == 7
    assert view.status is NodeStatus.ONLINE


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        pytest.param(node_topic("gw-a", Channel.HEARTBEAT), b"\xc1\xff garbage", id="malformed-msgpack"),
        pytest.param(node_topic("gw-a", Channel.HEARTBEAT), b'{"seq": 1', id="malformed-json"),
        pytest.param(node_topic("gw-a", Channel.HEARTBEAT), b'{"seq": "one"}', id="wrong-type"),
        pytest.param(node_topic("gw-a", Channel.STATUS), b'{"state": "sleeping"}', id="bad-enum"),
        pytest.param(node_topic("gw-a", Channel.STATUS), b"", id="empty"),
        pytest.param(node_topic("gw-a", Channel.EVENTS), b"{" + b" " * MAX_PAYLOAD + b"}", id="oversize"),
        pytest.param("fleet/v1/nodes/gw-a/unknown", b'{"state": "online"}', id="unknown-channel"),
        pytest.param("fleet/v1/nodes/-bad-/status", b'{"state": "online"}', id="bad-node-id"),
        pytest.param("somewhere/else", b'{"state": "online"}', id="not-a-node-topic"),
        pytest.param(node_topic("gw-a", Channel.ACK), b'{"id": "c1", "status": "done", "ts": 1}', id="not-ours"),
    ],
)
def test_bad_input_is_counted_and_never_raises(registry: Registry, topic: str, payload: bytes) -> None:
    registry.on_message(topic, payload)
    assert registry.counters["invalid_messages"] == 1
    assert registry.nodes() == []


# --- statuses ---------------------------------------------------------------------------------


def test_online_then_stale_then_offline_by_silence(registry: Registry, clock: Clock) -> None:
    send(registry, "gw-a", SAMPLES[Channel.STATUS], Channel.STATUS)
    send(registry, "gw-a", heartbeat(), Channel.HEARTBEAT)
    assert registry.status_of("gw-a") is NodeStatus.ONLINE
    clock.advance(89)
    assert registry.status_of("gw-a") is NodeStatus.ONLINE
    clock.advance(2)
    assert registry.status_of("gw-a") is NodeStatus.STALE
    send(registry, "gw-a", heartbeat(2), Channel.HEARTBEAT)
    assert registry.status_of("gw-a") is NodeStatus.ONLINE
    clock.advance(301)
    assert registry.status_of("gw-a") is NodeStatus.OFFLINE
    assert registry.counts() == {"online": 0, "stale": 0, "offline": 1}


def test_last_will_makes_a_node_offline_until_it_is_heard_again(registry: Registry, clock: Clock) -> None:
    send(registry, "gw-a", SAMPLES[Channel.STATUS], Channel.STATUS)
    send(registry, "gw-b", SAMPLES[Channel.STATUS], Channel.STATUS)
    send(registry, "gw-a", Status(state="offline"), Channel.STATUS)  # the last will carries no ts
    assert registry.status_of("gw-a") is NodeStatus.OFFLINE
    assert registry.counts() == {"online": 1, "stale": 0, "offline": 1}
    # A retained reported message replays for dead nodes too: it must not revive one.
    send(registry, "gw-a", reported(), Channel.REPORTED)
    assert registry.status_of("gw-a") is NodeStatus.OFFLINE
    clock.advance(5)
    send(registry, "gw-a", heartbeat(), Channel.HEARTBEAT)
    assert registry.status_of("gw-a") is NodeStatus.ONLINE


def test_unknown_node_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound, match="gw-x"):
        registry.node_view("gw-x")
    with pytest.raises(NotFound):
        registry.status_of("gw-x")
    with pytest.raises(NotFound):
        registry.health_history("gw-x")


# --- labels and selectors ---------------------------------------------------------------------


def test_selector_matches_label_equality_sorted_by_id(registry: Registry) -> None:
    send(registry, "gw-c", reported({"ring": "canary", "site": "plant-3"}), Channel.REPORTED)
    send(registry, "gw-a", reported({"ring": "canary", "site": "plant-4"}), Channel.REPORTED)
    send(registry, "gw-b", reported({"ring": "main", "site": "plant-3"}), Channel.REPORTED)
    send(registry, "gw-d", heartbeat(), Channel.HEARTBEAT)  # no labels yet
    assert [v.id for v in registry.nodes()] == ["gw-a", "gw-b", "gw-c", "gw-d"]
    assert [v.id for v in registry.nodes({})] == ["gw-a", "gw-b", "gw-c", "gw-d"]
    assert [v.id for v in registry.nodes({"ring": "canary"})] == ["gw-a", "gw-c"]
    assert [v.id for v in registry.nodes({"ring": "canary", "site": "plant-3"})] == ["gw-c"]
    assert registry.nodes({"ring": "nope"}) == []
    # Labels are replaced by each reported message, not merged: a removed label is gone.
    send(registry, "gw-c", reported({"site": "plant-3"}), Channel.REPORTED)
    assert [v.id for v in registry.nodes({"ring": "canary"})] == ["gw-a"]


# --- what a device reports is bounded ----------------------------------------------------------


def test_a_reported_generation_of_2_63_drops_the_message(registry: Registry, caplog: pytest.LogCaptureFixture) -> None:
    send(registry, "gw-a", reported({"fleet": "x"}), Channel.REPORTED)
    lie = Reported(generation=2**63 - 1, version="6.6.6", state=UpdateState.FAILED, labels={"ring": "canary"}, ts=1.0)
    send(registry, "gw-a", lie, Channel.REPORTED)
    view = registry.node_view("gw-a")
    assert (view.generation, view.version, view.update_state, view.labels) == (3, "1.2.0", "healthy", {"fleet": "x"})
    assert registry.rejects.counts() == {"reported.generation": 1}
    assert registry.counters["rejected_messages"] == 1
    lines = [r.getMessage() for r in caplog.records if "reported.generation" in r.getMessage()]
    assert lines == [f"device gw-a: reported.generation {2**63 - 1} is above {2**53} (message dropped)"]


@pytest.mark.parametrize(
    ("message", "channel", "field"),
    [
        (Heartbeat(seq=2**60, uptime=1.0, cpu=1.0, mem_free=1, disk_free=1), Channel.HEARTBEAT, "heartbeat.seq"),
        (Heartbeat(seq=1, uptime=1.0, cpu=1.0, mem_free=2**62, disk_free=1), Channel.HEARTBEAT, "heartbeat.mem_free"),
        (Heartbeat(seq=1, uptime=1.0, cpu=1.0, mem_free=1, disk_free=2**61), Channel.HEARTBEAT, "heartbeat.disk_free"),
        (Heartbeat(seq=1, uptime=1e12, cpu=1.0, mem_free=1, disk_free=1), Channel.HEARTBEAT, "heartbeat.uptime"),
        (Heartbeat(seq=1, uptime=1.0, cpu=1e9, mem_free=1, disk_free=1), Channel.HEARTBEAT, "heartbeat.cpu"),
        (Heartbeat(seq=1, uptime=1, cpu=1, mem_free=1, disk_free=1, latency_ms=1e10), Channel.HEARTBEAT,
         "heartbeat.latency_ms"),
        (Health(healthy=True, consecutive_failures=2**62, ts=1.0), Channel.HEALTH, "health.consecutive_failures"),
        (Health(healthy=False, probes=[ProbeResult(name="p", ok=False)] * 65, ts=1.0), Channel.HEALTH,
         "health.probes"),
        (Reported(generation=1, version="v" * 129, state=UpdateState.IDLE, ts=1.0), Channel.REPORTED,
         "reported.version"),
        (Reported(generation=1, state=UpdateState.IDLE, labels={f"k{i}": "v" for i in range(65)}, ts=1.0),
         Channel.REPORTED, "reported.labels"),
        (Reported(generation=1, state=UpdateState.IDLE, labels={"k": "v" * 257}, ts=1.0), Channel.REPORTED,
         "reported.labels"),
        (Status(state="online", agent_version="x" * 200), Channel.STATUS, "status.agent_version"),
        (Event(kind="big", data={"blob": "x" * 5000}, ts=1.0), Channel.EVENTS, "events.data"),
    ],
)  # fmt: skip
def test_values_out_of_bounds_drop_the_message_and_are_counted_per_field(
    registry: Registry, message: Message, channel: Channel, field: str
) -> None:
    send(registry, "gw-a", message, channel)
    assert not registry.known("gw-a")  # a node does not even appear from a message out of bounds
    assert registry.rejects.counts() == {field: 1}
    assert registry.counters["rejected_messages"] == 1


def test_free_text_is_cut_and_device_clocks_are_not_trusted(registry: Registry, clock: Clock) -> None:
    send(registry, "gw-a", Event(kind="note", detail="x" * 5000, ts=clock.now + 10 * 86_400), Channel.EVENTS)
    (event,) = registry.recent_events("gw-a")
    assert event.detail == "x" * MAX_TEXT
    assert event.ts == clock.now  # ten days ahead: the receipt time instead
    probes = [ProbeResult(name="http", ok=False, detail="y" * 3000)]
    send(registry, "gw-a", Health(healthy=False, probes=probes, ts=clock.now), Channel.HEALTH)
    (record,) = registry.health_history("gw-a")
    assert record.detail == "http: " + "y" * MAX_TEXT
    send(registry, "gw-a", Event(kind="note", ts=clock.now - 3600), Channel.EVENTS)  # an hour behind is fine
    assert registry.recent_events("gw-a")[-1].ts == clock.now - 3600
    assert registry.rejects.counts() == {"events.detail": 1, "events.ts": 1, "health.probes.detail": 1}
    assert registry.counters["rejected_messages"] == 0  # kept, only bounded


# --- operator labels --------------------------------------------------------------------------


def test_operator_labels_win_over_reported_ones_and_survive_a_restart(
    registry: Registry, db_path: Path, clock: Clock
) -> None:
    send(registry, "gw-a", reported({"ring": "canary", "site": "plant-3"}), Channel.REPORTED)
    send(registry, "gw-b", reported({"ring": "main", "site": "plant-3"}), Channel.REPORTED)
    view = registry.set_labels("gw-a", {"ring": "main"})
    assert (view.operator_labels, view.reported_labels) == ({"ring": "main"}, {"ring": "canary", "site": "plant-3"})
    assert view.labels == {"ring": "main", "site": "plant-3"}
    registry.set_labels("gw-b", {"ring": "canary", "tier": "gold"})
    assert [v.id for v in registry.nodes({"ring": "canary"})] == ["gw-b"]  # selectors match effective labels
    assert [v.id for v in registry.nodes({"site": "plant-3"})] == ["gw-a", "gw-b"]
    # The node keeps reporting its own ring: it changes its reported labels, never the operator's.
    send(registry, "gw-a", reported({"ring": "canary"}), Channel.REPORTED)
    assert registry.node_view("gw-a").labels == {"ring": "main"}
    assert registry.set_labels("gw-b", {"tier": None}).operator_labels == {"ring": "canary"}
    assert registry.set_labels("gw-b", {"zone": "z1"}, replace_all=True).operator_labels == {"zone": "z1"}
    # Written at once (not with the next telemetry flush): a restart right away keeps them.
    other = Database(db_path)
    try:
        restarted = Registry(other, clock=clock)
        assert restarted.node_view("gw-a").operator_labels == {"ring": "main"}
        assert restarted.node_view("gw-b").labels == {"ring": "main", "site": "plant-3", "zone": "z1"}
    finally:
        other.close()


def test_operator_labels_are_checked(registry: Registry) -> None:
    with pytest.raises(NotFound, match="gw-x"):
        registry.set_labels("gw-x", {"ring": "canary"})
    send(registry, "gw-a", heartbeat(), Channel.HEARTBEAT)
    for bad in ({"ring": "can,ary"}, {"ring": ""}, {"bad key": "x"}, {"-x": "y"}, {"k": "v" * 129}):
        with pytest.raises(BadRequest, match="label"):
            registry.set_labels("gw-a", bad)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="at most 32"):
        registry.set_labels("gw-a", {f"k{i}": "v" for i in range(33)})
    assert registry.node_view("gw-a").operator_labels == {}


def test_a_database_from_before_operator_labels_is_upgraded(db_path: Path, clock: Clock) -> None:
    old = Database(db_path)
    old.execute(
        "CREATE TABLE registry_nodes (id TEXT PRIMARY KEY, connection TEXT, status_ts REAL, agent_version TEXT,"
        " version TEXT, previous_version TEXT, update_state TEXT, generation INTEGER, labels TEXT NOT NULL"
        " DEFAULT '{}', reported_ts REAL, healthy INTEGER, health_ts REAL, last_seen REAL, heartbeat_ts REAL,"
        " heartbeat TEXT NOT NULL DEFAULT '{}')"
    )
    old.execute(
        "INSERT INTO registry_nodes (id, version, generation, labels, last_seen) VALUES (?, ?, ?, ?, ?)",
        ("gw-old", "1.0.0", 2**63 - 1, '{"ring": "canary"}', clock.now),
    )
    old.close()
    db = Database(db_path)
    try:
        registry = Registry(db, clock=clock)
        view = registry.node_view("gw-old")
        assert (view.version, view.reported_labels, view.operator_labels) == ("1.0.0", {"ring": "canary"}, {})
        assert view.generation is None  # stored by a controller before the bounds: not shown
        assert registry.set_labels("gw-old", {"ring": "main"}).labels == {"ring": "main"}
        assert Registry(db, clock=clock).node_view("gw-old").operator_labels == {"ring": "main"}
    finally:
        db.close()


def test_controllers_sharing_a_database_see_each_others_operator_labels(tmp_path: Path) -> None:
    clock = Clock()
    first, second = Database(tmp_path / "fleet.db"), Database(tmp_path / "fleet.db")
    try:
        a, b = Registry(first, clock=clock), Registry(second, clock=clock)
        send(a, "gw-a", reported({"site": "s1"}), Channel.REPORTED)
        a.flush()
        b.refresh()
        clock.advance(1)
        a.set_labels("gw-a", {"ring": "canary"})
        clock.advance(1)
        send(b, "gw-a", reported({"site": "s2"}), Channel.REPORTED)  # b's newer telemetry ...
        b.flush()  # ... written over the row must not undo a's labels
        b.refresh()
        a.refresh()
        for registry in (a, b):
            view = registry.node_view("gw-a")
            assert (view.operator_labels, view.reported_labels) == ({"ring": "canary"}, {"site": "s2"})
    finally:
        first.close()
        second.close()


# --- health history ---------------------------------------------------------------------------


def test_health_history_is_bounded_and_newest_last(registry: Registry, clock: Clock) -> None:
    for index in range(8):
        clock.advance(1)
        send(registry, "gw-a", health(healthy=index % 2 == 0), Channel.HEALTH)
    history = registry.health_history("gw-a")
    assert len(history) == 5
    assert [record.ts for record in history] == [clock.now - 4 + i for i in range(5)]
    assert history[-1].healthy is False
    assert history[-1].detail == "http: 503"
    assert registry.node_view("gw-a").healthy is False


# --- persistence ------------------------------------------------------------------------------


def test_writes_are_batched_and_a_restart_keeps_the_registry(registry: Registry, db_path: Path, clock: Clock) -> None:
    for channel, message in SAMPLES.items():
        send(registry, "gw-a", message, channel)
    for index in range(7):
        send(registry, "gw-a", health(healthy=index != 6), Channel.HEALTH)
    send(registry, "gw-b", Status(state="offline"), Channel.STATUS)
    assert registry.db.query("SELECT COUNT(*) FROM registry_nodes") == [(0,)]  # nothing until flush
    assert registry.flush() == 2
    assert registry.flush() == 0  # nothing changed since
    before = registry.nodes()

    other = Database(db_path)
    try:
        restarted = Registry(other, clock=clock, health_history=5)
        # Clock offsets are measured again from the next messages (fleet.controller.clocks): memory only.
        assert restarted.nodes() == [view.model_copy(update={"clock_offset": None}) for view in before]
        assert restarted.node_view("gw-a").labels == {"ring": "canary"}
        assert restarted.status_of("gw-b") is NodeStatus.OFFLINE
        history = restarted.health_history("gw-a")
        assert history == registry.health_history("gw-a")
        assert len(history) == 5
        assert other.query("SELECT COUNT(*) FROM registry_health WHERE node = 'gw-a'") == [(5,)]
    finally:
        other.close()


def test_a_failed_flush_keeps_its_changes_for_the_next(registry: Registry, db_path: Path) -> None:
    send(registry, "gw-a", heartbeat(), Channel.HEARTBEAT)
    registry.db.execute("ALTER TABLE registry_nodes RENAME TO broken")
    with pytest.raises(Exception, match="registry_nodes"):
        registry.flush()
    registry.db.execute("ALTER TABLE broken RENAME TO registry_nodes")
    assert registry.flush() == 1
    assert registry.db.query("SELECT id FROM registry_nodes") == [("gw-a",)]


# --- a real agent over both brokers -----------------------------------------------------------


@pytest.fixture
def controller_identity(pki: Pki) -> TlsIdentity:
    """A controller identity of our own: sharing controller.pem with other tests would kick both off."""
    return pki.own_controller("ctl-registry")


def test_registry_follows_a_real_agent(
    broker: Endpoint, pki: Pki, controller_identity: TlsIdentity, tmp_path: Path
) -> None:
    db = Database(tmp_path / "fleet.db")
    registry = Registry(db)
    mqtt = FleetMqtt(broker.host, broker.port, controller_identity, options=MqttOptions(reconnect_max=2))
    replays: list[str] = []

    def on_replay(topic: str, payload: bytes) -> None:
        replays.append(topic)
        registry.on_replay(topic, payload)

    for topic_filter in FILTERS:
        mqtt.subscribe(topic_filter, registry.on_message, replays=on_replay)
    mqtt.start()
    agent = AgentProcess("gw-a", broker, pki.device("gw-a"), tmp_path / "agent", extra={"labels": {"ring": "canary"}})
    try:
        agent.start()

        def seen_alive() -> bool:
            if not registry.known("gw-a"):
                return False
            view = registry.node_view("gw-a")
            return view.status is NodeStatus.ONLINE and view.labels == {"ring": "canary"} and view.heartbeat != {}

        wait_until(seen_alive, 15, "gw-a online with labels and a heartbeat")
        view = registry.node_view("gw-a")
        assert view.agent_version is not None
        assert view.generation == 0  # no desired state yet
        assert view.update_state is not None
        first_seq = view.heartbeat["seq"]
        wait_until(lambda: registry.node_view("gw-a").heartbeat["seq"] > first_seq, 10, "a second heartbeat")
        assert [v.id for v in registry.nodes({"ring": "canary"})] == ["gw-a"]

        agent.kill9()  # no DISCONNECT: the broker publishes the last will after the keepalive runs out
        wait_until(lambda: registry.status_of("gw-a") is NodeStatus.OFFLINE, 20, "gw-a offline by its last will")
        assert registry.counters["invalid_messages"] == 0
        registry.flush()
        assert db.query("SELECT connection FROM registry_nodes WHERE id = 'gw-a'") == [("offline",)]
        # Live retained publishes reach subscribers with retain=0 (MQTT-3.3.1-9): none were replays.
        assert [t for t in replays if "gw-a" in t] == []

        # A controller restart: a fresh registry on the same database, a fresh subscription. The
        # broker replays gw-a's retained status (its last will) and reported state: old news.
        last_seen = registry.node_view("gw-a").last_seen
        mqtt.close()
        registry = Registry(db)
        mqtt = FleetMqtt(broker.host, broker.port, controller_identity, options=MqttOptions(reconnect_max=2))
        for topic_filter in FILTERS:
            mqtt.subscribe(topic_filter, registry.on_message, replays=on_replay)
        mqtt.start()
        wait_until(lambda: registry.counters["replays_known"] >= 2, 15, "gw-a's status and reported replayed")
        view = registry.node_view("gw-a")
        assert (view.status, view.last_seen) == (NodeStatus.OFFLINE, last_seen)
    finally:
        agent.kill9()
        mqtt.close()
        db.close()


def test_ingest_flush_and_reads_from_several_threads(registry: Registry) -> None:
    errors: list[BaseException] = []
    payloads = [(node_topic(f"gw-{i:03d}", Channel.HEARTBEAT), encode(heartbeat(i))) for i in range(300)]

    def guarded(work: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            try:
                for _ in range(20):
                    work()
            except BaseException as exc:
                errors.append(exc)

        return run

    def ingest() -> None:
        for topic, payload in payloads:
            registry.on_message(topic, payload)

    threads = [
        threading.Thread(target=guarded(ingest), name="ingest"),
        threading.Thread(target=guarded(registry.flush), name="flush"),
        threading.Thread(target=guarded(registry.nodes), name="read"),
        threading.Thread(target=guarded(registry.counts), name="counts"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    registry.flush()
    assert registry.db.query("SELECT COUNT(*) FROM registry_nodes") == [(300,)]
    assert registry.counters["heartbeats"] == 20 * 300
