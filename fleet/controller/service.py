"""The fleet controller service: registry, command tracking, desired state, rollouts, release serving.

Threads, each owned and stopped by ``Controller.stop``: paho's network thread delivers messages to
the registry and the command tracker; the release service has its transfer workers; one tick
thread flushes telemetry, resends unacknowledged commands and drives rollouts; the HTTP API runs
in its own thread. All state lives in one SQLite file, so a restart (also after ``kill -9``)
resumes rollouts where they were.

The HTTP API's own state lives in the same file: API tokens (fleet.controller.auth), the audit
trail and idempotency keys (fleet.controller.audit). ``metrics`` holds the Prometheus registry; the
histograms are observed as things happen (heartbeat lag in the ingest path, command round trips and
wave durations read back from the database by the tick thread), the rest is read at scrape time.

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
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from certs import PkiError, Role, list_identities, load_control_key
from fleet.controller.audit import AuditLog, IdempotencyStore
from fleet.controller.auth import CertificateAuthenticator, TokenStore
from fleet.controller.clocks import ClockCollector
from fleet.controller.commands import CommandTracker
from fleet.controller.desired import DesiredPublisher
from fleet.controller.facade import (
    BadRequest,
    CertificateExpiry,
    CommandView,
    FleetStats,
    HealthView,
    IdentityView,
    NodeDetail,
    NodeEvent,
    NodeView,
    NotFound,
    PlannedWave,
    ReleaseView,
    RolloutPlan,
    RolloutProgress,
    RolloutRequest,
    RolloutView,
)
from fleet.controller.lease import Lease
from fleet.controller.metrics import ControllerMetrics, merged
from fleet.controller.mqtt import FleetMqtt, MqttOptions, TlsIdentity
from fleet.controller.registry import Registry
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.controller.rollouts import ACTIVE, AbortCriteria, RolloutEngine, node_order, parse_waves
from fleet.controller.settings import ControllerSettings
from fleet.controller.storage import Database
from fleet.protocol.codec import decode
from fleet.protocol.errors import ConfigError, InvalidMessage
from fleet.protocol.messages import ReleaseRef, Reported
from fleet.protocol.topics import Channel, all_nodes_filter, parse_node_topic
from fleet.releases import ReleaseError, ReleaseManifest, ReleaseNotFound, ReleaseStore

if TYPE_CHECKING:
    from fleet.controller.api import ApiServer

log = logging.getLogger(__name__)

INGEST_CHANNELS = (Channel.STATUS, Channel.HEARTBEAT, Channel.HEALTH, Channel.REPORTED, Channel.EVENTS)
# Split among controllers that share ingest: the periodic bulk, where a message lost with a dying
# controller is replaced by the next one. State changes (status, reported) and acks are rare and
# must not be lost that way, so every controller reads all of them (merging is idempotent).
SHARED_CHANNELS = frozenset({Channel.HEARTBEAT, Channel.HEALTH, Channel.EVENTS})
_HEARTBEAT_SUFFIX = "/" + Channel.HEARTBEAT.value
FINAL_ACKS = ("done", "failed", "rejected")  # the round trip ends with one of these
IDENTITY_REFRESH = 300.0  # seconds between re-reads of the PKI directory for certificate expiry
TICK_STALE = 10  # tick intervals without a finished round before /healthz says so


def version() -> str:
    try:
        return metadata.version("fleet-mqtt")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0"


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
        # Desired state and commands are signed with the PKI's control key (agents require it);
        # read first, so a missing key stops the start before anything is opened.
        self.signing_key = load_control_key(settings.pki)
        broker, timing, releases = settings.broker, settings.timing, settings.releases
        self.db = Database(settings.storage.db)
        self.mqtt = FleetMqtt(
            broker.host,
            broker.port,
            tls_identity(settings),
            options=MqttOptions(clean_session=broker.share is not None),
        )
        self.registry = Registry(
            self.db,
            stale_after=timing.stale_after,
            offline_after=timing.offline_after,
            clock_warn=timing.clock_skew_warn,
        )
        self.commands = CommandTracker(self.db, self._publish, signing_key=self.signing_key)
        self.desired = DesiredPublisher(self.db, self._publish_retained, signing_key=self.signing_key)
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
        # The HTTP API's state: tokens, audit trail, idempotency keys (api.ApiSecurity bundles them).
        self.tokens = TokenStore(self.db)
        self.audit = AuditLog(self.db)
        self.idempotency = IdempotencyStore(self.db)
        self.certificates = CertificateAuthenticator(settings.pki)
        self.metrics = ControllerMetrics(version(), self.stats)
        self.metrics.registry.register(ClockCollector(self.registry.clocks))
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self._heartbeat_rate = 0.0
        self._last_rate_sample = (time.monotonic(), 0)
        self.tick_errors = 0
        self._last_tick: float | None = None  # monotonic time the last tick round finished
        self._last_heartbeat: dict[str, float] = {}  # node -> monotonic receipt (paho's thread only)
        self._ack_seq = self._max("SELECT COALESCE(MAX(seq), 0) FROM command_acks")
        self._waves_upto = self._max("SELECT COALESCE(MAX(finished_at), 0) FROM rollout_waves")
        self._identities: list[IdentityView] = []
        self._identities_read = float("-inf")
        self._identities_lock = threading.Lock()

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
        self.releases.close()  # the delta worker: a half-made delta is never published under its final name
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
        steps += [("rates", self._sample_rates), ("histograms", self._observe_finished)]
        for name, step in steps:
            try:
                step()
            except Exception:
                self.tick_errors += 1
                log.exception("controller tick step %s failed", name)
        self._last_tick = time.monotonic()

    # ---- MQTT ------------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, qos: int) -> object:
        return self.mqtt.publish(topic, payload, qos)

    def _publish_retained(self, topic: str, payload: bytes, qos: int, retain: bool) -> object:
        return self.mqtt.publish(topic, payload, qos, retain)

    def _ingest(self, topic: str, payload: bytes) -> None:
        self.registry.on_message(topic, payload)
        if topic.endswith(_HEARTBEAT_SUFFIX):
            self._observe_heartbeat(topic)
        elif topic.endswith("/" + Channel.REPORTED.value):
            self._observe_generation(topic, payload)

    def _observe_heartbeat(self, topic: str) -> None:
        """The gap since the node's previous heartbeat, as received (paho's thread only)."""
        try:
            node, _channel = parse_node_topic(topic)
        except InvalidMessage:
            return
        now = time.monotonic()
        previous = self._last_heartbeat.get(node)
        self._last_heartbeat[node] = now
        if previous is not None:
            self.metrics.heartbeat_lag.observe(now - previous)

    def _observe_finished(self) -> None:
        """Command round trips and wave durations that finished since the last tick (read back from
        the tables of fleet.controller.commands and fleet.controller.rollouts; observed once each)."""
        rows = self.db.query(
            "SELECT a.seq, a.status, a.ts - c.created FROM command_acks a JOIN commands c ON c.id = a.command_id"
            " WHERE a.seq > ? AND a.status IN (?, ?, ?) ORDER BY a.seq LIMIT 10000",
            (self._ack_seq, *FINAL_ACKS),
        )
        for seq, status, seconds in rows:
            self.metrics.command_round_trip.labels(status=status).observe(max(seconds, 0.0))
            self._ack_seq = max(self._ack_seq, seq)
        if len(rows) < 10000:  # everything read: skip acks of other statuses next time
            self._ack_seq = max(self._ack_seq, self._max("SELECT COALESCE(MAX(seq), 0) FROM command_acks"))
        waves = self.db.query(
            "SELECT started_at, finished_at FROM rollout_waves WHERE finished_at > ? ORDER BY finished_at",
            (self._waves_upto,),
        )
        for started_at, finished_at in waves:
            if started_at is not None:
                self.metrics.wave_duration.observe(max(finished_at - started_at, 0.0))
            self._waves_upto = max(self._waves_upto, finished_at)

    def _max(self, sql: str) -> float:
        return float(self.db.query(sql)[0][0])

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
            events=self.node_events(node_id),
        )

    def node_events(self, node_id: str) -> list[NodeEvent]:
        return [
            NodeEvent(kind=event.kind, detail=event.detail, data=dict(event.data), ts=event.ts)
            for event in self.registry.recent_events(node_id)
        ]

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView:
        self.registry.node_view(node_id)  # NotFound for an id never seen
        return self.commands.send(node_id, action, args, expires_in)

    def command(self, command_id: str) -> CommandView:
        return self.commands.get(command_id)

    def cancel_command(self, command_id: str) -> CommandView:
        return self.commands.cancel(command_id)

    def start_rollout(self, request: RolloutRequest) -> RolloutView:
        return self.rollouts_engine.start(request)

    def plan_rollout(self, request: RolloutRequest) -> RolloutPlan:
        """The engine's own functions on a provisional rollout id: canaries first, then an order drawn
        per rollout, so the nodes of later waves are drawn again when the rollout really starts."""
        name, _, release_version = request.release.rpartition("@")
        try:
            self.releases.get(name, release_version)
        except ReleaseNotFound as exc:
            raise NotFound(f"release {request.release}: not in the release store") from exc
        except ReleaseError as exc:
            raise BadRequest(f"release {request.release!r}: {exc}") from exc
        AbortCriteria.parse(request.max_failures, request.min_finished)
        selected = self.registry.nodes(request.selector or None)
        if not selected:
            raise BadRequest(f"selector {request.selector} matches no node")
        ordered = node_order("r-plan-" + uuid.uuid4().hex[:8], selected)
        ends = parse_waves(request.waves, len(ordered))
        waves, start = [], 0
        for number, end in enumerate(ends, start=1):
            waves.append(PlannedWave(number=number, nodes=[node.id for node in ordered[start:end]]))
            start = end
        ids = {node.id for node in selected}
        active = self.rollouts_engine.active()
        conflicts = [view.id for view in active if ids & set(view.nodes) or view.selector == request.selector]
        canaries = [node.id for node in ordered if node.operator_labels.get("ring") == "canary"]
        return RolloutPlan(
            release=request.release,
            selector=request.selector,
            nodes=len(ordered),
            waves=waves,
            canaries=canaries,
            conflicts=conflicts,
            note="canary nodes (operator label ring=canary) go first; the others follow in an order drawn per"
            " rollout, so which of them land in a later wave is drawn again when the rollout starts",
        )

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

    def releases_list(self) -> list[ReleaseManifest]:
        """Every readable release of the store; a broken manifest is logged and skipped, not fatal."""
        try:
            return self.releases.list()
        except ReleaseError as exc:
            log.warning("release store: %s (listing the readable releases one by one)", exc)
        found = []
        for path in sorted(self.releases.root.glob("*/*/manifest.json")):
            try:
                found.append(self.releases.get(path.parent.parent.name, path.parent.name))
            except ReleaseError as exc:
                log.warning("release store: skipping %s: %s", path, exc)
        return found

    def list_releases(self) -> list[ReleaseView]:
        return [_release_view(manifest) for manifest in self.releases_list()]

    def identities(self) -> list[IdentityView]:
        """The certificates the controller knows: the PKI directory's (re-read every few minutes) and
        the operators seen on the API."""
        now = time.monotonic()
        with self._identities_lock:
            if now - self._identities_read >= IDENTITY_REFRESH:
                self._identities = self._read_identities()
                self._identities_read = now
            known = list(self._identities)
        listed = {(view.name, view.role) for view in known}
        for name, (access, not_after) in sorted(self.certificates.seen.copy().items()):
            if (name, "operator") not in listed:
                known.append(
                    IdentityView(name=name, role="operator", access=access.value, not_after=not_after, source="api")
                )
        return known

    def _read_identities(self) -> list[IdentityView]:
        pki = self.settings.pki
        views: list[IdentityView] = []
        for role, path in (("ca", pki.ca_cert), ("ca", pki.issuing_cert)):
            if path.exists():
                cert = x509.load_pem_x509_certificate(path.read_bytes())
                name, not_after = cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp()
                views.append(IdentityView(name=name, role=role, not_after=not_after, source="pki"))
        try:
            infos = list_identities(pki, roles=(Role.SERVER, Role.CONTROLLER, Role.OPERATOR))
        except PkiError as exc:
            log.warning("identities: %s", exc)
            infos = []
        for info in infos:
            views.append(
                IdentityView(
                    name=info.name,
                    role=info.role.value,
                    access=info.access.value if info.access is not None else None,
                    not_after=info.not_after.timestamp(),
                    revoked=info.revoked,
                    source="pki",
                )
            )
        own = {self.settings.http.cert} if self.settings.http.cert is not None else set()
        for path in own:
            views.append(_file_identity(path, "server"))
        return views

    def health(self) -> HealthView:
        broker = "connected" if self.mqtt.connected.is_set() else "disconnected"
        database = self.db.ping(1.0)
        tick_age = None if self._last_tick is None else time.monotonic() - self._last_tick
        ticking = tick_age is not None and tick_age <= TICK_STALE * self.settings.timing.tick_interval + 5
        return HealthView(
            ok=broker == "connected" and database is None and ticking,
            broker=broker,
            database=database or "ok",
            leader=self.leader,
            tick_age=None if tick_age is None else round(tick_age, 3),
        )

    def stats(self) -> FleetStats:
        nodes = self.registry.nodes()
        versions: dict[str, int] = {}
        health: dict[str, int] = {"healthy": 0, "unhealthy": 0, "unknown": 0}
        for node in nodes:
            versions[node.version or "unknown"] = versions.get(node.version or "unknown", 0) + 1
            health[{True: "healthy", False: "unhealthy", None: "unknown"}[node.healthy]] += 1
        active = [row[0] for row in self.db.query(
            "SELECT id FROM rollouts WHERE state IN (?, ?, ?) ORDER BY created",
            tuple(state.value for state in ACTIVE),
        )]  # fmt: skip
        progress = []
        for rollout_id in active:
            view = self.rollouts_engine.get(rollout_id)
            outcomes: dict[str, int] = {}
            for outcome in view.nodes.values():
                outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
            progress.append(
                RolloutProgress(
                    id=view.id,
                    release=view.release,
                    state=view.state.value,
                    wave=min(view.current_wave + 1, len(view.waves)),
                    waves=len(view.waves),
                    outcomes=outcomes,
                )
            )
        release = self.release_service.stats()
        # One C-level copy of a dict subclass without its own __iter__: atomic under the GIL.
        node_errors = dict(self.rollouts_engine.node_errors)
        return FleetStats(
            nodes_by_status=self.registry.counts(),
            nodes_by_version=versions,
            nodes_by_health=health,
            rollouts_by_state=self.rollouts_engine.counts(),
            rollouts=progress,
            heartbeats_received=int(self.registry.counters["heartbeats"]),
            heartbeat_rate=self._heartbeat_rate,
            invalid_messages=int(self.registry.counters["invalid_messages"]),
            commands_pending=self.commands.pending_count(),
            artifact_chunks_sent=release.chunks_sent,
            artifact_bytes_sent=release.bytes_sent,
            artifact_requests_dropped=release.dropped,
            artifact_requests_limited={
                "replaced": release.replaced,
                "clamped": release.clamped,
                "refused": release.refused,
                "full_for_delta": release.full_for_delta,
            },
            deltas_pending=self.releases.deltas_pending(),
            tick_errors=self.tick_errors,
            leader=self.leader,
            rejected_values=merged(
                self.registry.rejects.counts(), self.desired.rejects.counts(), self.commands.rejects.counts()
            ),
            rollout_node_errors=node_errors,
            certificates=self._certificate_expiry(),
        )

    def _certificate_expiry(self) -> list[CertificateExpiry]:
        own = tls_identity(self.settings)
        listed = [CertificateExpiry(view.name, view.role, view.not_after) for view in self.identities()]
        names = {(entry.name, entry.role) for entry in listed}
        try:
            mine = _file_identity(own.cert, "controller")
        except (OSError, ValueError):
            return listed
        if (mine.name, mine.role) not in names:
            listed.append(CertificateExpiry(mine.name, mine.role, mine.not_after))
        return listed

    def metric_values(self) -> dict[str, float]:
        """Every sample of the metrics registry as ``name{labels}`` -> value (for benchmarks and tests)."""
        values: dict[str, float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values


def _release_view(manifest: ReleaseManifest) -> ReleaseView:
    probe = manifest.health
    return ReleaseView(
        name=manifest.name,
        version=manifest.version,
        label=manifest.label,
        digest=manifest.digest,
        size=manifest.size,
        chunks=len(manifest.chunk_digests),
        chunk_size=manifest.chunk_size,
        entry=list(manifest.entry),
        health_probe=None if probe is None else f"{probe.kind} {probe.target}",
        created_at=float(manifest.created_at),
        signed=manifest.signature is not None,
    )


def _file_identity(path: Path, role: str) -> IdentityView:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(names[0].value) if names else cert.subject.rfc4514_string()
    return IdentityView(name=name, role=role, not_after=cert.not_valid_after_utc.timestamp(), source="pki")


def serve_http(controller: Controller) -> list[ApiServer]:
    """Start the HTTP API of ``controller`` (HTTPS, or plain HTTP on loopback with ``http.insecure``)
    and, with ``metrics.host`` set, the unauthenticated metrics listener; returns both servers, API
    first. ``ConfigError`` when one cannot listen or the TLS files cannot be read."""
    from fleet.controller.api import (
        ApiSecurity,
        TlsFiles,
        allowed_hosts,
        create_app,
        create_metrics_app,
        serve_in_thread,
    )
    from fleet.controller.auth import HostCheck

    settings = controller.settings
    http, pki = settings.http, settings.pki
    tls = None
    if not http.insecure:
        tls = TlsFiles(http.cert or pki.server_cert, http.key or pki.server_key, pki.ca_cert)
        for path in (tls.cert, tls.key, tls.ca):
            if not path.is_file():
                raise ConfigError(f"{path}: no such file (the API's TLS files: http.cert, http.key, the PKI's ca.pem)")
    try:
        hosts = allowed_hosts(http.host, tls, http.allowed_hosts)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{tls.cert if tls else http.host}: cannot read the API certificate: {exc}") from exc
    security = ApiSecurity(
        tokens=controller.tokens,
        audit=controller.audit,
        idempotency=controller.idempotency,
        metrics=controller.metrics,
        certificates=controller.certificates if tls is not None else None,
        hosts=hosts,
    )
    api = serve_in_thread(create_app(controller, security), http.host, http.port, tls=tls)
    servers = [api]
    metrics = settings.metrics
    if metrics.host is not None:
        check = HostCheck.for_listener(metrics.host, [], http.allowed_hosts)
        app = create_metrics_app(controller.metrics, controller.health, check)
        try:
            servers.append(serve_in_thread(app, metrics.host, metrics.port, name="metrics", option="--metrics"))
        except ConfigError:
            api.stop()
            raise
    return servers
