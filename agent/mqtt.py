"""One asyncio MQTT adapter over paho-mqtt: the agent's one connection and ``fleet sim``'s thousands.

No client has a thread. The running asyncio loop drives each paho client through paho's
external-loop API, as aiomqtt does: ``loop.add_reader`` -> ``loop_read``;
``on_socket_register_write`` -> ``loop.add_writer`` -> ``loop_write``; and a ``loop.call_later``
timer per connection -> ``loop_misc`` (keepalive: PINGREQ, and a dead link noticed).

paho's ``reconnect()`` opens TCP and does the TLS handshake blocking. It runs in an executor with
the socket callbacks detached, so the worker thread never touches the event loop; once it has
returned, the loop thread attaches the socket. From then on only the loop thread touches the client.

Every CONNACK starts a new connection id. An inbound message carries the id of the connection that
delivered it and :meth:`MqttClient.ack` acknowledges it only on that connection: a PUBACK on a
newer one would acknowledge some other message (the broker redelivers the old one instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fleet.protocol.errors import TransportError

log = logging.getLogger(__name__)

_connection_ids = itertools.count(1)  # unique in the process: ids of different clients never collide


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    qos: int
    mid: int
    retain: bool
    connection: int  # which connection delivered it: an ack is only valid on that one


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Options:
    client_id: str
    host: str
    port: int
    keepalive: float = 60.0
    tls: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None
    """A context, or a function building one: called in the connect executor before the first
    connect (loading a certificate and key takes milliseconds the event loop should not spend)."""
    will: Will | None = None
    clean_session: bool = False
    manual_ack: bool = False
    """True: inbound QoS-1 messages are PUBACKed only through :meth:`MqttClient.ack`."""
    connect_timeout: float = 10.0
    """For TCP plus the TLS handshake, and for the CONNACK unless ``connack_timeout`` is given."""
    connack_timeout: float | None = None
    max_inflight: int = 20
    nodelay: bool = True
    """Disable Nagle: small windows of chunks otherwise wait for delayed ACKs (85 vs 1,158 chunks/s
    measured through Mosquitto)."""


def tls_context(ca: Path | str, cert: Path | str, key: Path | str) -> ssl.SSLContext:
    """A mutual-TLS client context (TLS 1.2 or newer); build it once per identity and reuse it."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


class State(Enum):
    IDLE = "idle"  # no socket
    DIALING = "dialing"  # TCP + TLS + CONNECT in the executor
    CONNECTING = "connecting"  # waiting for the CONNACK
    CONNECTED = "connected"
    DISCONNECTING = "disconnecting"  # DISCONNECT sent by us


def _noop(*_args: object) -> None:
    pass


