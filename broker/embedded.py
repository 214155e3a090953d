"""The embedded broker: amqtt 0.12.1 with mutual TLS, certificate identities and the fleet ACL.

The stock amqtt broker, measured on 0.12.1, is unsafe for a fleet in ways its plugin API cannot
fix, so ``FleetBroker`` overrides the session handling itself. Each override names the defect it
closes; tests/broker/ holds the regression tests (``test_defect_N_*``, most on both brokers):

1. TLS accepted clients without a certificate (``CERT_OPTIONAL`` hard-coded).
2. A persistent-session resume authenticated with the *previous* connection's certificate.
3. An existing session was deleted or taken over *before* the newcomer was authenticated.
4. Every CONNECT got every retained message matching any subscription in the broker, unchecked.
5. A persistent session resumed within ~1 s of a clean one inherited ``clean_session`` and lost
   its offline queue.
6. Sessions without a username counted as anonymous and got no offline queue.
7. A secondary listener silently copied unset fields from the default listener.
8. Keepalive was never enforced (``handle_read_timeout`` is a no-op): half-open clients stayed
   "connected" forever and their last will never fired.
9. A QoS-1 message in flight when the connection dropped was lost (amqtt issue #401): nothing
   redelivered it to the persistent session.
10. The last will bypassed the ACL (issue 11): amqtt publishes and retains the will from
    ``_handle_disconnect`` through ``_broadcast_message``/``retain_message``, and only PUBLISH
    packets went through ``_topic_filtering``. A device could set its will to another device's
    ``desired`` topic, retained, and drop the link. The will is now checked against the policy at
    CONNECT, before any existing session is touched; a denied will refuses the connection with
    CONNACK 5 (not authorized), so it is never stored (``will_refusal``).

The client id is always the certificate CN, whatever the client sent, as Mosquitto does with
``use_identity_as_username`` + ``use_username_as_clientid``.

Everything amqtt 0.12.1 publishes on a client's behalf, and how it is held to the policy (read from
amqtt/broker.py and amqtt/mqtt/protocol/broker_handler.py):

- PUBLISH packets: ``_handle_message_delivery`` asks ``_topic_filtering(PUBLISH)`` (overridden
  below) before ``_broadcast_message`` and, for retain=1, ``retain_message``.
- The last will: ``_handle_disconnect`` calls ``_broadcast_message`` and ``retain_message`` with no
  check at all. Closed at CONNECT (defect 10) and again at the single exit below.
- Every message that enters the broker does so through ``_broadcast_message`` (live delivery) or
  ``retain_message`` (the retained store), each with the originating session or ``None``. Both are
  overridden to drop anything the source identity may not publish, and anything without a source
  identity: ``None`` is used only by ``internal_message_broadcast`` / ``BrokerContext`` (plugins,
  e.g. ``$SYS``), and the fleet has no broker-originated messages. So a future amqtt path that
  publishes for a client is held to the policy too, whatever topic the client chose.
- Delivery to subscribers: ``_run_broadcast`` asks ``_topic_filtering(RECEIVE)`` per target
  session, live or queued for an offline persistent session.
- Retained messages on SUBSCRIBE: ``_publish_retained_messages_for_subscription``, overridden to
  check ``may_receive`` per message (defect 4). The stock replay of every retained message for
  every subscription in the broker on CONNECT is gone (``_handle_client_session`` overridden).
- Session restore: ``_publish_session_retained_messages`` replays the offline queue of a persistent
  session. Those messages passed the RECEIVE check when queued; they are checked again on replay,
  so a queue cannot outlive a change of policy. The queue also receives re-queued in-flight QoS-1
  messages (defect 9), which were checked when first delivered.
- Takeover: amqtt's own takeover path (which published nothing, but closed the old handler) is
  replaced by ``_take_over``; the old connection's will then goes out through the checked path
  above, as it was accepted at that connection's CONNECT.
- Plugins: ``plugins={}`` loads none (no ``$SYS`` broker plugin, no anonymous auth, nothing from
  entry points), so nothing calls ``BrokerContext.broadcast_message``/``retain_message``; if one
  were added, its messages would be dropped by the ``None``-source rule above.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import OUTGOING, Session

from broker import policy
from certs import (
    CertificateRejected,
    Identity,
    PkiError,
    PkiPaths,
    Revocations,
    Role,
    identity_from_der,
    load_revocations,
)
from fleet.protocol.errors import ConfigError

log = logging.getLogger(__name__)

IDENTITY = "fleet.identity"  # key in amqtt's Session.attributes
TAKEOVER_TIMEOUT = 10.0
REFUSAL_TIMEOUT = 1.0  # how long a refused client gets to read its CONNACK before the link is cut
CLIENT_ROLES = frozenset({Role.DEVICE, Role.CONTROLLER, Role.OPERATOR})


class BrokerStartError(ConfigError):
    """The broker cannot start; the message names the file, address or value at fault."""


class PacketTooLarge(Exception):
    """A client announced a packet larger than the configured cap."""


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    max_connections: int = 0  # 0: unlimited

    @property
    def label(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(value: str) -> Listener:
    """``HOST:PORT`` or ``[V6]:PORT`` -> Listener; a ConfigError names the value otherwise."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8883 or [::1]:8883")
    return Listener(host, int(port_text))


