"""The access-policy matrix of DESIGN.md section 3, run unchanged against amqtt and Mosquitto.

Tests named ``test_defect_N_...`` are the regression tests for the amqtt 0.12.1 defects listed in
broker/embedded.py; they run on Mosquitto too, since both brokers must behave the same.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from certs import revoke
from fleet.protocol.topics import DEVICE_SUBSCRIBES, Channel, node_topic
from tests.conftest import Pki
from tests.mqtt import (
    CONNACK_ACCEPTED,
    CONNACK_NOT_AUTHORIZED,
    Endpoint,
    MqttClient,
    Received,
    connected,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def cmd(node: str) -> str:
    return node_topic(node, Channel.CMD)


def on(topic: str):  # type: ignore[no-untyped-def]
    return lambda message: message.topic == topic


def persistent_device(broker: Endpoint, pki: Pki, node: str, **options: object) -> MqttClient:
    return MqttClient(broker, pki.device(node), client_id=node, clean_session=False, **options)  # type: ignore[arg-type]


def test_defect_1_client_without_certificate_is_refused(broker: Endpoint, pki: Pki) -> None:
    client = MqttClient(broker, pki.no_certificate())
    try:
        assert not client.try_connect()
    finally:
        client.close()


@pytest.mark.parametrize("who", ["foreign-ca", "revoked", "expired"])
def test_untrusted_certificates_are_refused(broker: Endpoint, pki: Pki, who: str) -> None:
    creds = {
        "foreign-ca": pki.foreign_device("gw-a"),
        "revoked": pki.device("gw-revoked"),
        "expired": pki.device("gw-expired"),
    }[who]
    client = MqttClient(broker, creds)
    try:
        assert not client.try_connect()
    finally:
        client.close()


def test_device_cannot_publish_to_another_device(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.controller()) as controller, connected(broker, pki.device("gw-a")) as device:
        controller.subscribe("fleet/v1/#")
        device.publish(node_topic("gw-b", Channel.REPORTED), b"forged")
        device.publish(node_topic("gw-b", Channel.STATUS), b"forged")
        device.publish(node_topic("gw-a", Channel.DESIRED), b"forged: devices never write desired")
        device.publish(node_topic("gw-a", Channel.EVENTS), b"allowed")
        controller.expect(on(node_topic("gw-a", Channel.EVENTS)))
        assert [m.topic for m in controller.drain(settle=0.3)] == [node_topic("gw-a", Channel.EVENTS)]


def test_device_cannot_read_another_devices_commands(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.controller()) as controller, connected(broker, pki.device("gw-a")) as device:
        device.subscribe(cmd("gw-b"))
        device.subscribe("fleet/v1/nodes/+/cmd")
        device.subscribe(cmd("gw-a"))
        controller.publish(cmd("gw-b"), b"for b")
        controller.publish(cmd("gw-a"), b"for a")
        device.expect(on(cmd("gw-a")))
        assert [m.payload for m in device.drain(settle=0.3)] == [b"for a"]


def test_denied_subscription_gets_a_failure_code_on_the_embedded_broker(embedded: Endpoint, pki: Pki) -> None:
    # Mosquitto grants every SUBSCRIBE and filters at delivery; amqtt tells the client.
    with connected(embedded, pki.device("gw-a")) as device:
        assert device.subscribe(cmd("gw-b")) == [0x80]
        assert device.subscribe(cmd("gw-a")) == [1]


def test_defect_2_client_id_is_the_certificate_cn(broker: Endpoint, pki: Pki) -> None:
    """B's certificate with client id gw-a and clean_session=0 must not get A's session."""
    a = persistent_device(broker, pki, "gw-a").connect()
    a.subscribe(cmd("gw-a"))
    a.close()
    with connected(broker, pki.controller()) as controller:
        controller.publish(cmd("gw-a"), b"queued for a")
    impostor = MqttClient(broker, pki.device("gw-b"), client_id="gw-a", clean_session=False).connect()
    impostor.close()
    assert impostor.drain(settle=0.3) == []
    a = persistent_device(broker, pki, "gw-a").connect()
    try:
        assert a.expect(on(cmd("gw-a"))).payload == b"queued for a"
    finally:
        a.close()


def test_defect_2_impostor_cannot_kick_a_live_device(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.device("gw-a"), client_id="gw-a") as a:
        impostor = MqttClient(broker, pki.device("gw-b"), client_id="gw-a").connect()
        impostor.close()
        time.sleep(0.3)
        assert a.client.is_connected() and not a.disconnected.is_set()


def test_defect_3_refused_impostor_leaves_the_session_alone(embedded: Endpoint, pki: Pki) -> None:
    """A certificate from the right CA but with no usable identity is refused before any session is touched."""
    a = persistent_device(embedded, pki, "gw-a").connect()
    a.subscribe(cmd("gw-a"))
    a.close()
    with connected(embedded, pki.controller()) as controller:
        controller.publish(cmd("gw-a"), b"keep me")
    # server.pem is signed by our CA but is no client identity (role server).
    impostor = MqttClient(embedded, pki.server_as_client(), client_id="gw-a", clean_session=True)
    try:
        assert not impostor.try_connect()
    finally:
        impostor.close()
    a = persistent_device(embedded, pki, "gw-a").connect()
    try:
        assert a.expect(on(cmd("gw-a"))).payload == b"keep me"
    finally:
        a.close()


def test_defect_4_no_retained_leak_between_devices(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.controller()) as controller:
        controller.publish(node_topic("gw-b", Channel.DESIRED), b"desired of b", retain=True)
        controller.publish(node_topic("gw-a", Channel.DESIRED), b"desired of a", retain=True)
    # A persistent session with a subscription in place, then a reconnect: amqtt used to push
    # every retained message matching any subscription in the broker here.
    with connected(broker, pki.operator()) as operator:
        operator.subscribe("fleet/v1/#")
        device = persistent_device(broker, pki, "gw-a").connect()
        device.subscribe("fleet/v1/nodes/+/desired")
        device.subscribe(node_topic("gw-a", Channel.DESIRED))
        assert device.expect(on(node_topic("gw-a", Channel.DESIRED))).payload == b"desired of a"
        device.close()
        device = persistent_device(broker, pki, "gw-a").connect()
        device.close()
        assert all(m.topic.startswith("fleet/v1/nodes/gw-a/") for m in device.drain(settle=0.3))


@pytest.mark.parametrize("first_clean", [True, False])
def test_offline_qos1_queue_across_reconnect(broker: Endpoint, pki: Pki, first_clean: bool) -> None:
    """Defects 5 and 6: a persistent session queues QoS-1 commands while offline, in order,
    also right after a clean session of the same id (amqtt reused its clean flag)."""
    if first_clean:
        MqttClient(broker, pki.device("gw-a"), client_id="gw-a", clean_session=True).connect().close()
    device = persistent_device(broker, pki, "gw-a").connect()
    device.subscribe(cmd("gw-a"))
    device.close()
    with connected(broker, pki.controller()) as controller:
        for index in range(20):
            controller.publish(cmd("gw-a"), f"c{index}".encode())
    time.sleep(1.5)  # past amqtt's 1 s session reaper, which dropped the inherited-clean session
    device = persistent_device(broker, pki, "gw-a").connect()
    try:
        wait_until(lambda: len(device.drain()) >= 20, 15, "20 queued commands")
        assert [m.payload for m in device.seen] == [f"c{i}".encode() for i in range(20)]
    finally:
        device.close()


def test_defect_9_unacknowledged_qos1_message_is_redelivered_after_reconnect(broker: Endpoint, pki: Pki) -> None:
    """amqtt #401: a QoS-1 delivery in flight when the link died was lost for good."""
    device = persistent_device(broker, pki, "gw-a", manual_ack=True).connect()
    device.subscribe(cmd("gw-a"))
    with connected(broker, pki.controller()) as controller:
        controller.publish(cmd("gw-a"), b"in flight")
        assert device.expect(on(cmd("gw-a"))).payload == b"in flight"
        device.cut()  # no PUBACK was ever sent
    device = persistent_device(broker, pki, "gw-a").connect()
    try:
        assert device.expect(on(cmd("gw-a"))).payload == b"in flight"
    finally:
        device.close()


