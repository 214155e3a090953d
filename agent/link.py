"""The agent's side of its MQTT session: online/offline status, subscriptions, and which part of
the agent takes each inbound message (or refuses it)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from agent import __version__
from agent.config import AgentSettings
from agent.transport import Inbound, Transport, Will
from fleet.protocol.codec import encode
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import Status
from fleet.protocol.topics import Channel, node_topic, parse_node_topic

log = logging.getLogger(__name__)


class Link:
    """Owns the ``Transport``; ``handlers`` and ``on_connect`` are filled in by the agent."""

    def __init__(self, settings: AgentSettings, counters: Counter[str]) -> None:
        self.node = settings.node_id
        self.counters = counters
        self.handlers: dict[Channel, Callable[[Inbound], None]] = {}
        self.on_connect: list[Callable[[], None]] = []  # after subscribing, on every connect
        offline = encode(Status(state="offline", agent_version=__version__))
        self.transport = Transport(
            settings,
            will=Will(self._topic(Channel.STATUS), offline),
            on_message=self.route,
            on_connected=self._connected,
        )

    def _topic(self, channel: Channel) -> str:
        return node_topic(self.node, channel)

    async def _connected(self) -> None:
        online = Status(state="online", ts=time.time(), agent_version=__version__)
        self.transport.publish(self._topic(Channel.STATUS), encode(online), qos=1, retain=True)
        # Subscribing again on every connect makes the broker resend the retained desired state:
        # nothing depends on having seen the messages published while we were away.
        # Chunks at QoS 0: they are asked for on demand and asked again when lost, so the broker must
        # not queue or redeliver them (with QoS 1 a link dropping every few chunks built a backlog
        # of redeliveries that the next drop cut again, forever).
        self.transport.subscribe(
            [(self._topic(Channel.DESIRED), 1), (self._topic(Channel.CMD), 1), (self._topic(Channel.ARTIFACT_CHUNK), 0)]
        )
        for callback in self.on_connect:
            callback()

    def route(self, inbound: Inbound) -> None:
        try:
            node, channel = parse_node_topic(inbound.topic)
        except InvalidMessage as exc:
            self.refuse(inbound, str(exc))
            return
        if node != self.node:
            self.refuse(inbound, f"message for {node} delivered to {self.node}")
            return
        handler = self.handlers.get(channel)
        if handler is None:
            self.refuse(inbound, f"{channel} is not handled by this agent version")
            return
        handler(inbound)

    def refuse(self, inbound: Inbound, reason: str) -> None:
        """Count, log and acknowledge a message the agent will not act on (redelivery would not help)."""
        self.counters["invalid_messages"] += 1
        log.warning("%s: ignored message on %s: %s", self.node, inbound.topic, reason)
        self.transport.ack(inbound)

    async def close(self) -> None:
        """Say offline (retained, replacing the will) and disconnect."""
        offline = encode(Status(state="offline", ts=time.time(), agent_version=__version__))
        await self.transport.close(final=(self._topic(Channel.STATUS), offline))
