"""The fleet side's only contact with paho-mqtt: one mutual-TLS connection shared by its services.

Unlike the agent's transport, this one lets paho run everything: its own network thread
(``loop_start``) and its own automatic reconnect with capped exponential backoff. What it adds:

- the first connection is checked: ``start`` retries until a deadline and then raises a
  ``TransportError`` naming the broker and the last failure, so a CLI can print one clear line;
- every subscription is registered here and re-sent on every (re)connect, so services survive a
  broker restart without noticing (with ``clean_session=False`` the broker usually still has them,
  but a restarted broker without persistence does not);
- inbound messages go to the handler of each matching filter on paho's thread; a handler that
  raises is logged with the topic and counted, and never stops paho's thread (paho would let the
  exception end its loop).

Handlers must return quickly: they run on the network thread, which also sends PUBACKs and pings.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from fleet.protocol.errors import ConfigError, TransportError
from fleet.protocol.topics import topic_matches

log = logging.getLogger(__name__)

_FIRST_RETRY = 0.25
"""Seconds between first connection attempts: short, since a broker started with us is up in moments."""

Handler = Callable[[str, bytes], None]
_SHARE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class _Subscription:
    qos: int
    handler: Handler
    replays: Handler
    wire: str  # what is sent to the broker: the filter, or $share/<group>/<filter>


"""Called with (topic, payload) for every message on a matching filter."""


@dataclass(frozen=True)
class TlsIdentity:
    """The PKI files of one MQTT client: the CA to trust and our own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def common_name(self) -> str:
        """The certificate's subject CN: the client id the broker will force on us anyway."""
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{self.cert}: cannot read certificate: {exc.strerror}") from exc
        except ValueError as exc:
            raise ConfigError(f"{self.cert}: not a PEM certificate: {exc}") from exc
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or not isinstance(names[0].value, str):
            raise ConfigError(f"{self.cert}: expected exactly one subject CN")
        return names[0].value

    def ssl_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(self.ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.cert), str(self.key))
        except FileNotFoundError as exc:
            raise ConfigError(f"{exc.filename}: no such file") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS identity {self.cert} / {self.key} (CA {self.ca}): {exc}") from exc
        return context


@dataclass(frozen=True)
class MqttOptions:
    """Connection tuning; the defaults suit a controller on a LAN or loopback."""

    keepalive: int = 30
    connect_timeout: float = 10.0
    """How long ``start`` keeps trying before it gives up with a ``TransportError``."""
    reconnect_min: int = 1
    reconnect_max: int = 30
    """Seconds between reconnect attempts: paho doubles the delay from min up to max, reset on success."""
    max_inflight: int = 20
    max_queued: int = 0
    """QoS>0 messages paho keeps while disconnected or beyond the inflight window; 0 = unbounded."""
    clean_session: bool = False
    """False: the broker queues our QoS-1 messages while we are away. Members of a shared
    subscription want True: Mosquitto keeps handing an absent persistent member its share (queued
    for it), so a dead controller would swallow half the fleet's messages until it came back."""