class MqttClient:
    """One MQTT client identity on the running asyncio loop; dial again after a loss.

    The paho client lives as long as this object: with ``clean_session=False`` paho sends QoS-1
    messages still unacknowledged when a link dropped again on the next connection. Callbacks run
    on the loop thread: ``on_connect(connection)`` on every accepted CONNACK, ``on_lost(connection,
    reason)`` when an established connection ends without :meth:`disconnect`, ``on_closed()``
    whenever the socket closes, ``on_error(exc)`` when ``on_message`` raised (default: logged).
    """

    def __init__(
        self,
        options: Options,
        *,
        on_message: Callable[[Inbound], None],
        on_connect: Callable[[int], None] = _noop,
        on_lost: Callable[[int, str], None] = _noop,
        on_closed: Callable[[], None] = _noop,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.options = options
        self._loop = asyncio.get_running_loop()
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_lost = on_lost
        self._on_closed = on_closed
        self._on_error = on_error or self._log_error
        self.id = 0
        """The current connection's id (the last one's while not connected; 0: never connected)."""
        self.state = State.IDLE
        self._paho = self._new_paho()
        self._tls_factory = None if isinstance(options.tls, ssl.SSLContext) else options.tls
        self._sock: Any = None  # the socket attached to the loop
        self._job: asyncio.Future[MQTTErrorCode] | None = None  # a reconnect() running in an executor
        self._connack: asyncio.Future[int] | None = None
        self._connack_timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._closed_waiters: list[asyncio.Future[None]] = []

    def _new_paho(self) -> mqtt.Client:
        options = self.options
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            clean_session=options.clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=options.manual_ack,
        )
        client.connect_timeout = options.connect_timeout
        client.max_inflight_messages_set(options.max_inflight)
        if isinstance(options.tls, ssl.SSLContext):
            client.tls_set_context(options.tls)
        if options.will is not None:
            will = options.will
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        if options.nodelay:
            client.on_socket_open = _set_nodelay
        client.connect_async(options.host, options.port, keepalive=max(1, round(options.keepalive)))
        return client

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    @property
    def socket_open(self) -> bool:
        return self._sock is not None

    # ---- connecting ----------------------------------------------------------------------------

    async def dial(self, executor: Executor | None = None) -> asyncio.Future[int]:
        """Open TCP and TLS (blocking, in ``executor``) and send CONNECT.

        Returns the future of the CONNACK: the new connection id, or TransportError when refused,
        closed or not answered within ``connect_timeout``. Raises TransportError if the socket
        cannot be opened."""
        if self.state is not State.IDLE:
            raise TransportError(f"cannot dial while {self.state.value}")
        if self._job is not None:
            raise TransportError("the previous connect attempt is still running")
        if self._sock is not None:
            self._paho._sock_close()  # still attached: unregisters it from the loop
        self._detach()
        self.state = State.DIALING
        job = self._loop.run_in_executor(executor, self._open)
        self._job = job
        try:
            done, _ = await asyncio.wait({job}, timeout=self.options.connect_timeout + 1)
        except asyncio.CancelledError:
            job.add_done_callback(self._abandoned)
            self.state = State.IDLE
            raise
        if not done:
            job.add_done_callback(self._abandoned)
            self.state = State.IDLE
            raise TransportError(f"connect timed out after {self.options.connect_timeout + 1:.0f}s")
        self._job = None
        try:
            rc = job.result()
        except (OSError, ValueError) as exc:  # ssl.SSLError and socket timeouts are OSErrors
            self._paho._sock_close()  # detached: closes without touching the loop
            self.state = State.IDLE
            raise TransportError(f"connect failed: {exc}") from exc
        sock = self._paho.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            self._paho._sock_close()
            self.state = State.IDLE
            raise TransportError(f"connect failed: {mqtt.error_string(rc)}")
        connack: asyncio.Future[int] = self._loop.create_future()
        self._connack = connack
        self.state = State.CONNECTING
        self._attach(sock)
        wait = self.options.connack_timeout or self.options.connect_timeout
        self._connack_timer = self._loop.call_later(wait, self._connack_timed_out)
        return connack

    def _open(self) -> MQTTErrorCode:
        """In the executor: the TLS context on first use, then TCP, TLS and CONNECT."""
        if self._tls_factory is not None:
            self._paho.tls_set_context(self._tls_factory())
            self._tls_factory = None
        return self._paho.reconnect()

    async def connect(self, executor: Executor | None = None) -> int:
        """:meth:`dial` and wait for the CONNACK; the new connection id."""
        return await (await self.dial(executor))

    def _abandoned(self, job: asyncio.Future[MQTTErrorCode]) -> None:
        """A connect we stopped waiting for has ended in its thread: close what it opened."""
        if self._job is job:
            self._job = None
        if not job.cancelled():
            job.exception()  # retrieved: a failure here was already reported as a timeout
        if self.state is State.IDLE:
            self._paho._sock_close()  # still detached

    def _connack_timed_out(self) -> None:
        self._connack_timer = None
        if self.state is State.CONNECTING:
            self._end_connecting(TransportError("no CONNACK from the broker"))
            self.close()

    def _end_connecting(self, error: TransportError) -> None:
        self.state = State.IDLE
        connack, self._connack = self._connack, None
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None
        if connack is not None and not connack.done():
            connack.set_exception(error)

    # ---- the socket on the loop ----------------------------------------------------------------

    def _detach(self) -> None:
        self._paho.on_socket_close = None
        self._paho.on_socket_register_write = None
        self._paho.on_socket_unregister_write = None

    def _attach(self, sock: Any) -> None:
        self._sock = sock
        self._paho.on_socket_close = self._socket_closed
        self._paho.on_socket_register_write = self._register_write
        self._paho.on_socket_unregister_write = self._unregister_write
        self._loop.add_reader(sock, self._readable)
        if self._paho.want_write():
            self._loop.add_writer(sock, self._writable)
        self._arm_tick()

    def _readable(self) -> None:
        rc = self._paho.loop_read()
        # TLS may hold decrypted bytes that no longer show as a readable file descriptor.
        sock = self._paho.socket()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
            rc = self._paho.loop_read()
            sock = self._paho.socket()

    def _writable(self) -> None:
        self._paho.loop_write()

    def _register_write(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        self._loop.add_writer(sock, self._writable)

    def _unregister_write(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _socket_closed(self, _client: mqtt.Client, _userdata: object, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._sock = None
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._on_closed()

    def _arm_tick(self) -> None:
        # A quarter of the keepalive (at most 5 s): PINGREQ on time, a silent broker noticed.
        interval = max(0.05, min(self.options.keepalive / 4, 5.0))
        self._tick = self._loop.call_later(interval, self._ticked)

    def _ticked(self) -> None:
        self._tick = None
        if self._sock is None:
            return
        self._paho.loop_misc()
        if self._sock is not None:
            self._arm_tick()

    # ---- paho callbacks (loop thread) ----------------------------------------------------------

    def _paho_connect(self, _c: mqtt.Client, _u: object, _flags: object, reason: Any, _p: object) -> None:
        if self.state is not State.CONNECTING:
            return
        code = int(getattr(reason, "value", reason))
        if code != 0:
            # paho closes the socket after this callback (reconnect_on_failure=False).
            self._end_connecting(TransportError(f"broker refused the connection ({mqtt.connack_string(code)})"))
            return
        connack, self._connack = self._connack, None
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None
        self.id = next(_connection_ids)
        self.state = State.CONNECTED
        if connack is not None and not connack.done():
            connack.set_result(self.id)
        self._on_connect(self.id)

    def _paho_disconnect(self, _c: mqtt.Client, _u: object, _flags: object, reason: object, _p: object) -> None:
        state = self.state
        if state is State.CONNECTING:
            self._end_connecting(TransportError(f"connection closed before the CONNACK ({reason})"))
            return
        if state not in (State.CONNECTED, State.DISCONNECTING):
            return
        self.state = State.IDLE
        self._fail_pending(TransportError(f"connection lost: {reason}"))
        if state is State.CONNECTED:
            self._on_lost(self.id, str(reason))

    def _paho_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        inbound = Inbound(
            message.topic, bytes(message.payload), message.qos, message.mid, bool(message.retain), self.id
        )
        try:
            self._on_message(inbound)
        except Exception as exc:  # noqa: BLE001 - reported, and paho's read loop must go on
            self._on_error(exc)

    def _paho_publish(self, _c: mqtt.Client, _u: object, mid: int, _reason: object, _p: object) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _log_error(self, exc: BaseException) -> None:
        log.error("%s: message handler failed", self.options.client_id, exc_info=exc)

    # ---- publishing, acknowledging, subscribing ------------------------------------------------

    def send(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> int:
        """Publish without tracking; the message id. Raises TransportError when not connected."""
        if self.state is not State.CONNECTED:
            raise TransportError("not connected")
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        return info.mid

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> asyncio.Future[None]:
        """Publish; the future resolves on PUBACK (QoS 1) or once written (QoS 0), and fails with
        TransportError if the connection ends first."""
        mid = self.send(topic, payload, qos=qos, retain=retain)
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending[mid] = future
        return future

    def _fail_pending(self, error: TransportError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved here: callers that stopped waiting must not warn

    def ack(self, inbound: Inbound) -> bool:
        """PUBACK an inbound QoS-1 message (``manual_ack``) on the connection that delivered it;
        False when that connection is gone (the broker then redelivers it)."""
        if inbound.qos == 0 or inbound.connection != self.id or self.state is not State.CONNECTED:
            return False
        self._paho.ack(inbound.mid, inbound.qos)
        return True

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        if self.state is not State.CONNECTED:
            raise TransportError("not connected")
        result, _mid = self._paho.subscribe(filters)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"subscribe failed: {mqtt.error_string(result)}")

    # ---- ending --------------------------------------------------------------------------------

    def disconnect(self) -> None:
        """Send DISCONNECT (the broker drops the will); the socket closes once it is written."""
        if self.state is not State.CONNECTED:
            self.close()
            return
        self.state = State.DISCONNECTING
        self._fail_pending(TransportError("disconnected"))
        self._paho.disconnect()

    def drop(self) -> bool:
        """Cut the TCP connection without DISCONNECT, as a failing link does (the broker publishes
        the will); the loss is noticed by the next read. False when there is no socket."""
        sock = self._sock
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    def close(self) -> None:
        """Close the socket now, without DISCONNECT. A connect still running in its executor closes
        what it opens once it returns."""
        state = self.state
        if state is State.DIALING:
            return  # dial() sees the outcome and cleans up; close() again after it returned
        if state is State.CONNECTING:
            self._end_connecting(TransportError("closed"))
        self.state = State.IDLE
        self._fail_pending(TransportError("closed"))
        if self._job is None:
            self._paho._sock_close()  # paho has no public "drop the socket" call

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until the socket is closed; False on timeout."""
        if self._sock is None:
            return True
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._closed_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        return True


def _set_nodelay(_client: mqtt.Client, _userdata: object, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