def test_last_will_on_a_cut_connection(broker: Endpoint, pki: Pki) -> None:
    status = node_topic("gw-a", Channel.STATUS)
    with connected(broker, pki.controller()) as controller:
        controller.subscribe(status)
        device = MqttClient(broker, pki.device("gw-a"), will=(status, b"offline", 1, True)).connect()
        device.publish(status, b"online", retain=True)
        controller.expect(lambda m: m.payload == b"online")
        device.cut()
        controller.expect(lambda m: m.payload == b"offline")
    with connected(broker, pki.operator()) as operator:
        operator.subscribe(status)
        assert operator.expect(on(status)).payload == b"offline"


def test_defect_8_keepalive_expiry_fires_the_last_will(broker: Endpoint, pki: Pki) -> None:
    """A half-open link (no packets, no FIN) must be noticed within 1.5 keepalive periods."""
    status = node_topic("gw-a", Channel.STATUS)
    with connected(broker, pki.controller()) as controller:
        controller.subscribe(status)
        device = MqttClient(broker, pki.device("gw-a"), keepalive=1, will=(status, b"gone", 1, False)).connect()
        device.client.loop_stop()  # the socket stays open but nothing is sent any more
        started = time.monotonic()
        controller.expect(lambda m: m.payload == b"gone", timeout=15)
        assert time.monotonic() - started < 10