class FleetMqtt:
    """One persistent mutual-TLS MQTT 3.1.1 session, run by paho's own thread."""

    def __init__(
        self,
        host: str,
        port: int,
        identity: TlsIdentity,
        *,
        client_id: str | None = None,
        options: MqttOptions | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options or MqttOptions()
        self.client_id = client_id if client_id is not None else identity.common_name()
        self.connected = threading.Event()
        self.handler_errors = 0
        self.connects = 0
        self._lock = threading.Lock()
        self._handlers: dict[str, _Subscription] = {}  # by topic filter (without any $share prefix)
        self._last_error = "no answer yet"
        self._refused: str | None = None
        self._started = False
        self._client = self._new_client(identity.ssl_context())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _new_client(self, context: ssl.SSLContext) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.options.clean_session,
            protocol=mqtt.MQTTv311,
        )
        client.tls_set_context(context)
        client.reconnect_delay_set(self.options.reconnect_min, self.options.reconnect_max)
        client.max_inflight_messages_set(self.options.max_inflight)
        client.max_queued_messages_set(self.options.max_queued)
        client.connect_timeout = self.options.connect_timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = _set_nodelay
        return client

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (retrying until ``connect_timeout``), then leave the session to paho's thread.

        Raises ``TransportError`` naming the broker and the last failure if no CONNACK was
        accepted in time, or at once if the broker refused us (a refusal will not go away).
        """
        deadline = time.monotonic() + self.options.connect_timeout
        self._first_connect(deadline)
        self._started = True
        self._client.loop_start()
        while not self.connected.wait(0.05):
            if self._refused is not None or time.monotonic() >= deadline:
                reason = self._refused or self._last_error
                self.close()
                raise TransportError(f"cannot connect to MQTT broker {self.address}: {reason}")

    def _first_connect(self, deadline: float) -> None:
        """The TCP + TLS part of the first connection, retried: the broker may still be starting."""
        while True:
            try:
                self._client.connect(self.host, self.port, keepalive=self.options.keepalive)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self._last_error = str(exc) or type(exc).__name__
                if time.monotonic() + _FIRST_RETRY >= deadline:
                    raise TransportError(f"cannot connect to MQTT broker {self.address}: {self._last_error}") from exc
                log.debug("connect to %s failed (%s); retrying", self.address, self._last_error)
                time.sleep(_FIRST_RETRY)
            else:
                return

    def close(self, timeout: float = 5.0) -> None:
        """DISCONNECT and stop paho's thread (bounded: a dead link must not hang shutdown)."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        stopper = threading.Thread(target=self._client.loop_stop, name=f"mqtt-stop-{self.client_id}", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("paho thread of %s did not stop within %.1fs", self.client_id, timeout)
        self.connected.clear()

    # ---- subscriptions ---------------------------------------------------------------------

    def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        qos: int = 1,
        *,
        replays: Handler | None = None,
        share: str | None = None,
    ) -> None:
        """Deliver messages on ``topic_filter`` to ``handler``; kept across reconnects.

        ``replays``, when given, gets the retained messages the broker replays on (re)subscribing
        instead: those are old news (a dead node's last words replay on every controller restart),
        not signs of life. ``share`` subscribes as ``$share/<share>/<filter>``: the broker hands
        each message to one member of the group (Mosquitto and EMQX do this for MQTT 3.1.1 too).
        """
        topic_matches(topic_filter, "x")  # refuses a malformed filter here, not at the broker
        if share is not None and not _SHARE_NAME.fullmatch(share):
            raise ConfigError(f"share group {share!r}: 1-64 letters, digits, '-' or '_'")
        wire = topic_filter if share is None else f"$share/{share}/{topic_filter}"
        with self._lock:
            self._handlers[topic_filter] = _Subscription(qos, handler, replays or handler, wire)
        if self.connected.is_set():
            self._send_subscribe([(wire, qos)])

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            known = self._handlers.pop(topic_filter, None)
        if known is not None and self.connected.is_set():
            self._client.unsubscribe(known.wire)

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        if not filters:
            return
        result, _mid = self._client.subscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            # Not connected after all: on_connect subscribes again once the link is back.
            log.warning("subscribe to %s failed: %s", [f for f, _ in filters], mqtt.error_string(result))

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """Hand a message to paho. QoS>0 messages published while disconnected are sent after reconnect."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"publish to {topic}: outgoing queue full ({self.options.max_queued} messages)")
        return info

    @staticmethod
    def wait_published(info: mqtt.MQTTMessageInfo, timeout: float) -> bool:
        """True once the broker acknowledged the message (QoS 1) or it was written (QoS 0).

        False on timeout or when the message was not sent on the current connection (paho keeps it
        and retries after a reconnect, but its ``MQTTMessageInfo`` can no longer tell us).
        """
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        try:
            info.wait_for_publish(timeout)
            return info.is_published()
        except (RuntimeError, ValueError):
            return False

    # ---- paho callbacks (on paho's thread) -------------------------------------------------

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        if reason.is_failure:
            # A refused CONNACK (bad identity, not authorised) will not improve by retrying now.
            self._refused = f"broker refused the connection: {reason}"
            log.warning("%s refused %s: %s", self.address, self.client_id, reason)
            return
        with self._lock:
            filters = [(sub.wire, sub.qos) for sub in self._handlers.values()]
        self._send_subscribe(filters)
        self.connects += 1
        self._refused = None
        self.connected.set()
        log.info("connected to %s as %s (%d subscriptions)", self.address, self.client_id, len(filters))

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: ReasonCode,
        _props: object,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._last_error = f"connection closed ({reason})"
        if self.connects == 0:
            # With TLS 1.3 a refused client certificate shows up only here, after the handshake.
            self._last_error += " before CONNACK: does the broker trust this certificate (same CA, not revoked)?"
        if was_connected and self._started:
            log.warning("lost connection to %s (%s); paho reconnects", self.address, reason)

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        payload = bytes(message.payload)
        # The retain flag is set only on messages replayed from the broker's retained store.
        replayed = bool(message.retain)
        with self._lock:
            handlers = [
                sub.replays if replayed else sub.handler
                for flt, sub in self._handlers.items()
                if topic_matches(flt, topic)
            ]
        for handler in handlers:
            self._dispatch(handler, topic, payload)

    def _dispatch(self, handler: Handler, topic: str, payload: bytes) -> None:
        try:
            handler(topic, payload)
        except Exception:
            # Deliberately broad: an exception escaping here would end paho's network thread.
            self.handler_errors += 1
            log.exception("handler %r failed on %s", handler, topic)


def _set_nodelay(_client: mqtt.Client, _userdata: object, sock: object) -> None:
    """Turn Nagle off: paho does not, and a small PUBACK or request then waits for a delayed ACK (~40 ms)."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    try:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP (a unix socket or a proxy wrapper): nothing to tune
        log.debug("cannot set TCP_NODELAY: %s", exc)
