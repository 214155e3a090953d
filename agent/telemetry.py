"""What the agent tells the controller about itself: heartbeats, health and events.

Heartbeats are only worth something now, so they are published directly and only while the link
is up; health and events go through the durable outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.outbox import Outbox
from agent.probes import HealthState
from agent.store import OutboxKind, Store
from agent.transport import Transport
from fleet.protocol.codec import encode
from fleet.protocol.errors import TransportError
from fleet.protocol.messages import Event, Health, Heartbeat
from fleet.protocol.topics import Channel, node_topic

log = logging.getLogger(__name__)


class Telemetry:
    def __init__(
        self,
        node: str,
        state_dir: Path,
        store: Store,
        outbox: Outbox,
        transport: Transport,
        *,
        heartbeat_interval: Callable[[], float],
        health_state: Callable[[], HealthState],
        counters: Counter[str],
    ) -> None:
        self.node = node
        self.state_dir = state_dir
        self.store = store
        self.outbox = outbox
        self.transport = transport
        self._heartbeat_interval = heartbeat_interval
        self._health_state = health_state
        self.counters = counters
        self._interval_changed = asyncio.Event()
        self._started = time.monotonic()
        self._heartbeat_seq = 0

    # ---- heartbeats ------------------------------------------------------------------------

    async def heartbeat_forever(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter: the first real reading covers one interval
        while True:
            self._interval_changed.clear()
            try:
                await asyncio.wait_for(self._interval_changed.wait(), self._heartbeat_interval())
                continue  # the interval changed: start a fresh one
            except TimeoutError:
                pass
            self._send_heartbeat()
            self.publish_health(self._health_state())

    def heartbeat_interval_changed(self) -> None:
        self._interval_changed.set()

    def _send_heartbeat(self) -> None:
        self._heartbeat_seq += 1
        heartbeat = Heartbeat(
            seq=self._heartbeat_seq,
            uptime=time.monotonic() - self._started,
            cpu=psutil.cpu_percent(interval=None),
            mem_free=psutil.virtual_memory().available,
            disk_free=psutil.disk_usage(str(self.state_dir)).free,
            latency_ms=self.transport.last_rtt_ms,
            version=self.store.get_text("version"),
        )
        if not self.transport.connected:
            return  # a heartbeat is only worth something now; the outbox would replay stale ones
        try:
            self.transport.publish(node_topic(self.node, Channel.HEARTBEAT), encode(heartbeat), qos=0)
        except TransportError:
            return
        log.debug("%s: heartbeat seq=%d", self.node, heartbeat.seq)

    # ---- health ----------------------------------------------------------------------------

    def publish_health(self, state: HealthState) -> None:
        health = Health(
            version=self.store.get_text("version"),
            healthy=state.healthy is not False,
            probes=[state.last] if state.last is not None else [],
            consecutive_failures=state.consecutive_failures,
            ts=time.time(),
        )
        self.outbox.enqueue(Channel.HEALTH, health, OutboxKind.TELEMETRY)

    def probe_ran(self, _state: HealthState) -> None:
        self.counters["probes"] += 1

    # ---- events ----------------------------------------------------------------------------

    def event(self, kind: str, detail: str | None, data: dict[str, Any] | None = None) -> None:
        self.outbox.enqueue(
            Channel.EVENTS, Event(kind=kind, detail=detail, data=data or {}, ts=time.time()), OutboxKind.TELEMETRY
        )