def test_takeover_by_the_same_identity(broker: Endpoint, pki: Pki) -> None:
    status = node_topic("gw-a", Channel.STATUS)
    with connected(broker, pki.controller()) as controller:
        controller.subscribe(status)
        first = MqttClient(broker, pki.device("gw-a"), will=(status, b"offline", 1, True)).connect()
        second = MqttClient(broker, pki.device("gw-a")).connect()
        wait_until(first.disconnected.is_set, 10, "first connection closed by the takeover")
        second.publish(status, b"online", retain=True)
        controller.expect(lambda m: m.payload == b"online")
        second.close()
        first.client.loop_stop()
    with connected(broker, pki.operator()) as operator:
        operator.subscribe(status)
        assert operator.expect(on(status)).payload == b"online", "the old will must not land after the new status"


def test_operator_sends_commands_but_cannot_write_desired_state(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.controller()) as controller, connected(broker, pki.operator("alice")) as alice:
        controller.subscribe("fleet/v1/#")
        alice.publish(node_topic("gw-a", Channel.DESIRED), b"forged desired")
        alice.publish(cmd("gw-a"), b"ping")
        controller.expect(on(cmd("gw-a")))
        assert [m.topic for m in controller.drain(settle=0.3)] == [cmd("gw-a")]


def test_oversize_packet_closes_the_connection(broker: Endpoint, pki: Pki) -> None:
    with connected(broker, pki.controller()) as controller:
        controller.subscribe("fleet/v1/#")
        device = MqttClient(broker, pki.device("gw-a")).connect()
        device.client.publish(node_topic("gw-a", Channel.EVENTS), b"x" * (1024 * 1024), qos=1)
        wait_until(device.disconnected.is_set, 10, "broker closes the connection")
        device.client.loop_stop()
        assert controller.drain(settle=0.3) == []


def test_mosquitto_clients_with_the_operator_certificate(broker: Endpoint, pki: Pki) -> None:
    """The README recipe: JSON commands with mosquitto_pub, reading with mosquitto_sub (no -i)."""
    tls = [
        "--cafile",
        str(pki.paths.ca_cert),
        "--cert",
        str(pki.paths.operator_cert),
        "--key",
        str(pki.paths.operator_key),
    ]
    where = ["-h", broker.host, "-p", str(broker.port)]
    with connected(broker, pki.device("gw-a")) as device:
        device.subscribe(cmd("gw-a"))
        device.publish(node_topic("gw-a", Channel.STATUS), b"online", retain=True)
        subprocess.run(
            ["mosquitto_pub", *tls, *where, "-q", "1", "-t", cmd("gw-a"), "-m", '{"id":"c1","action":"ping"}'],
            check=True,
            timeout=20,
        )
        assert device.expect(on(cmd("gw-a"))).payload == b'{"id":"c1","action":"ping"}'
    read = subprocess.run(
        ["mosquitto_sub", *tls, *where, "-t", node_topic("gw-a", Channel.STATUS), "-C", "1", "-W", "10"],
        check=True,
        capture_output=True,
        timeout=20,
    )
    assert read.stdout.strip() == b"online"


def test_embedded_broker_disconnects_a_device_revoked_while_connected(embedded: Endpoint, pki: Pki) -> None:
    device = MqttClient(embedded, pki.device("gw-late")).connect()
    again = MqttClient(embedded, pki.device("gw-late"))
    try:
        revoke(pki.paths, "gw-late")
        wait_until(device.disconnected.is_set, 10, "revoked device disconnected")
        device.client.loop_stop()
        assert not again.try_connect()
    finally:
        device.client.loop_stop()
        again.close()  # its network thread would keep trying to reconnect


# ---- last will (issue 11) ------------------------------------------------------------------------
#
# A will is a publish the broker makes on the client's behalf after the client is gone, so it must
# pass the same ACL as the client's own PUBLISH. What a broker does with a denied will at CONNECT
# differs: the embedded broker refuses the connection (CONNACK 5) so a denied will is never
# stored; Mosquitto 2.0 accepts the connection and drops the will when it would be sent
# (context__send_will checks the ACL then). Either way nothing may ever be delivered or retained.
DENIED_WILL_CONNACK = {"amqtt": CONNACK_NOT_AUTHORIZED, "mosquitto": CONNACK_ACCEPTED}
FORGED = b"forged will"
NO_WILL_WITHIN = 2.0  # seconds a subscriber waits for a will that must not come