@dataclass(frozen=True)
class BrokerSettings:
    pki: PkiPaths
    listeners: tuple[Listener, ...]
    max_packet_size: int = 512 * 1024
    max_queued_messages: int = 100_000  # per offline session; the oldest is dropped beyond it
    # Rendered for Mosquitto (max_queued_bytes): 32 MiB per client, about 8 windows of 32 x 128 KiB chunks.
    # The embedded broker caps its queues by count only (it is for development and small fleets).
    max_queued_bytes: int = 32 * 1024 * 1024
    session_expiry: float | None = 7 * 24 * 3600.0  # disconnected persistent sessions are kept this long
    crl_poll_interval: float = 2.0


@dataclass
class BrokerStats:
    connections_refused: int = 0
    publish_denied: int = 0
    will_denied: int = 0  # connections refused for their will
    unattributed_dropped: int = 0  # messages on no identity's behalf, or beyond it: never expected
    subscribe_denied: int = 0
    queued_dropped: int = 0
    keepalive_timeouts: int = 0
    takeovers: int = 0
    revoked_disconnects: int = 0
    oversize_packets: int = 0
    requeued_inflight: int = 0


def _abort(writer: WriterAdapter | None) -> None:
    """Drop a connection at once; a graceful close could wait forever on a dead peer's window."""
    stream = getattr(writer, "_writer", None)
    if isinstance(stream, asyncio.StreamWriter):
        stream.transport.abort()


