"""Desired state: monotonic generations per node, persisted before publishing, config kept; then a real agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from certs import load_control_key
from fleet.controller.bounds import GENERATION_AHEAD, MAX_GENERATION
from fleet.controller.desired import DesiredPublisher
from fleet.controller.facade import NotFound
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.service import Controller
from fleet.controller.settings import BrokerSettings, ControllerSettings, ReleaseSettings, StorageSettings
from fleet.controller.storage import Database
from fleet.protocol.codec import decode, decode_for_channel
from fleet.protocol.errors import InvalidMessage, TransportError
from fleet.protocol.messages import DesiredState, ProbeSpec, ReleaseRef, Reported
from fleet.protocol.topics import Channel, all_nodes_filter, node_topic
from tests.agentproc import AgentProcess
from tests.conftest import Pki
from tests.mqtt import Endpoint, connected, wait_until

pytestmark = pytest.mark.timeout(60)

DIGEST = "sha256:" + "ab" * 32


def release(version: str) -> ReleaseRef:
    return ReleaseRef(name="app", version=version, digest=DIGEST, size=10, chunk_size=4)


class Wire:
    """Retained documents as the broker would hold them: the last one per topic wins."""

    def __init__(self) -> None:
        self.retained: dict[str, DesiredState] = {}
        self.count = 0

    def __call__(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        assert (qos, retain) == (1, True)
        self.retained[topic] = decode(topic, payload, DesiredState)
        self.count += 1

    def of(self, node: str) -> DesiredState:
        return self.retained[f"fleet/v1/nodes/{node}/desired"]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "fleet.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[Database]:
    database = Database(db_path)
    yield database
    database.close()


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def publisher(db: Database, wire: Wire) -> DesiredPublisher:
    return DesiredPublisher(db, wire, clock=lambda: 1234.0)


def test_generations_are_monotonic_per_node(publisher: DesiredPublisher, wire: Wire) -> None:
    assert publisher.publish_release("gw-a", release("1.0.0")) == 1
    assert publisher.publish_release("gw-a", release("1.1.0")) == 2
    assert publisher.publish_release("gw-b", release("1.0.0")) == 1
    assert publisher.publish_config("gw-a", {"level": "debug"}) == 3
    document = wire.of("gw-a")
    assert document.generation == 3
    assert document.issued_at == 1234.0
    assert publisher.current("gw-a") == document
    assert publisher.current("gw-c") is None


def test_generations_survive_a_new_publisher_on_the_same_file(
    publisher: DesiredPublisher, db_path: Path, wire: Wire
) -> None:
    publisher.publish_release("gw-a", release("1.0.0"))
    publisher.publish_release("gw-a", release("1.1.0"))
    other = Database(db_path)
    try:
        restarted = DesiredPublisher(other, wire)
        assert restarted.current("gw-a") == publisher.current("gw-a")
        assert restarted.republish("gw-a") == 2
        assert restarted.republish_all() == 1
        assert restarted.publish_config("gw-a", {"x": 1}) == 3
        with pytest.raises(NotFound):
            restarted.republish("gw-z")
    finally:
        other.close()


def test_a_reported_generation_raises_the_next_one(publisher: DesiredPublisher, db_path: Path, wire: Wire) -> None:
    # E.g. the controller's database was lost: the agent's applied generation is the floor.
    publisher.observe_reported("gw-a", 41)
    publisher.observe_reported("gw-a", 7)  # lower: changes nothing
    assert publisher.publish_config("gw-a", {}) == 42
    other = Database(db_path)
    try:
        assert DesiredPublisher(other, wire).publish_config("gw-b", {}) == 1
        other.execute("DELETE FROM desired_state")
        assert DesiredPublisher(other, wire).publish_config("gw-a", {}) == 42  # observed 41 is kept
    finally:
        other.close()


# --- a device's generation is bounded -------------------------------------------------------------


def test_a_reported_generation_of_2_63_is_refused_and_the_next_publish_still_works(
    publisher: DesiredPublisher, wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    """A lying device reporting the largest generation the wire holds would make every later
    document for it invalid (one past 2^63-1): the controller does not build on it."""
    assert publisher.publish_release("gw-a", release("1.0.0")) == 1
    assert publisher.observe_reported("gw-a", 2**63 - 1) is False
    assert publisher.publish_release("gw-a", None) == 2
    assert wire.of("gw-a").generation == 2
    assert publisher.rejects.counts() == {"desired.observed_generation": 1}
    (line,) = [r.getMessage() for r in caplog.records if "desired.observed_generation" in r.getMessage()]
    limit = 1 + GENERATION_AHEAD
    assert line == f"device gw-a: desired.observed_generation {2**63 - 1} is above {limit} (1 published) (ignored)"


def test_a_reported_generation_may_lead_ours_by_a_bounded_amount(publisher: DesiredPublisher) -> None:
    # A restored backup: the agent applied generations the database no longer remembers.
    publisher.publish_config("gw-a", {})
    assert publisher.observe_reported("gw-a", 1 + GENERATION_AHEAD) is True
    assert publisher.publish_config("gw-a", {}) == 2 + GENERATION_AHEAD
    assert publisher.observe_reported("gw-a", 2 + 2 * GENERATION_AHEAD + 1) is False
    assert publisher.publish_config("gw-a", {}) == 3 + GENERATION_AHEAD
    # Nothing published (a lost database): only the absolute bound applies, and one past it is valid.
    assert publisher.observe_reported("gw-b", MAX_GENERATION + 1) is False
    assert publisher.observe_reported("gw-b", MAX_GENERATION) is True
    assert publisher.publish_config("gw-b", {}) == MAX_GENERATION + 1
    assert publisher.rejects.count("desired.observed_generation") == 2


def test_a_generation_stored_before_the_bounds_is_forgotten(db: Database, wire: Wire) -> None:
    DesiredPublisher(db, wire)  # creates the tables
    db.execute("INSERT INTO desired_observed (node, generation) VALUES ('gw-liar', ?), ('gw-ok', 41)", (2**63 - 1,))
    publisher = DesiredPublisher(db, wire)
    assert publisher.rejects.counts() == {"desired.observed_generation": 1}
    assert publisher.publish_config("gw-liar", {}) == 1
    assert publisher.publish_config("gw-ok", {}) == 42


def test_republishing_goes_on_past_a_node_that_fails(db: Database, wire: Wire) -> None:
    publisher = DesiredPublisher(db, wire)
    for node in ("gw-a", "gw-b", "gw-c"):
        publisher.publish_config(node, {})

    def flaky(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if "/gw-b/" in topic:
            raise TransportError("outgoing queue full")
        wire(topic, payload, qos, retain)

    wire.count = 0
    assert DesiredPublisher(db, flaky).republish_all() == 2
    assert wire.count == 2


def test_config_and_probe_are_kept_when_only_the_release_changes(publisher: DesiredPublisher, wire: Wire) -> None:
    probe = ProbeSpec(kind="tcp", target="127.0.0.1:80")
    publisher.publish_config("gw-a", {"level": "debug"})
    publisher.publish_release("gw-a", release("1.0.0"), health=probe)
    publisher.publish_release("gw-a", release("1.1.0"))
    document = wire.of("gw-a")
    assert document.release == release("1.1.0")
    assert document.config == {"level": "debug"}
    assert document.health == probe
    # ... and the release is kept when only the config changes.
    publisher.publish_config("gw-a", {"level": "info"})
    assert wire.of("gw-a").release == release("1.1.0")
    assert wire.of("gw-a").config == {"level": "info"}
    # An explicit None release means "no release" (a config-only baseline).
    publisher.publish_release("gw-a", None, config={"level": "warn"})
    assert wire.of("gw-a").release is None


def test_the_document_is_stored_before_it_is_published(db: Database) -> None:
    seen: list[tuple[object, ...]] = []

    def failing(topic: str, payload: bytes, qos: int, retain: bool) -> None:
        seen.extend(db.query("SELECT node, generation FROM desired_state"))
        raise TransportError("broker gone")

    publisher = DesiredPublisher(db, failing)
    with pytest.raises(TransportError):
        publisher.publish_config("gw-a", {"a": 1})
    assert seen == [("gw-a", 1)]
    assert publisher.generation("gw-a") == 1  # stored: republish sends it once the link is back


def test_invalid_node_ids_are_refused_before_anything_is_stored(publisher: DesiredPublisher, db: Database) -> None:
    with pytest.raises(InvalidMessage):
        publisher.publish_config("bad/node", {})
    assert db.query("SELECT COUNT(*) FROM desired_state") == [(0,)]


# --- a real agent over both brokers -----------------------------------------------------------


@pytest.fixture
def controller_identity(pki: Pki) -> TlsIdentity:
    """A controller identity of our own: sharing controller.pem with other tests would kick both off."""
    return pki.own_controller("ctl-desired")


def test_desired_state_reaches_a_real_agent(
    broker: Endpoint, pki: Pki, controller_identity: TlsIdentity, tmp_path: Path
) -> None:
    db = Database(tmp_path / "fleet.db")
    mqtt = FleetMqtt(broker.host, broker.port, controller_identity, options=MqttOptions(reconnect_max=2))
    publisher = DesiredPublisher(db, mqtt.publish, signing_key=load_control_key(pki.paths))  # agents require it
    reports: list[Reported] = []

    def on_reported(topic: str, payload: bytes) -> None:
        decoded = decode_for_channel(topic, payload)
        assert isinstance(decoded.message, Reported)
        reports.append(decoded.message)
        publisher.observe_reported(decoded.node_id, decoded.message.generation)

    mqtt.subscribe(all_nodes_filter(Channel.REPORTED), on_reported)
    mqtt.start()
    agent = AgentProcess("gw-a", broker, pki.device("gw-a"), tmp_path / "agent")
    try:
        agent.start()
        first = publisher.publish_config("gw-a", {"labels": {"ring": "canary"}})
        wait_until(lambda: any(r.generation == first for r in reports), 15, f"gw-a reports generation {first}")
        assert next(r for r in reports if r.generation == first).labels == {"ring": "canary"}

        # While the agent is away, a newer generation waits retained on the broker.
        agent.stop()
        second = publisher.publish_config("gw-a", {"labels": {"ring": "main"}})
        assert second == first + 1
        agent.start()
        wait_until(lambda: any(r.generation == second for r in reports), 15, f"gw-a reports generation {second}")
        assert next(r for r in reports if r.generation == second).labels == {"ring": "main"}
    finally:
        agent.kill9()
        mqtt.close()
        db.close()


def test_controller_start_republishes_desired_state_stored_but_never_published(
    embedded: Endpoint, pki: Pki, tmp_path: Path
) -> None:
    """A controller killed between committing a desired state and publishing it must not leave the
    node waiting: the next start publishes every stored document again."""
    database = tmp_path / "fleet.db"
    crashed = DesiredPublisher(Database(database), lambda *_args: None)  # committed, never published
    generation = crashed.publish_config("gw-b", {"mode": "eco"})
    pki.own_controller("ctl-republish")
    settings = ControllerSettings(
        broker=BrokerSettings(host=embedded.host, port=embedded.port, certs=pki.paths.root, identity="ctl-republish"),
        storage=StorageSettings(db=database),
        releases=ReleaseSettings(store=tmp_path / "store"),
    )
    controller = Controller(settings)
    controller.start()
    try:
        with connected(embedded, pki.operator("alice")) as operator:
            operator.subscribe(node_topic("gw-b", Channel.DESIRED))
            message = operator.expect(lambda m: m.topic == node_topic("gw-b", Channel.DESIRED))
            assert decode(message.topic, message.payload, DesiredState).generation == generation
    finally:
        controller.stop()