def _payloads(messages: list[Received], topic: str) -> list[bytes]:
    return [m.payload for m in messages if m.topic == topic]


@pytest.mark.parametrize("retain", [False, True], ids=["plain", "retained"])
@pytest.mark.parametrize("channel", [Channel.DESIRED, Channel.CMD, Channel.REPORTED, Channel.STATUS], ids=str)
def test_defect_10_will_on_another_devices_topic_is_never_published(
    broker: Endpoint, pki: Pki, channel: Channel, retain: bool
) -> None:
    """gw-b sets its will on gw-a's topic and drops the link without DISCONNECT: nobody gets it."""
    topic = node_topic("gw-a", channel)
    genuine = f"genuine {channel}".encode()
    with connected(broker, pki.controller()) as controller, connected(broker, pki.device("gw-a")) as victim:
        if retain:
            controller.publish(topic, genuine, retain=True)  # what the forged will would overwrite
        listeners = [controller, victim] if channel in DEVICE_SUBSCRIBES else [controller]
        for listener in listeners:
            listener.subscribe(topic)
        attacker = MqttClient(broker, pki.device("gw-b"), will=(topic, FORGED, 1, retain))
        try:
            attacker.try_connect()
        finally:
            attacker.cut()
        time.sleep(NO_WILL_WITHIN)
        for listener in listeners:
            assert FORGED not in _payloads(listener.drain(), topic), f"{topic}: forged will delivered"
    if retain:
        with connected(broker, pki.operator()) as fresh:
            fresh.subscribe(topic)
            fresh.expect(on(topic))
            assert _payloads(fresh.drain(settle=0.3), topic) == [genuine], f"{topic}: retained message replaced"
    assert attacker.connack_code == DENIED_WILL_CONNACK[broker.kind]


@pytest.mark.parametrize("retain", [False, True], ids=["plain", "retained"])
def test_will_on_own_status_is_delivered(broker: Endpoint, pki: Pki, retain: bool) -> None:
    """The positive case: offline status works through a device's will on its own status topic."""
    status = node_topic("gw-b", Channel.STATUS)
    with connected(broker, pki.controller()) as controller:
        controller.subscribe(status)
        device = MqttClient(broker, pki.device("gw-b"), will=(status, b"offline", 1, retain)).connect()
        device.cut()
        assert controller.expect(on(status)).payload == b"offline"
    with connected(broker, pki.operator()) as fresh:
        fresh.subscribe(status)
        if retain:
            assert fresh.expect(on(status)).payload == b"offline"
        assert _payloads(fresh.drain(settle=0.3), status) == ([b"offline"] if retain else [])


def test_operators_will_on_desired_state_is_never_published(broker: Endpoint, pki: Pki) -> None:
    """Not only devices: an operator may write commands only, so its will may not set desired state."""
    topic = node_topic("gw-a", Channel.DESIRED)
    with connected(broker, pki.controller()) as controller:
        controller.subscribe(topic)
        attacker = MqttClient(broker, pki.operator("alice"), will=(topic, FORGED, 1, True))
        try:
            attacker.try_connect()
        finally:
            attacker.cut()
        time.sleep(NO_WILL_WITHIN)
        assert _payloads(controller.drain(), topic) == []
    assert attacker.connack_code == DENIED_WILL_CONNACK[broker.kind]


def test_will_topic_with_a_wildcard_is_refused(broker: Endpoint, pki: Pki) -> None:
    """A will topic is a topic name (MQTT-3.1.3-10 via 3.3.2-2): no wildcards, whoever sets it."""
    topic = node_topic("gw-a", Channel.DESIRED)
    with connected(broker, pki.operator()) as operator:
        operator.subscribe("fleet/v1/#")
        attacker = MqttClient(broker, pki.controller(), will=(topic, FORGED, 1, True))
        attacker.client._will_topic = b"fleet/v1/nodes/+/desired"  # paho refuses to set it otherwise
        try:
            assert not attacker.try_connect()
        finally:
            attacker.cut()
        time.sleep(NO_WILL_WITHIN)
        assert [m.payload for m in operator.drain()] == []


def test_refused_will_leaves_the_live_connection_and_session_alone(embedded: Endpoint, pki: Pki) -> None:
    """The will is checked before any takeover: a refused CONNECT does not kick the live device."""
    with connected(embedded, pki.device("gw-b"), client_id="gw-b") as live:
        second = MqttClient(embedded, pki.device("gw-b"), will=(node_topic("gw-a", Channel.DESIRED), FORGED, 1, True))
        try:
            assert not second.try_connect()
            assert second.connack_code == CONNACK_NOT_AUTHORIZED
        finally:
            second.cut()
        time.sleep(0.3)
        assert live.client.is_connected() and not live.disconnected.is_set()