async def _refuse(writer: WriterAdapter) -> None:
    """CONNACK 5 (not authorized), then close: gracefully, so the CONNACK is flushed before the
    TLS close, but never waiting on the peer for longer than REFUSAL_TIMEOUT."""

    async def send_and_close() -> None:
        await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
        await writer.close()

    try:
        await asyncio.wait_for(send_and_close(), REFUSAL_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        log.debug("refused client: CONNACK not delivered: %r", exc)
    finally:
        _abort(writer)


class _CappedReader(ReaderAdapter):  # type: ignore[misc]
    def __init__(self, inner: ReaderAdapter, cap: int, stats: BrokerStats) -> None:
        self._inner = inner
        self._cap = cap
        self._stats = stats

    async def read(self, n: int = -1) -> bytes:
        if n > self._cap:
            self._stats.oversize_packets += 1
            raise PacketTooLarge(f"packet of {n} bytes exceeds the {self._cap}-byte cap")
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _ProtocolHandler(BrokerProtocolHandler):  # type: ignore[misc]
    stats: BrokerStats | None = None

    def handle_read_timeout(self) -> None:
        # MQTT-3.1.2-24: no packet within 1.5 x keepalive means the link is dead. Aborting makes
        # the reader loop end, which runs the normal abnormal-disconnect path (last will).
        client = self.session.client_id if self.session else "?"
        log.warning("%s: keepalive expired, closing the connection", client)
        if self.stats is not None:
            self.stats.keepalive_timeouts += 1
        _abort(self.writer)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        try:
            await super()._handle_qos1_message_flow(app_message)
        except BaseException:
            self._requeue_if_unacknowledged(app_message)
            raise

    def _requeue_if_unacknowledged(self, app_message: Any) -> None:
        # Defect 9 (amqtt #401): a QoS-1 message in flight when the link dies was dropped. For a
        # persistent session it goes back to the offline queue and is delivered after reconnect.
        session = self.session
        if (
            app_message.direction != OUTGOING
            or app_message.puback_packet is not None
            or session is None
            or session.clean_session
        ):
            return
        session.retained_messages.put_nowait(
            RetainedApplicationMessage(None, app_message.topic, app_message.data, app_message.qos)
        )
        if self.stats is not None:
            self.stats.requeued_inflight += 1


@dataclass
class _LiveConnection:
    handler: BrokerProtocolHandler
    identity: Identity
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def build_tls_context(pki: PkiPaths) -> ssl.SSLContext:
    """Server context: client certificate required (defect 1), CRL checked, TLS 1.2 minimum."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    for path in (pki.ca_cert, pki.server_cert, pki.server_key, pki.crl):
        if not path.is_file():
            raise BrokerStartError(f"{path}: not found (run `fleet certs init {pki.root}` first)")
    try:
        context.load_verify_locations(cafile=str(pki.ca_cert))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerStartError(f"{pki.ca_cert}: not a usable CA certificate ({exc})") from exc
    try:
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerStartError(f"{pki.server_cert} / {pki.server_key}: unusable or not a pair ({exc})") from exc
    try:
        context.load_verify_locations(cafile=str(pki.crl))
    except (ssl.SSLError, OSError) as exc:
        raise BrokerStartError(f"{pki.crl}: not a usable CRL ({exc})") from exc
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


def _bind(listener: Listener) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listener.host, listener.port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BrokerStartError(f"--listen {listener.label}: {exc.strerror or exc}") from exc
    return sock


def will_refusal(identity: Identity, topic: str | None, qos: int) -> str | None:
    """Why a CONNECT's will must be refused, or None when the identity may leave it.

    The will is a publish made later on the client's behalf, so it needs the client's publish
    right on that topic; ``may_publish`` also rejects wildcards, ``$`` topics and empty names.
    """
    if qos not in (0, 1, 2):
        return f"will QoS {qos} is malformed (MQTT-3.1.2-14)"
    if not topic or not policy.may_publish(identity, topic):
        return f"may not publish its will to {topic!r}"
    return None


class FleetBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with the fleet's identity, session and access rules."""

    def __init__(self, settings: BrokerSettings) -> None:
        names = [f"listener{index}" for index in range(len(settings.listeners))]
        config = BrokerConfig(
            listeners={"default": ListenerConfig(bind=None)},
            plugins={},  # no anonymous auth, no $SYS: identity and ACL are enforced here
            session_expiry_interval=None if settings.session_expiry is None else math.ceil(settings.session_expiry),
        )
        # Defect 7: set every listener after BrokerConfig.__post_init__, which would otherwise copy
        # any field left at its default from the "default" listener.
        config.listeners = {
            name: ListenerConfig(
                type=ListenerType.TCP, bind=listener.label, max_connections=listener.max_connections, ssl=True
            )
            for name, listener in zip(names, settings.listeners, strict=True)
        }
        super().__init__(config)
        self.settings = settings
        self.stats = BrokerStats()
        self._listener_specs = dict(zip(names, settings.listeners, strict=True))
        self._sockets: dict[str, socket.socket] = {}
        self._tls: ssl.SSLContext | None = None
        self._live: dict[str, _LiveConnection] = {}
        self._revoked: frozenset[int] = frozenset()
        self._revocations = Revocations()  # CRL numbers seen: an older crl.pem put back is refused
        self._crl_mtime: float | None = None
        self._crl_task: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tls = build_tls_context(self.settings.pki)
        self._reload_crl()
        try:
            for name, listener in self._listener_specs.items():
                self._sockets[name] = _bind(listener)
        except BrokerStartError:
            self._close_sockets()
            raise
        await super().start()
        self._crl_task = asyncio.create_task(self._watch_crl(), name="broker-crl-watch")
        for name, listener in self._listener_specs.items():
            log.info("Broker listening on %s (mutual TLS)", self._bound_label(name, listener))

    async def shutdown(self) -> None:
        if self._crl_task is not None:
            self._crl_task.cancel()
            await asyncio.gather(self._crl_task, return_exceptions=True)
        for live in list(self._live.values()):
            _abort(live.handler.writer)
        await super().shutdown()
        self._close_sockets()

    def bound_ports(self) -> list[int]:
        return [int(sock.getsockname()[1]) for sock in self._sockets.values()]

    def _bound_label(self, name: str, listener: Listener) -> str:
        return Listener(listener.host, int(self._sockets[name].getsockname()[1])).label

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        assert self._tls is not None, "start() builds the TLS context before listeners"
        return self._tls

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> asyncio.Server:
        # Sockets are bound in start() so a busy port fails with a clean one-line error.
        return await asyncio.start_server(
            partial(self.stream_connected, listener_name=listener_name),
            sock=self._sockets[listener_name],
            ssl=ssl_context,
            ssl_handshake_timeout=15,
        )

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        capped = _CappedReader(StreamReaderAdapter(reader), self.settings.max_packet_size, self.stats)
        await self._client_connected(listener_name, capped, StreamWriterAdapter(writer))

    # ---- identity and sessions -------------------------------------------------------------

    async def _initialize_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        remote_address: str,
        remote_port: int,
    ) -> tuple[BrokerProtocolHandler, Session]:
        handler, incoming = await self._read_connect(reader, writer, remote_address, remote_port)
        identity = self._identify(incoming, f"{remote_address}:{remote_port}")
        if identity is None:
            self.stats.connections_refused += 1
            await _refuse(writer)
            raise AMQTTError("connection refused: no valid identity")
        if incoming.will_flag:
            # Defect 10: checked before any takeover, so a refused CONNECT disturbs nothing.
            refusal = will_refusal(identity, incoming.will_topic, incoming.will_qos)
            if refusal is not None:
                self.stats.connections_refused += 1
                self.stats.will_denied += 1
                log.warning("%s (%s): refused: %s", identity.name, identity.role, refusal)
                await _refuse(writer)
                raise AMQTTError(f"connection refused: {identity.name} {refusal}")
        # Identity decides the client id, whatever the client sent (defects 2 and 3: nothing about
        # an existing session is touched before this point).
        incoming.client_id = identity.name
        incoming.username = identity.name
        incoming.attributes[IDENTITY] = identity
        # MQTT-3.1.2-24: the server allows one and a half keepalive periods.
        incoming.keep_alive = math.ceil(incoming.keep_alive * 1.5)
        await self._take_over(identity.name)
        return handler, self._resume_or_replace(incoming)

    async def _read_connect(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await _ProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, MQTTError, NoDataError, PacketTooLarge) as exc:
            self.stats.connections_refused += 1
            log.warning("%s:%s: no valid CONNECT: %s", remote_address, remote_port, exc)
            _abort(writer)
            raise AMQTTError(str(exc)) from exc
        handler.stats = self.stats
        return handler, session

    def _identify(self, session: Session, peer: str) -> Identity | None:
        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            log.warning("%s: refused: no client certificate", peer)
            return None
        try:
            identity = identity_from_der(der)
        except CertificateRejected as exc:
            log.warning("%s: refused: %s", peer, exc)
            return None
        if identity.role not in CLIENT_ROLES:
            log.warning(
                "%s: refused: %s is a %s certificate, not a client identity", peer, identity.name, identity.role
            )
            return None
        self._reload_crl()
        if identity.serial in self._revoked:
            log.warning("%s: refused: certificate of %s (serial %x) is revoked", peer, identity.name, identity.serial)
            return None
        return identity

    async def _take_over(self, client_id: str) -> None:
        """Close a live connection of the same identity and wait until its session is settled."""
        live = self._live.get(client_id)
        if live is None:
            return
        self.stats.takeovers += 1
        log.info("%s: new connection takes over the existing one", client_id)
        _abort(live.handler.writer)
        try:
            await asyncio.wait_for(live.ended.wait(), TAKEOVER_TIMEOUT)
        except TimeoutError as exc:
            raise AMQTTError(f"{client_id}: previous connection did not close in time") from exc

    def _resume_or_replace(self, incoming: Session) -> Session:
        client_id = incoming.client_id
        existing = self._sessions.get(client_id, (None, None))[0]
        if existing is not None and (incoming.clean_session or existing.clean_session):
            # Defect 5: a clean session must never be resumed, even before the monitor reaps it.
            self._sessions.pop(client_id, None)
            self._forget_subscriptions(existing)
            existing.clear_queues()
            existing = None
        if existing is None:
            incoming.parent = 0
            return incoming
        for attribute in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "keep_alive",
            "username",
            "password",
            "ssl_object",
            "remote_address",
            "remote_port",
        ):
            setattr(existing, attribute, getattr(incoming, attribute))
        existing.attributes[IDENTITY] = incoming.attributes[IDENTITY]
        existing.clean_session = False
        existing.parent = 1
        return existing

    def _forget_subscriptions(self, session: Session) -> None:
        for topic_filter in list(self._subscriptions):
            self._del_subscription(topic_filter, session)
            if not self._subscriptions[topic_filter]:
                del self._subscriptions[topic_filter]

    async def _handle_client_session(
        self,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        client_id: str = client_session.client_id
        live = _LiveConnection(handler, client_session.attributes[IDENTITY])
        self._live[client_id] = live
        try:
            client_session.transitions.connect()
            handler.attach(client_session, reader, writer)
            self._sessions[client_id] = (client_session, handler)
            await handler.mqtt_connack_authorize(True)
            log.info(
                "%s connected (%s, session %s)",
                client_id,
                live.identity.role,
                "resumed" if client_session.parent else "new",
            )
            await handler.start()
            # Defect 4: only this session's own queue is delivered on connect; retained messages
            # go out on SUBSCRIBE, per filter and ACL-checked. The queue is delivered beside the
            # message loop, so a client that drops mid-delivery is noticed (and the undelivered
            # rest stays queued for its next connection).
            delivery = asyncio.create_task(
                self._publish_session_retained_messages(client_session), name=f"broker-queue-{client_id}"
            )
            try:
                await self._client_message_loop(client_session, handler)
            finally:
                delivery.cancel()
                await asyncio.gather(delivery, return_exceptions=True)
        finally:
            if self._live.get(client_id) is live:
                del self._live[client_id]
            live.ended.set()

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        identity: Identity | None = session.attributes.get(IDENTITY)
        queue = session.retained_messages
        # Only what was queued before this connection: a message that fails and is requeued
        # waits for the next connection instead of being retried in a tight loop.
        for _ in range(queue.qsize()):
            if handler is None or queue.empty():
                return
            queued = queue.get_nowait()
            if identity is None or not policy.may_receive(identity, queued.topic):
                log.warning("%s: queued message on %s no longer allowed: dropped", session.client_id, queued.topic)
                continue
            # Queued messages were not retained publishes: deliver them with retain=0, in order.
            await handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        identity: Identity | None = session.attributes.get(IDENTITY)
        handler = self._get_handler(session)
        if identity is None or handler is None:
            return
        sends = [
            handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)
            for topic, retained in list(self._retained_messages.items())
            if self._matches(topic, topic_filter) and policy.may_receive(identity, topic)
        ]
        # Concurrently, as amqtt does: an operator subscribing to a whole fleet gets thousands.
        results = await asyncio.gather(*sends, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            log.warning("%s: %d retained messages not delivered: %r", identity.name, len(failed), failed[0])

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        queue = target_session.retained_messages
        while queue.qsize() >= self.settings.max_queued_messages:
            queue.get_nowait()
            self.stats.queued_dropped += 1
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    # ---- access control --------------------------------------------------------------------

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # The one way into live delivery: PUBLISH packets (checked already) and the last will.
        if self._may_originate(session, topic, "deliver"):
            await super()._broadcast_message(session, topic, data, force_qos)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        # The one way into the retained store (setting and clearing): retain=1 publishes and wills.
        if self._may_originate(source_session, topic_name, "retain"):
            await super().retain_message(source_session, topic_name, data, qos)

    def _may_originate(self, session: Session | None, topic: str | None, what: str) -> bool:
        identity: Identity | None = session.attributes.get(IDENTITY) if session is not None else None
        if identity is not None and topic and policy.may_publish(identity, topic):
            return True
        # Only a regression can get here (PUBLISH and the will are checked before): say so loudly.
        self.stats.unattributed_dropped += 1
        who = f"{identity.name} ({identity.role})" if identity is not None else "no client identity"
        log.error("refused to %s a message on %r for %s: not allowed by the fleet policy", what, topic, who)
        return False

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        identity: Identity | None = session.attributes.get(IDENTITY)
        if identity is None:
            return False
        if action == Action.PUBLISH:
            allowed = policy.may_publish(identity, topic)
            if not allowed:
                self.stats.publish_denied += 1
                log.warning("%s (%s) may not publish to %s: dropped", identity.name, identity.role, topic)
            return allowed
        if action == Action.SUBSCRIBE:
            allowed = policy.may_subscribe(identity, topic)
            if not allowed:
                self.stats.subscribe_denied += 1
                log.warning("%s (%s) may not subscribe to %s: refused", identity.name, identity.role, topic)
            return allowed
        return policy.may_receive(identity, topic)

    # ---- revocation ------------------------------------------------------------------------

    def _reload_crl(self) -> None:
        """Re-read crl.pem when it changed; a broken CRL keeps the last good one (and says so)."""
        path = self.settings.pki.crl
        try:
            mtime = os.stat(path).st_mtime
        except OSError as exc:
            log.error("%s: cannot read the CRL, keeping the last one: %s", path, exc)
            return
        if mtime == self._crl_mtime:
            return
        self._crl_mtime = mtime  # a refused file is said once; writing a new one is the next change
        try:
            self._revocations = load_revocations(self.settings.pki, not_older_than=self._revocations)
        except PkiError as exc:
            log.error("keeping the last good CRL: %s", exc)
            return
        self._revoked = self._revocations.serials

    async def _watch_crl(self) -> None:
        while True:
            await asyncio.sleep(self.settings.crl_poll_interval)
            self._reload_crl()
            for client_id, live in list(self._live.items()):
                if live.identity.serial in self._revoked:
                    self.stats.revoked_disconnects += 1
                    log.warning("%s: certificate revoked, disconnecting", client_id)
                    _abort(live.handler.writer)


class ThreadedBroker:
    """Runs a FleetBroker on its own event loop in a named thread (tests, demo, controller)."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker", daemon=True)
        self.broker: FleetBroker | None = None

    def start(self, timeout: float = 30.0) -> FleetBroker:
        self._thread.start()
        self.broker = self._call(self._create_and_start(), timeout)
        return self.broker

    async def _create_and_start(self) -> FleetBroker:
        broker = FleetBroker(self.settings)
        await broker.start()
        return broker

    def stop(self, timeout: float = 30.0) -> None:
        try:
            if self.broker is not None:
                self._call(self.broker.shutdown(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return self._call(coro, timeout)

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def ports(self) -> list[int]:
        assert self.broker is not None
        return self.broker.bound_ports()


@contextmanager
def running_broker(settings: BrokerSettings) -> Iterator[ThreadedBroker]:
    threaded = ThreadedBroker(settings)
    try:
        threaded.start()
        yield threaded
    finally:
        threaded.stop()


def pki_paths(root: str | Path) -> PkiPaths:
    return PkiPaths(Path(root))
