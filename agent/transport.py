"""The agent's one mutual-TLS connection to the broker, kept up forever (over ``agent.mqtt``).

Each connection attempt uses a fresh client (the settings may have been reloaded), driven by the
agent's event loop like every client of ``agent.mqtt``: no network thread. Reconnecting is decided
here: tenacity with capped, jittered exponential backoff, reset after every successful
connection. Inbound QoS-1 messages are acknowledged only when the agent says so (``manual_ack``):
the agent first makes a command durable, then lets the broker forget it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from agent.config import AgentSettings
from agent.mqtt import Inbound, MqttClient, Options, Will, tls_context
from fleet.protocol.errors import TransportError

__all__ = ["Inbound", "Transport", "Will"]

log = logging.getLogger(__name__)

_CLOSE_GRACE = 2.0  # seconds for a DISCONNECT to go out before the socket is closed anyway


class Transport:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        will: Will,
        on_message: Callable[[Inbound], None],
        on_connected: Callable[[], Awaitable[None]],
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._will = will
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_lost = on_lost
        self._client: MqttClient | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self.last_rtt_ms: float | None = None
        self.connects = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def request_reconnect(self) -> None:
        """Drop the current connection; the run loop connects again with the current settings."""
        if self._connected.is_set() and self._client is not None:
            self._connection_lost(self._client.id, "reconnect requested")

    # ---- the owned connection loop ---------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                await self._connect_with_backoff()
                await self._lost.wait()
                await self._teardown("connection lost")
        finally:
            await self._teardown("agent stopping")

    async def _connect_with_backoff(self) -> None:
        policy = self.settings.reconnect
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=policy.initial, max=policy.maximum, jitter=policy.jitter),
            retry=retry_if_exception_type(TransportError),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._connect_once()

    def _log_retry(self, state: RetryCallState) -> None:
        delay = state.next_action.sleep if state.next_action else 0.0
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: cannot reach broker %s (%s); retry in %.1fs",
            self.settings.node_id,
            self.settings.server_addr,
            error,
            delay,
        )

    def _options(self) -> Options:
        settings = self.settings
        tls = None
        if settings.tls_enabled and settings.tls is not None:
            # Read on every attempt (certificates rotate), in the connect executor.
            tls = functools.partial(tls_context, settings.tls.ca, settings.tls.cert, settings.tls.key)
        return Options(
            client_id=settings.node_id,
            host=settings.host,
            port=settings.port,
            keepalive=settings.keepalive,
            tls=tls,
            will=self._will,
            clean_session=False,
            manual_ack=True,
            connect_timeout=settings.connect_timeout,
        )

    async def _connect_once(self) -> None:
        self._lost.clear()
        client = MqttClient(self._options(), on_message=self._on_message, on_lost=self._connection_lost)
        # Current before the CONNACK: a command delivered in the same read as it must be ackable.
        self._client = client
        try:
            await client.connect()
        except BaseException:
            self._client = None
            client.close()
            raise
        self.connects += 1
        self._connected.set()
        log.info("%s: Connected to control plane %s", self.settings.node_id, self.settings.server_addr)
        await self._on_connected()

    def _connection_lost(self, connection: int, reason: str) -> None:
        client = self._client
        if client is None or connection != client.id or not self._connected.is_set():
            return
        log.warning("%s: connection to %s lost (%s)", self.settings.node_id, self.settings.server_addr, reason)
        self._connected.clear()
        self._lost.set()
        self._on_lost()

    async def _teardown(self, why: str) -> None:
        self._connected.clear()
        client, self._client = self._client, None
        if client is None:
            return
        log.debug("%s: closing the connection (%s)", self.settings.node_id, why)
        client.disconnect()
        if not await client.wait_closed(_CLOSE_GRACE):
            log.info("%s: DISCONNECT not sent in %.0fs; closing the socket", self.settings.node_id, _CLOSE_GRACE)
        client.close()

    async def close(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Graceful stop: optionally publish a last retained message, then DISCONNECT."""
        if final is not None and self.connected:
            try:
                future = self.publish(final[0], final[1], qos=1, retain=True)
                await asyncio.wait_for(future, timeout)
            except (TransportError, TimeoutError) as exc:
                log.warning("%s: could not publish %s before stopping: %s", self.settings.node_id, final[0], exc)
        await self._teardown("agent stopping")

    # ---- publishing and acknowledging ------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> asyncio.Future[None]:
        """Send now; the future resolves on PUBACK (QoS 1) or once written (QoS 0)."""
        client = self._client
        if client is None or not self._connected.is_set():
            raise TransportError("not connected")
        future = client.publish(topic, payload, qos=qos, retain=retain)
        sent = time.monotonic()

        def measured(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.last_rtt_ms = (time.monotonic() - sent) * 1000

        future.add_done_callback(measured)
        return future

    def ack(self, inbound: Inbound) -> None:
        """PUBACK an inbound QoS-1 message; on a newer connection the broker redelivers it instead."""
        client = self._client
        if client is not None:
            client.ack(inbound)

    def subscribe(self, filters: list[tuple[str, int]]) -> None:
        client = self._client
        if client is None:
            raise TransportError("not connected")
        client.subscribe(filters)
