"""The controller's side of the signed control plane (issue 11): it signs every desired state and
command with the PKI's control key, bound to the node; on start it re-signs what an older version
stored unsigned (so the retained documents on the broker get signed); it measures each node's clock
offset; ``fleet sign`` prints a signed command for ``mosquitto_pub``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from certs import load_control_key
from fleet.cli import sign_cmd
from fleet.controller.clocks import ClockCollector, DeviceClocks
from fleet.controller.commands import CommandTracker
from fleet.controller.desired import DesiredPublisher
from fleet.controller.mqtt import FleetMqtt, MqttOptions
from fleet.controller.service import Controller
from fleet.controller.settings import BrokerSettings, ControllerSettings, ReleaseSettings, StorageSettings
from fleet.controller.storage import Database
from fleet.protocol.codec import decode, decode_raw
from fleet.protocol.errors import InvalidSignature
from fleet.protocol.messages import DesiredState, Event, Reported
from fleet.protocol.signing import COMMAND_KIND, DESIRED_KIND, verify_control
from fleet.protocol.topics import Channel, node_topic
from tests.agentproc import AgentProcess
from tests.conftest import Pki
from tests.mqtt import Endpoint, connected, wait_until

CONTROLLER = "ctl-2"  # issued with the session's PKI, so Mosquitto's rendered ACL names it


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, payload: bytes, *_rest: Any) -> None:
        self.messages.append((topic, payload))


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "fleet.db")
    yield database
    database.close()


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_every_desired_state_is_signed_for_its_node(db: Database, key: Ed25519PrivateKey) -> None:
    sent = Sent()
    publisher = DesiredPublisher(db, sent, clock=lambda: 1000.0, signing_key=key)
    publisher.publish_config("gw-a", {"mode": "eco"})
    publisher.publish_release("gw-b", None)
    for topic, payload in sent.messages:
        node = topic.split("/")[3]
        raw = decode_raw(topic, payload)
        verify_control(raw, key.public_key(), node=node, kind=DESIRED_KIND)
        assert raw["issued_at"] == 1000
    with pytest.raises(InvalidSignature, match="signed for node 'gw-a', not for 'gw-b'"):
        verify_control(decode_raw("t", sent.messages[0][1]), key.public_key(), node="gw-b", kind=DESIRED_KIND)


def test_republish_signs_again_what_an_older_controller_stored(db: Database, key: Ed25519PrivateKey) -> None:
    old = DesiredPublisher(db, Sent())  # a controller before signatures: bound nowhere, unsigned
    generation = old.publish_config("gw-a", {"mode": "eco"})
    stored = db.query("SELECT document FROM desired_state WHERE node = 'gw-a'")[0][0]
    assert "signature" not in decode_raw("t", bytes(stored))

    sent = Sent()
    upgraded = DesiredPublisher(db, sent, signing_key=key)
    assert upgraded.republish_all() == 1
    (topic, payload), *_ = sent.messages
    assert topic == node_topic("gw-a", Channel.DESIRED)
    raw = decode_raw(topic, payload)
    verify_control(raw, key.public_key(), node="gw-a", kind=DESIRED_KIND)
    assert raw["generation"] == generation  # the same document, so agents that applied it see a replay
    assert raw["config"] == {"mode": "eco"}
    assert upgraded.counters["resigned"] == 1
    assert bytes(db.query("SELECT document FROM desired_state WHERE node = 'gw-a'")[0][0]) == payload

    # Signed already with this key: republished byte for byte, nothing rewritten.
    upgraded.republish_all()
    assert sent.messages[-1][1] == payload
    assert upgraded.counters["resigned"] == 1

    # A new control key: everything stored is signed again with it.
    new_key = Ed25519PrivateKey.generate()
    rotated = DesiredPublisher(db, sent, signing_key=new_key)
    rotated.republish_all()
    verify_control(decode_raw("t", sent.messages[-1][1]), new_key.public_key(), node="gw-a", kind=DESIRED_KIND)


def test_every_command_is_signed_for_its_node_with_its_expiry(db: Database, key: Ed25519PrivateKey) -> None:
    sent = Sent()
    clock = [5000.0]
    tracker = CommandTracker(db, sent, clock=lambda: clock[0], signing_key=key, resend_after=1.0, jitter=0.0)
    view = tracker.send("gw-a", "restart", expires_in=600)
    topic, payload = sent.messages[0]
    raw = decode_raw(topic, payload)
    verify_control(raw, key.public_key(), node="gw-a", kind=COMMAND_KIND)
    assert (raw["id"], raw["issued_at"], raw["expires_at"]) == (view.id, 5000, 5600)
    clock[0] += 2.0
    assert tracker.resend_due() == 1
    assert sent.messages[1] == (topic, payload)  # a resend is byte-identical: same issue time, same signature


def test_device_clock_offsets_are_the_highest_recent_sample(caplog: pytest.LogCaptureFixture) -> None:
    clocks = DeviceClocks(warn_after=300.0, window=600.0)
    assert clocks.offset("gw-a") is None
    clocks.observe("gw-a", None, 1000.0)  # unstamped (the last will): nothing
    assert clocks.offset("gw-a") is None
    with caplog.at_level(logging.INFO, logger="fleet.controller.clocks"):
        clocks.observe("gw-a", 1000.0 + 3600.0, 1000.2)
        clocks.observe("gw-a", 1000.0 + 3000.0, 1001.0)  # waited ten minutes in the outbox: a lower bound
        assert clocks.offset("gw-a") == pytest.approx(3599.8)
        clocks.observe("gw-a", 1000.0 + 3600.0, 1001.5)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once when it crosses the threshold
        assert "gw-a: clock ahead by 3600s" in warnings[0].getMessage()
        # Its clock was set right: after the window the old samples no longer count.
        clocks.observe("gw-a", 2000.0, 2000.0)
        assert clocks.offset("gw-a") == 0.0
        assert any("within 300s of the controller's again" in r.getMessage() for r in caplog.records)
    clocks.observe("gw-b", 0.0, 1000.0)
    clocks.observe("gw-c", 1000.0 + 10.0, 1000.0)
    assert clocks.summary() == (10.0, 1000.0, 1)
    families = {family.name: family for family in ClockCollector(clocks).collect()}
    offset = families["fleet_device_clock_offset_seconds"]
    assert {sample.labels["direction"]: sample.value for sample in offset.samples} == {"ahead": 10.0, "behind": 1000.0}
    assert families["fleet_device_clock_skewed_nodes"].samples[0].value == 1


def test_fleet_sign_prints_a_command_signed_for_the_node(pki: Pki) -> None:
    result = CliRunner().invoke(
        sign_cmd_app(),
        ["gw-a", "rollback", "--certs", str(pki.paths.root), "--arg", "to=1.1.0", "--expires-in", "5m", "--id", "rb-7"],
    )
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    raw = json.loads(line)
    verify_control(raw, load_control_key(pki.paths).public_key(), node="gw-a", kind=COMMAND_KIND)
    assert (raw["id"], raw["action"], raw["args"]) == ("rb-7", "rollback", {"to": "1.1.0"})
    assert raw["expires_at"] - raw["issued_at"] == pytest.approx(300.0)


def test_fleet_sign_without_a_control_key_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(sign_cmd_app(), ["gw-a", "ping", "--certs", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().endswith("adds it to an existing PKI)")
    assert "control.key: not found" in result.output


def sign_cmd_app() -> Any:
    import typer

    app = typer.Typer()
    app.command()(sign_cmd.sign)
    return app


# ---- real processes: an upgrade with unsigned desired state retained on the broker ---------------


def test_unsigned_desired_state_left_by_an_older_controller_is_signed_on_start(
    broker: Endpoint, pki: Pki, tmp_path: Path
) -> None:
    database = tmp_path / "fleet.db"
    identity = pki.own_controller(CONTROLLER)
    old_db = Database(database)
    mqtt = FleetMqtt(broker.host, broker.port, identity, options=MqttOptions(reconnect_max=2))
    mqtt.start()
    try:
        # The controller before signatures: its documents are unsigned, on the broker and in its database.
        generation = DesiredPublisher(old_db, mqtt.publish).publish_config("gw-a", {"labels": {"ring": "upgraded"}})
    finally:
        mqtt.close()
        old_db.close()

    agent = AgentProcess("gw-a", broker, pki.device("gw-a"), tmp_path / "agent")
    with connected(broker, pki.operator("alice")) as operator:
        operator.subscribe("fleet/v1/nodes/gw-a/#")
        try:
            agent.start()
            # The upgraded agent refuses what the old controller left retained...
            operator.expect(
                lambda m: (
                    m.topic == node_topic("gw-a", Channel.EVENTS)
                    and decode(m.topic, m.payload, Event).kind == "desired_rejected"
                ),
                20,
            )
            settings = ControllerSettings(
                broker=BrokerSettings(host=broker.host, port=broker.port, certs=pki.paths.root, identity=CONTROLLER),
                storage=StorageSettings(db=database),
                releases=ReleaseSettings(store=tmp_path / "store"),
            )
            controller = Controller(settings)
            controller.start()
            try:
                # ...and applies the same generation once the upgraded controller has signed it again.
                message = operator.expect(
                    lambda m: (
                        m.topic == node_topic("gw-a", Channel.REPORTED)
                        and decode(m.topic, m.payload, Reported).generation == generation
                    ),
                    30,
                )
                assert decode(message.topic, message.payload, Reported).labels["ring"] == "upgraded"
                assert controller.desired.counters["resigned"] == 1
                retained: list[DesiredState] = []
                with connected(broker, pki.operator()) as reader:
                    reader.subscribe(node_topic("gw-a", Channel.DESIRED))
                    got = reader.expect(lambda m: m.topic == node_topic("gw-a", Channel.DESIRED), 10)
                    verify_control(
                        decode_raw(got.topic, got.payload),
                        load_control_key(pki.paths).public_key(),
                        node="gw-a",
                        kind=DESIRED_KIND,
                    )
                    retained.append(decode(got.topic, got.payload, DesiredState))
                assert retained[0].generation == generation
                wait_until(lambda: controller.registry.known("gw-a"), 10, "the controller hears gw-a")
            finally:
                controller.stop()
        finally:
            agent.stop()
