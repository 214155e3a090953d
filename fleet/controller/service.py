"""The fleet controller service: registry, command tracking, desired state, rollouts, release serving.

Threads, each owned and stopped by ``Controller.stop``: paho's network thread delivers messages to
the registry and the command tracker; the release service has its transfer workers; one tick
thread flushes telemetry, resends unacknowledged commands and drives rollouts; the HTTP API runs
in its own thread. All state lives in one SQLite file, so a restart (also after ``kill -9``)
resumes rollouts where they were.

With ``broker.share`` set, several controllers (each with its own identity) split ingest through MQTT
shared subscriptions (``$share/<share>/...``: heartbeats, health, events and artifact requests)
and share the database file; each also reads every status, reported state and ack, serves its
share of artifact requests and answers the API. The holder of the lease (fleet.controller.lease) alone
drives rollouts, resends commands and republishes desired state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.controller.bounds import reject_metrics
from fleet.controller.commands import CommandTracker
from fleet.controller.desired import DesiredPublisher
from fleet.controller.facade import (
    CommandView,
    NodeDetail,
    NodeView,
    RolloutRequest,
    RolloutView,
)
from fleet.controller.lease import Lease
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.registry import Registry
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.controller.rollouts import RolloutEngine
from fleet.controller.settings import ControllerSettings
from fleet.controller.storage import Database
from fleet.protocol.codec import decode
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import ReleaseRef, Reported
from fleet.protocol.topics import Channel, all_nodes_filter, parse_node_topic
from fleet.releases import ReleaseStore

log = logging.getLogger(__name__)

INGEST_CHANNELS = (Channel.STATUS, Channel.HEARTBEAT, Channel.HEALTH, Channel.REPORTED, Channel.EVENTS)
# Split among controllers that share ingest: the periodic bulk, where a message lost with a dying
# controller is replaced by the next one. State changes (status, reported) and acks are rare and
# must not be lost that way, so every controller reads all of them (merging is idempotent).
SHARED_CHANNELS = frozenset({Channel.HEARTBEAT, Channel.HEALTH, Channel.EVENTS})


def tls_identity(settings: ControllerSettings) -> TlsIdentity:
    """The CA and the controller certificate the settings name (``broker.identity``, or controller.pem)."""
    pki = settings.pki
    if settings.broker.identity is None:
        return TlsIdentity(pki.ca_cert, pki.controller_cert, pki.controller_key)
    client = pki.controller(settings.broker.identity)
    return TlsIdentity(pki.ca_cert, client.cert, client.key)


class _DesiredAdapter:
    """The rollout engine's view of desired state, on top of the desired-state publisher."""

    def __init__(self, desired: DesiredPublisher) -> None:
        self._desired = desired

    def publish_release(self, node: str, release: ReleaseRef | None) -> int:
        return self._desired.publish_release(node, release)

    def current_release(self, node: str) -> ReleaseRef | None:
        current = self._desired.current(node)
        return None if current is None else current.release


