"""The durable outbox: what the controller must learn is stored first, then flushed in order.

Acks, reported state, health and events go through ``Store``'s outbox table, so a link that is
down (or an agent that is killed) loses none of them; the flush loop sends a window at a time
whenever the link is up and marks each message delivered once the broker has it.
"""

from __future__ import annotations

import asyncio
import logging

from agent.store import OutboxItem, OutboxKind, Store
from agent.transport import Transport
from fleet.protocol.codec import encode
from fleet.protocol.errors import TransportError
from fleet.protocol.messages import Message
from fleet.protocol.topics import Channel, channel_qos, channel_retained, node_topic

log = logging.getLogger(__name__)

OUTBOX_WINDOW = 20


class Outbox:
    def __init__(self, node: str, store: Store, transport: Transport) -> None:
        self.node = node
        self.store = store
        self.transport = transport
        self._wake = asyncio.Event()

    def enqueue(self, channel: Channel, message: Message, kind: OutboxKind) -> None:
        self.store.enqueue(
            node_topic(self.node, channel),
            encode(message),
            qos=channel_qos(channel),
            retain=channel_retained(channel),
            kind=kind,
        )
        self._wake.set()

    def wake(self) -> None:
        """Flush now (a new connection: what waited can go)."""
        self._wake.set()

    async def flush_forever(self) -> None:
        while True:
            await self.transport.wait_connected()
            batch = self.store.pending(OUTBOX_WINDOW)
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._send(batch)
            except TransportError as exc:
                log.info("%s: outbox flush paused (%s); %d waiting", self.node, exc, self.store.outbox_size())
                await asyncio.sleep(0.1)  # wait_connected() blocks until the transport is back

    async def _send(self, batch: list[OutboxItem]) -> None:
        futures = [self.transport.publish(item.topic, item.payload, qos=item.qos, retain=item.retain) for item in batch]
        for item, future in zip(batch, futures, strict=True):
            await future
            self.store.delivered(item.seq)
