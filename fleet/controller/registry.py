"""The node registry: every node the controller has heard from, built from the nodes' own messages.

There is no pre-registration: a node exists from its first valid message (the broker's policy makes
sure only certificate-authenticated ids can publish on their topics). All state lives in memory and
is the truth for reads; SQLite is written in batches by ``flush()`` (called from the controller's
tick thread) so heartbeat ingest is never bound by fsync. A controller restart loads the DB back.

Controllers that split ingest with a shared subscription share one database file: each writes the
nodes it heard from, merging group by group (status, reported, health, heartbeat) so the newest
of each wins whichever process wrote it, and ``refresh()`` folds the other processes' writes
into memory the same way.

Times are the controller's own clock at receipt, never the agent's ``ts``: statuses and silence
must be judged on one clock, and devices' clocks drift. How far each drifts is measured from those
``ts`` (``clocks``, fleet.controller.clocks) and shown with the node.

Nothing a device reports is taken on trust: every message is screened against the controller's
bounds (fleet/controller/bounds.py) before it changes anything, and a message with a value out of
bounds is dropped, counted in ``rejects`` and logged.

Labels come from two sides. A node reports its own (``reported_labels``); an operator sets labels
on the controller (``operator_labels``, stored here, never sent by the device). A node's effective
``labels`` are its reported ones overlaid with the operator's: selectors match those. Decisions that
a device must not be able to make for itself (the canary ring) read the operator labels only.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from fleet.controller.bounds import (
    MAX_GENERATION,
    MAX_OPERATOR_LABELS,
    OutOfBounds,
    Rejects,
    check_operator_label,
    screen,
)
from fleet.controller.clocks import DeviceClocks
from fleet.controller.facade import BadRequest, HealthRecord, NodeStatus, NodeView, NotFound
from fleet.controller.storage import Database
from fleet.protocol.codec import MAX_PAYLOAD, decode_for_channel
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import Event, Health, Heartbeat, Message, Reported, Status
from fleet.protocol.topics import Channel, all_nodes_filter

log = logging.getLogger(__name__)

CHANNELS: tuple[Channel, ...] = (
    Channel.STATUS,
    Channel.HEARTBEAT,
    Channel.HEALTH,
    Channel.REPORTED,
    Channel.EVENTS,
)
"""The node channels the registry reads; subscribe ``FILTERS`` and route them to ``on_message``."""

FILTERS: tuple[str, ...] = tuple(all_nodes_filter(channel) for channel in CHANNELS)

_REFRESH_OVERLAP = 5.0
"""Seconds re-read by each refresh: a write stamped just before the last refresh may commit after it."""

RECENT_EVENTS = 10
"""Events kept per node in memory (they are for people looking at one node, not for decisions)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS registry_nodes (
    id TEXT PRIMARY KEY,
    connection TEXT,
    status_ts REAL,
    agent_version TEXT,
    version TEXT,
    previous_version TEXT,
    update_state TEXT,
    generation INTEGER,
    labels TEXT NOT NULL DEFAULT '{}',
    reported_ts REAL,
    healthy INTEGER,
    health_ts REAL,
    last_seen REAL,
    heartbeat_ts REAL,
    heartbeat TEXT NOT NULL DEFAULT '{}',
    updated REAL,
    operator_labels TEXT NOT NULL DEFAULT '{}',
    operator_labels_ts REAL
);
CREATE TABLE IF NOT EXISTS registry_health (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    node TEXT NOT NULL,
    ts REAL NOT NULL,
    healthy INTEGER NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS registry_health_node ON registry_health (node, seq);
"""

_COLUMNS = (
    "id, connection, status_ts, agent_version, version, previous_version, update_state, generation, labels,"
    " reported_ts, healthy, health_ts, last_seen, heartbeat_ts, heartbeat, operator_labels, operator_labels_ts"
)
# Columns added after the first release of the table: (name, declaration) for Database.add_column.
_ADDED_COLUMNS = (
    ("updated", "REAL"),
    ("operator_labels", "TEXT NOT NULL DEFAULT '{}'"),
    ("operator_labels_ts", "REAL"),
)
# Each group of columns comes from one kind of message and has its own timestamp: the newer side
# wins per group, so two controllers writing the same node never put older facts over newer ones.
_GROUPS = (
    ("status_ts", ("connection", "agent_version")),
    ("reported_ts", ("version", "previous_version", "update_state", "generation", "labels")),
    ("health_ts", ("healthy",)),
    ("heartbeat_ts", ("heartbeat",)),
    ("operator_labels_ts", ("operator_labels",)),
)


def _newer(ts: str, column: str) -> str:
    return (
        f"{column} = CASE WHEN COALESCE(excluded.{ts}, -1) >= COALESCE(registry_nodes.{ts}, -1)"
        f" THEN excluded.{column} ELSE registry_nodes.{column} END"
    )


def _latest(ts: str) -> str:
    return f"NULLIF(MAX(COALESCE(excluded.{ts}, -1), COALESCE(registry_nodes.{ts}, -1)), -1)"


_ASSIGNMENTS = ", ".join(
    [_newer(ts, column) for ts, columns in _GROUPS for column in columns]
    + [f"{ts} = {_latest(ts)}" for ts in (*(ts for ts, _columns in _GROUPS), "last_seen")]
    + ["updated = excluded.updated"]
)
# Built from the constants above only, never from input.
_UPSERT = (
    f"INSERT INTO registry_nodes ({_COLUMNS}, updated) VALUES ({', '.join('?' * (_COLUMNS.count(',') + 2))})"  # noqa: S608
    f" ON CONFLICT (id) DO UPDATE SET {_ASSIGNMENTS}"
)
_SELECT = f"SELECT {_COLUMNS} FROM registry_nodes"  # noqa: S608 - constant column list
# Keeps the newest ``health_history`` rows of one node: deletes everything at or below the first
# row past the limit (the subquery is NULL while the node has fewer rows, deleting nothing).
_TRIM_HEALTH = (
    "DELETE FROM registry_health WHERE node = ? AND seq <= "
    "(SELECT seq FROM registry_health WHERE node = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)


@dataclass(slots=True)
class _Node:
    """Everything known about one node; mutated only under ``Registry._lock``."""

    id: str
    connection: str | None = None  # "online"/"offline" from the last status message (or last will)
    status_ts: float | None = None
    agent_version: str | None = None
    version: str | None = None
    previous_version: str | None = None
    update_state: str | None = None
    generation: int | None = None
    labels: dict[str, str] = field(default_factory=dict)  # as the node reports them
    reported_ts: float | None = None
    healthy: bool | None = None
    health_ts: float | None = None
    last_seen: float | None = None
    heartbeat_ts: float | None = None
    heartbeat: dict[str, Any] = field(default_factory=dict)
    operator_labels: dict[str, str] = field(default_factory=dict)  # set on the controller, never by the node
    operator_labels_ts: float | None = None
    health: collections.deque[HealthRecord] = field(default_factory=collections.deque)
    events: collections.deque[Event] = field(default_factory=lambda: collections.deque(maxlen=RECENT_EVENTS))

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.connection,
            self.status_ts,
            self.agent_version,
            self.version,
            self.previous_version,
            self.update_state,
            self.generation,
            json.dumps(self.labels, sort_keys=True),
            self.reported_ts,
            None if self.healthy is None else int(self.healthy),
            self.health_ts,
            self.last_seen,
            self.heartbeat_ts,
            json.dumps(self.heartbeat, sort_keys=True),
            json.dumps(self.operator_labels, sort_keys=True),
            self.operator_labels_ts,
        )

    def effective_labels(self) -> dict[str, str]:
        return self.labels | self.operator_labels


class Registry:
    """Nodes from their status, heartbeat, health, reported and events messages. Thread-safe."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], float] = time.time,
        stale_after: float = 90.0,
        offline_after: float = 300.0,
        flush_interval: float = 0.5,
        health_history: int = 50,
        max_payload: int = MAX_PAYLOAD,
        clock_warn: float = 300.0,
    ) -> None:
        if not 0 < stale_after <= offline_after:
            raise ValueError("need 0 < stale_after <= offline_after")
        if health_history < 1:
            raise ValueError("health_history must be at least 1")
        self.db = db
        self.clock = clock
        self.stale_after = stale_after
        self.offline_after = offline_after
        self.flush_interval = flush_interval  # read by the controller's tick thread
        self.history_limit = health_history
        self.max_payload = max_payload
        self.counters: collections.Counter[str] = collections.Counter()
        self.rejects = Rejects()  # device values out of bounds, by field (see fleet/controller/bounds.py)
        self.clocks = DeviceClocks(warn_after=clock_warn)  # each node's clock offset, from its timestamps
        self._lock = threading.Lock()
        # Serialises flushes: each writes full rows, so they must land in the order they were taken.
        self._flush_lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._dirty: set[str] = set()
        self._pending_health: list[tuple[str, HealthRecord]] = []
        self._handlers: dict[Channel, Callable[[_Node, Any, float], None]] = {
            Channel.STATUS: self._on_status,
            Channel.HEARTBEAT: self._on_heartbeat,
            Channel.HEALTH: self._on_health,
            Channel.REPORTED: self._on_reported,
            Channel.EVENTS: self._on_event,
        }
        db.migrate(SCHEMA)
        _add_columns(db)
        self._refreshed_upto = 0.0  # newest `updated` folded in by refresh()
        self._health_seq = 0  # newest registry_health row folded in
        self._load()

    # ---- ingest (paho's thread) ------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """Take one message from a node topic; bad input is logged and counted, never raised."""
        self._take(topic, payload, replayed=False)

    def on_replay(self, topic: str, payload: bytes) -> None:
        """Take a retained message the broker replayed on subscribing (every controller start does).

        It is the node's last word from some time ago, not a sign of life: it never refreshes
        last_seen, and one that matches what the registry already holds changes nothing. Counting
        it as fresh made every offline node look online for a moment after a controller restart,
        so a rollout wave judged it "seen" and failed it instead of calling it unreachable.
        """
        self._take(topic, payload, replayed=True)

    def _take(self, topic: str, payload: bytes, *, replayed: bool) -> None:
        try:
            node_id, channel, message = decode_for_channel(topic, payload, max_size=self.max_payload)
        except InvalidMessage as exc:
            self._count("invalid_messages")
            log.warning("registry: ignored message: %s", exc)
            return
        handler = self._handlers.get(channel)
        if handler is None:
            self._count("invalid_messages", "unhandled_channel")
            log.warning("registry: ignored message on %s: channel %s is not read by the registry", topic, channel)
            return
        now = self.clock()
        stamped = getattr(message, "ts", None)  # before screen() may replace one far off our clock
        try:
            message = screen(node_id, channel.value, message, now, self.rejects)
        except OutOfBounds:
            self._count("rejected_messages")  # counted per field and logged by screen()
            return
        if not replayed:
            self.clocks.observe(node_id, stamped, now)
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                node = self._nodes[node_id] = _Node(node_id, health=collections.deque(maxlen=self.history_limit))
                log.info("registry: new node %s (first message on %s)", node_id, channel)
            elif replayed and _already_known(node, message):
                self.counters["replays_known"] += 1
                return
            if not replayed:
                node.last_seen = now
            handler(node, message, now)
            self._dirty.add(node_id)

    def _count(self, *names: str) -> None:
        with self._lock:
            self.counters.update(names)

    def _on_status(self, node: _Node, message: Message, now: float) -> None:
        assert isinstance(message, Status)
        self.counters["status"] += 1
        node.connection = message.state
        node.status_ts = now
        if message.agent_version is not None:
            node.agent_version = message.agent_version

    def _on_heartbeat(self, node: _Node, message: Message, now: float) -> None:
        assert isinstance(message, Heartbeat)
        self.counters["heartbeats"] += 1
        node.heartbeat = message.model_dump(exclude_none=True)
        node.heartbeat_ts = now
        if node.connection == "offline":
            # A live heartbeat after the last will: the node is back even if its online status was
            # lost. Only heartbeats count here; retained reported messages replay for dead nodes.
            node.connection = "online"
            node.status_ts = now

    def _on_health(self, node: _Node, message: Message, now: float) -> None:
        assert isinstance(message, Health)
        self.counters["health"] += 1
        node.healthy = message.healthy
        node.health_ts = now
        record = HealthRecord(ts=now, healthy=message.healthy, detail=_health_detail(message))
        node.health.append(record)
        self._pending_health.append((node.id, record))

    def _on_reported(self, node: _Node, message: Message, now: float) -> None:
        assert isinstance(message, Reported)
        self.counters["reported"] += 1
        node.version = message.version
        node.previous_version = message.previous_version
        node.update_state = message.state.value
        node.generation = message.generation
        node.labels = dict(message.labels)
        node.reported_ts = now

    def _on_event(self, node: _Node, message: Message, _now: float) -> None:
        assert isinstance(message, Event)
        self.counters["events"] += 1
        node.events.append(message)

    # ---- operator labels (API threads) -----------------------------------------------------

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        """Change a node's operator labels: each ``key: value`` sets one, ``key: None`` removes it;
        with ``replace_all`` the given labels become the whole set. Written to the database before
        it takes effect. ``NotFound`` for a node never heard from, ``BadRequest`` for a bad label."""
        problems = [problem for key, value in labels.items() if (problem := check_operator_label(key, value))]
        if problems:
            raise BadRequest("; ".join(problems))
        with self._flush_lock:
            with self._lock:
                node = self._get(node_id)
                new = {} if replace_all else dict(node.operator_labels)
                for key, value in labels.items():
                    if value is None:
                        new.pop(key, None)
                    else:
                        new[key] = value
                if len(new) > MAX_OPERATOR_LABELS:
                    raise BadRequest(f"node {node_id}: at most {MAX_OPERATOR_LABELS} operator labels, not {len(new)}")
                now = max(self.clock(), (node.operator_labels_ts or 0.0) + 1e-6)  # later than the last change
                row = (*replace(node, operator_labels=new, operator_labels_ts=now).row(), now)
            self._write([row], [])  # an error leaves everything as it was
            with self._lock:
                node.operator_labels, node.operator_labels_ts = new, now
                view = self._view(node, self.clock())
        log.info("registry: operator labels of %s: %s", node_id, _format_labels(new))
        return view

    # ---- persistence -----------------------------------------------------------------------

    def flush(self) -> int:
        """Write every node changed since the last flush in one transaction; returns how many.

        On a database error the changes stay queued for the next flush and the error is raised.
        """
        with self._flush_lock:
            with self._lock:
                now = self.clock()
                rows = [(*self._nodes[node_id].row(), now) for node_id in self._dirty]
                health = self._pending_health
                self._dirty = set()
                self._pending_health = []
            if not rows and not health:
                return 0
            try:
                self._write(rows, health)
            except Exception:
                self._requeue(rows, health)
                raise
            return len(rows)

    def _write(self, rows: list[tuple[Any, ...]], health: list[tuple[str, HealthRecord]]) -> None:
        with self.db.transaction() as conn:
            conn.executemany(_UPSERT, rows)
            conn.executemany(
                "INSERT INTO registry_health (node, ts, healthy, detail) VALUES (?, ?, ?, ?)",
                [(node_id, rec.ts, int(rec.healthy), rec.detail) for node_id, rec in health],
            )
            for node_id in {node_id for node_id, _rec in health}:
                conn.execute(_TRIM_HEALTH, (node_id, node_id, self.history_limit))

    def _requeue(self, rows: list[tuple[Any, ...]], health: list[tuple[str, HealthRecord]]) -> None:
        with self._lock:
            self._dirty.update(row[0] for row in rows)
            self._pending_health[:0] = health  # in front: they are older than anything since

    def refresh(self) -> int:
        """Fold in what other controllers sharing this database wrote since the last refresh (newest
        wins per group, as on disk); returns how many node rows were read. Only needed with shared
        ingest: a controller alone holds everything in memory already."""
        since = self._refreshed_upto - _REFRESH_OVERLAP
        rows = self.db.query(f"SELECT {_COLUMNS}, updated FROM registry_nodes WHERE updated > ?", (since,))  # noqa: S608
        history = self.db.query(
            "SELECT seq, node, ts, healthy, detail FROM registry_health WHERE seq > ? ORDER BY seq", (self._health_seq,)
        )
        with self._lock:
            for *row, updated in rows:
                self._refreshed_upto = max(self._refreshed_upto, updated)
                theirs = _node_from_row(row, self.history_limit)
                ours = self._nodes.get(theirs.id)
                if ours is None:
                    self._nodes[theirs.id] = theirs
                else:
                    _merge_newer(ours, theirs)
            touched = set()
            for seq, node_id, ts, healthy, detail in history:
                self._health_seq = max(self._health_seq, seq)
                node = self._nodes.get(node_id)
                record = HealthRecord(ts=ts, healthy=bool(healthy), detail=detail)
                if node is not None and record not in node.health:
                    node.health.append(record)
                    touched.add(node_id)
            for node_id in touched:
                node = self._nodes[node_id]
                node.health = collections.deque(sorted(node.health, key=lambda r: r.ts), maxlen=self.history_limit)
        return len(rows)

    def _load(self) -> None:
        rows = self.db.query(_SELECT)
        history = self.db.query("SELECT node, ts, healthy, detail FROM registry_health ORDER BY seq")
        self._refreshed_upto = self.db.query("SELECT COALESCE(MAX(updated), 0) FROM registry_nodes")[0][0]
        self._health_seq = self.db.query("SELECT COALESCE(MAX(seq), 0) FROM registry_health")[0][0]
        with self._lock:
            for row in rows:
                node = _node_from_row(row, self.history_limit)
                self._nodes[node.id] = node
            for node_id, ts, healthy, detail in history:
                if node_id in self._nodes:
                    self._nodes[node_id].health.append(HealthRecord(ts=ts, healthy=bool(healthy), detail=detail))
        if rows:
            log.info("registry: loaded %d nodes from %s", len(rows), self.db.path)

    # ---- reads (any thread) ----------------------------------------------------------------

    def status_of(self, node_id: str) -> NodeStatus:
        """ONLINE, STALE (online but silent for stale_after) or OFFLINE (said so, or silent for offline_after)."""
        with self._lock:
            return self._status(self._get(node_id), self.clock())

    def _status(self, node: _Node, now: float) -> NodeStatus:
        silence = now - node.last_seen if node.last_seen is not None else float("inf")
        if node.connection == "offline" or silence > self.offline_after:
            return NodeStatus.OFFLINE
        if silence > self.stale_after:
            return NodeStatus.STALE
        return NodeStatus.ONLINE

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        """Nodes whose effective labels (reported, overlaid with the operator's) include every
        ``selector`` pair (all nodes without one), sorted by id."""
        wanted = (selector or {}).items()
        with self._lock:
            now = self.clock()
            matching = [node for node in self._nodes.values() if wanted <= node.effective_labels().items()]
            return sorted((self._view(node, now) for node in matching), key=lambda view: view.id)

    def node_view(self, node_id: str) -> NodeView:
        with self._lock:
            return self._view(self._get(node_id), self.clock())

    def health_history(self, node_id: str) -> list[HealthRecord]:
        """The node's last ``health_history`` health messages, oldest first."""
        with self._lock:
            return list(self._get(node_id).health)

    def recent_events(self, node_id: str) -> list[Event]:
        with self._lock:
            return list(self._get(node_id).events)

    def known(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._nodes

    def counts(self) -> dict[str, int]:
        """Number of nodes by status; every status is present, zeros included (for metrics)."""
        counts = dict.fromkeys((status.value for status in NodeStatus), 0)
        with self._lock:
            now = self.clock()
            for node in self._nodes.values():
                counts[self._status(node, now).value] += 1
        return counts

    def _get(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise NotFound(f"unknown node {node_id!r}")
        return node

    def _view(self, node: _Node, now: float) -> NodeView:
        return NodeView(
            id=node.id,
            status=self._status(node, now),
            version=node.version if node.version is not None else node.heartbeat.get("version"),
            previous_version=node.previous_version,
            update_state=node.update_state,
            healthy=node.healthy,
            generation=node.generation,
            labels=node.effective_labels(),
            operator_labels=dict(node.operator_labels),
            reported_labels=dict(node.labels),
            last_seen=node.last_seen,
            health_ts=node.health_ts,
            reported_ts=node.reported_ts,
            agent_version=node.agent_version,
            heartbeat=dict(node.heartbeat),
            clock_offset=self.clocks.offset(node.id),
        )


def _node_from_row(row: Iterable[Any], history: int) -> _Node:
    (
        node_id,
        connection,
        status_ts,
        agent_version,
        version,
        previous_version,
        update_state,
        generation,
        labels,
        reported_ts,
        healthy,
        health_ts,
        last_seen,
        heartbeat_ts,
        heartbeat,
        operator_labels,
        operator_labels_ts,
    ) = row
    if generation is not None and generation > MAX_GENERATION:
        generation = None  # stored by a controller before the bounds (fleet/controller/bounds.py)
    return _Node(
        id=node_id,
        connection=connection,
        status_ts=status_ts,
        agent_version=agent_version,
        version=version,
        previous_version=previous_version,
        update_state=update_state,
        generation=generation,
        labels=json.loads(labels),
        reported_ts=reported_ts,
        healthy=None if healthy is None else bool(healthy),
        health_ts=health_ts,
        last_seen=last_seen,
        heartbeat_ts=heartbeat_ts,
        heartbeat=json.loads(heartbeat),
        operator_labels=json.loads(operator_labels),
        operator_labels_ts=operator_labels_ts,
        health=collections.deque(maxlen=history),
    )


def _format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "none"


def _health_detail(message: Health) -> str | None:
    """One line for people: the failing probes (or the consecutive failure count)."""
    failing = [f"{probe.name}: {probe.detail or 'failed'}" for probe in message.probes if not probe.ok]
    if message.consecutive_failures:
        failing.append(f"{message.consecutive_failures} consecutive failures")
    return "; ".join(failing) or None


def _already_known(node: _Node, message: Message) -> bool:
    """Whether a replayed retained message says nothing the registry does not already hold."""
    if isinstance(message, Reported):
        return (
            node.reported_ts is not None
            and node.version == message.version
            and node.previous_version == message.previous_version
            and node.update_state == message.state.value
            and node.generation == message.generation
            and node.labels == dict(message.labels)
        )
    if isinstance(message, Status):
        return node.status_ts is not None and node.connection == message.state
    return False


def _merge_newer(ours: _Node, theirs: _Node) -> None:
    """Take each group of fields from ``theirs`` where its timestamp is newer (the SQL merge, in memory)."""
    for ts, columns in _GROUPS:
        if (getattr(theirs, ts) or -1.0) > (getattr(ours, ts) or -1.0):
            setattr(ours, ts, getattr(theirs, ts))
            for column in columns:
                setattr(ours, column, getattr(theirs, column))
    if (theirs.last_seen or -1.0) > (ours.last_seen or -1.0):
        ours.last_seen = theirs.last_seen


def _add_columns(db: Database) -> None:
    """Databases from before shared ingest lack ``registry_nodes.updated``, from before operator
    labels ``operator_labels`` and ``operator_labels_ts``."""
    for column, declaration in _ADDED_COLUMNS:
        if db.add_column("registry_nodes", column, declaration):
            log.info("registry: added column registry_nodes.%s to %s", column, db.path)
    db.execute("CREATE INDEX IF NOT EXISTS registry_nodes_updated ON registry_nodes (updated)")