class Controller:
    """Implements fleet.controller.facade.ControllerFacade."""

    def __init__(self, settings: ControllerSettings) -> None:
        """``settings`` are validated already (fleet.controller.settings.load_settings, or built in code)."""
        self.settings = settings
        broker, timing, releases = settings.broker, settings.timing, settings.releases
        self.db = Database(settings.storage.db)
        self.mqtt = FleetMqtt(
            broker.host,
            broker.port,
            tls_identity(settings),
            options=MqttOptions(clean_session=broker.share is not None),
        )
        self.registry = Registry(self.db, stale_after=timing.stale_after, offline_after=timing.offline_after)
        self.commands = CommandTracker(self.db, self._publish)
        self.desired = DesiredPublisher(self.db, self._publish_retained)
        self.releases = ReleaseStore(releases.store)
        self.rollouts_engine = RolloutEngine(
            self.db, self.registry, _DesiredAdapter(self.desired), self.commands, self.releases
        )
        self.release_service = ReleaseService(
            self.mqtt,
            ReleaseServer(self.releases),
            max_transfers=releases.max_transfers,
            rate_limit=releases.rate_limit,
            share=broker.share,
        )
        self.lease = None if broker.share is None else Lease(self.db, self.mqtt.client_id, ttl=timing.lease_ttl)
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._heartbeat_rate = 0.0
        self._last_rate_sample = (time.monotonic(), 0)
        self.tick_errors = 0

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for channel in INGEST_CHANNELS:
            share = self.settings.broker.share if channel in SHARED_CHANNELS else None
            self.mqtt.subscribe(all_nodes_filter(channel), self._ingest, replays=self._ingest_replay, share=share)
        self.mqtt.subscribe(all_nodes_filter(Channel.ACK), self.commands.on_ack)
        self.mqtt.start()
        if self.lease is None or self.lease.renew():
            self._became_leader()
        self.release_service.start()
        self._ticker = threading.Thread(target=self._tick_forever, name="controller-tick", daemon=True)
        self._ticker.start()
        log.info("controller connected to %s as %s", self.mqtt.address, self.mqtt.client_id)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(timeout)
        self.release_service.stop()
        self.registry.flush()
        if self.lease is not None and self.lease.held:
            self.lease.release()
        self.mqtt.close()
        self.db.close()

    def _tick_forever(self) -> None:
        while not self._stopping.wait(self.settings.timing.tick_interval):
            self.tick()

    @property
    def leader(self) -> bool:
        """Whether this controller drives rollouts and resends (always, unless it shares ingest)."""
        return self.lease is None or self.lease.held

    def _became_leader(self) -> None:
        # A desired state is committed before it is published; a crash (or a broker that lost its
        # retained store) between the two would leave a node waiting forever. Publishing every
        # stored document again is idempotent: agents ignore a generation they already applied.
        republished = self.desired.republish_all()
        if republished:
            log.info("controller republished %d stored desired states", republished)

    def _renew_lease(self) -> None:
        assert self.lease is not None
        was_leader = self.lease.held
        if self.lease.renew() and not was_leader:
            self._became_leader()

    def tick(self) -> None:
        """One round of periodic work; an error in one part is logged and counted, never fatal."""
        steps: list[tuple[str, Callable[[], object]]] = [("flush", self.registry.flush)]
        if self.lease is not None:
            steps += [("refresh", self.registry.refresh), ("lease", self._renew_lease)]
        if self.leader:
            steps += [("resend", self.commands.resend_due), ("rollouts", self.rollouts_engine.tick)]
        steps.append(("rates", self._sample_rates))
        for name, step in steps:
            try:
                step()
            except Exception:
                self.tick_errors += 1
                log.exception("controller tick step %s failed", name)

    # ---- MQTT ------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int) -> object:
        return self.mqtt.publish(topic, payload, qos)

    def _publish_retained(self, topic: str, payload: bytes, qos: int, retain: bool) -> object:
        return self.mqtt.publish(topic, payload, qos, retain)

    def _ingest(self, topic: str, payload: bytes) -> None:
        self.registry.on_message(topic, payload)
        if topic.endswith("/" + Channel.REPORTED.value):
            self._observe_generation(topic, payload)

    def _ingest_replay(self, topic: str, payload: bytes) -> None:
        self.registry.on_replay(topic, payload)
        if topic.endswith("/" + Channel.REPORTED.value):
            self._observe_generation(topic, payload)

    def _observe_generation(self, topic: str, payload: bytes) -> None:
        try:
            node, _channel = parse_node_topic(topic)
            reported = decode(topic, payload, Reported)
        except InvalidMessage:
            return  # the registry already counted it
        self.desired.observe_reported(node, reported.generation)

    def _sample_rates(self) -> None:
        now = time.monotonic()
        received = int(self.registry.counters["heartbeats"])
        then, before = self._last_rate_sample
        if now - then >= 1.0:
            self._heartbeat_rate = (received - before) / (now - then)
            self._last_rate_sample = (now, received)

    # ---- facade ----------------------------------------------------------------------------

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        return self.registry.nodes(selector)

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        return self.registry.set_labels(node_id, labels, replace_all=replace_all)

    def node(self, node_id: str) -> NodeDetail:
        view = self.registry.node_view(node_id)
        return NodeDetail(
            node=view,
            health_history=self.registry.health_history(node_id),
            commands=self.commands.for_node(node_id),
        )

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView:
        self.registry.node_view(node_id)  # NotFound for an id never seen
        return self.commands.send(node_id, action, args, expires_in)

    def command(self, command_id: str) -> CommandView:
        return self.commands.get(command_id)

    def start_rollout(self, request: RolloutRequest) -> RolloutView:
        return self.rollouts_engine.start(request)

    def rollouts(self) -> list[RolloutView]:
        return self.rollouts_engine.list()

    def rollout(self, rollout_id: str) -> RolloutView:
        return self.rollouts_engine.get(rollout_id)

    def pause_rollout(self, rollout_id: str) -> RolloutView:
        return self.rollouts_engine.pause(rollout_id)

    def resume_rollout(self, rollout_id: str) -> RolloutView:
        return self.rollouts_engine.resume(rollout_id)

    def abort_rollout(self, rollout_id: str) -> RolloutView:
        return self.rollouts_engine.abort(rollout_id)

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for status, count in self.registry.counts().items():
            values[f'fleet_nodes{{status="{status}"}}'] = float(count)
        for state, count in self.rollouts_engine.counts().items():
            values[f'fleet_rollouts{{state="{state}"}}'] = float(count)
        values["fleet_heartbeats_per_second"] = self._heartbeat_rate
        values["fleet_heartbeats_received_total"] = float(self.registry.counters["heartbeats"])
        values["fleet_invalid_messages_total"] = float(self.registry.counters["invalid_messages"])
        values["fleet_commands_pending"] = float(self.commands.pending_count())
        stats = self.release_service.stats()
        values["fleet_artifact_chunks_sent_total"] = float(stats.chunks_sent)
        values["fleet_artifact_bytes_sent_total"] = float(stats.bytes_sent)
        values["fleet_artifact_requests_dropped_total"] = float(stats.dropped)
        values["fleet_controller_tick_errors_total"] = float(self.tick_errors)
        values["fleet_controller_leader"] = 1.0 if self.leader else 0.0
        values |= reject_metrics(self.registry.rejects, self.desired.rejects, self.commands.rejects)
        values |= self.rollouts_engine.metrics()
        return values
