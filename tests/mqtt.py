"""Test-side MQTT helpers: a paho client that records what it receives, and deadline-based waits."""

from __future__ import annotations

import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

# paho reports an MQTT 3.1.1 CONNACK return code as the MQTT 5 reason code of the same meaning.
_V311_CONNACK = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
CONNACK_ACCEPTED = 0
CONNACK_NOT_AUTHORIZED = 5


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "amqtt" or "mosquitto"
    host: str
    port: int


@dataclass(frozen=True)
class Credentials:
    ca: Path
    cert: Path | None
    key: Path | None


def wait_until(predicate: Callable[[], bool], timeout: float, message: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    if not predicate():
        raise AssertionError(f"timed out after {timeout}s waiting for: {message}")


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class MqttClient:
    """A paho client with a received-message queue and connect/disconnect events."""

    endpoint: Endpoint
    creds: Credentials
    client_id: str = ""
    clean_session: bool = True
    keepalive: int = 30
    will: tuple[str, bytes, int, bool] | None = None
    manual_ack: bool = False  # never PUBACK: the broker must treat every QoS-1 delivery as in flight
    messages: queue.Queue[Received] = field(default_factory=queue.Queue)
    connack: queue.Queue[int] = field(default_factory=queue.Queue)
    disconnected: threading.Event = field(default_factory=threading.Event)
    subacks: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    seen: list[Received] = field(default_factory=list)
    connack_code: int | None = None  # the CONNACK return code of the last try_connect (None: none came)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.clean_session,
            protocol=mqtt.MQTTv311,
            manual_ack=self.manual_ack,
        )
        context = ssl.create_default_context(cafile=str(self.creds.ca))
        if self.creds.cert is not None and self.creds.key is not None:
            context.load_cert_chain(str(self.creds.cert), str(self.creds.key))
        self.client.tls_set_context(context)
        if self.will is not None:
            topic, payload, qos, retain = self.will
            self.client.will_set(topic, payload, qos, retain)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        code = int(getattr(reason, "value", reason))  # type: ignore[call-overload]
        self.connack.put(_V311_CONNACK.get(code, code))

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self.disconnected.set()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reasons: list[object], props: object
    ) -> None:
        self.subacks.put([int(getattr(r, "value", r)) for r in reasons])  # type: ignore[call-overload]

    def try_connect(self, timeout: float = 10.0) -> bool:
        """True when the broker accepted us; False on a refused handshake, CONNACK or early close."""
        try:
            self.client.connect(self.endpoint.host, self.endpoint.port, keepalive=self.keepalive)
        except (ssl.SSLError, OSError):
            return False
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.connack_code = self.connack.get(timeout=0.05)
            except queue.Empty:
                if self.disconnected.is_set():
                    return False
                continue
            return self.connack_code == 0
        return False

    def connect(self, timeout: float = 10.0) -> MqttClient:
        assert self.try_connect(timeout), f"{self.client_id or 'client'} could not connect to {self.endpoint}"
        return self

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> list[int]:
        self.client.subscribe(topic_filter, qos)
        return self.subacks.get(timeout=timeout)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(timeout)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def expect(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        """Next message matching predicate; others are kept in `seen` for later assertions."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching message within {timeout}s; last seen {[m.topic for m in self.seen[-15:]]}"
                )
            try:
                message = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(message)
            if predicate(message):
                return message

    def drain(self, settle: float = 0.0) -> list[Received]:
        if settle:
            time.sleep(settle)
        while True:
            try:
                self.seen.append(self.messages.get_nowait())
            except queue.Empty:
                return self.seen

    def cut(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash or a dead link would."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
            wait_until(self.disconnected.is_set, 5, "clean disconnect")
        self.client.loop_stop()


@contextmanager
def connected(endpoint: Endpoint, creds: Credentials, **options: object) -> Iterator[MqttClient]:
    client = MqttClient(endpoint, creds, **options)  # type: ignore[arg-type]
    client.connect()
    try:
        yield client
    finally:
        client.close()
