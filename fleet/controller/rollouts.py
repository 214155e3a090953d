"""Health-gated staged rollouts with automatic rollback, resumable from SQLite (DESIGN.md section 5).

Rollout states::

    running --pause()--> paused --resume()--> running
    running --last wave complete--> succeeded
    running | paused --threshold crossed, or abort()--> aborting --every touched node reset--> aborted

A paused rollout still watches its current wave (and can still abort): pausing only holds back the
next wave.

Per node, ``phase`` is the durable log of side effects. Each step is committed *before* its effect,
so a restart (even after ``kill -9``) redoes at most the one step in flight, and redoing is harmless
because publishing is skipped when the node's desired state already is what we would publish::

    waiting -> updating (intent committed) -> updated (target desired state published)
    waiting -> unchanged (already on the target version: nothing published, never rolled back)
    updating | updated -> rolling_back (intent) -> reset (baseline published) -> rollback_sent
    waiting -> skipped (the node could not be started: failed, never published to)
    rolling_back -> reset_failed (baseline not published) -> rollback_sent | rollback_failed

``outcome`` (pending, succeeded, failed, unreachable, rolled_back) is what the operator sees.
Thresholds apply per wave: each wave is a gate on its own nodes.

Nodes are isolated from each other in every step of a tick, including the abort: an error on one
node (its data, or publishing to it) is logged and counted (``node_errors``) for that node, and the
others carry on. A step that only reads is not retried (the node is judged failed); one with a
side effect is retried on the next ticks, and after ``NODE_ATTEMPTS`` failures in a row the node is
given up as failed with the reason, so no single node can hold a rollout in ``aborting``.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

from fleet.controller.facade import (
    BadRequest,
    Conflict,
    NodeOutcome,
    NodeStatus,
    NodeView,
    NotFound,
    RolloutRequest,
    RolloutState,
    RolloutView,
    WaveView,
)
from fleet.controller.storage import Database
from fleet.protocol.messages import ReleaseRef, UpdateState
from fleet.releases import ReleaseManifest, ReleaseNotFound, ReleaseStore

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    release TEXT NOT NULL,
    selector TEXT NOT NULL,
    request TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    current_wave INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    confirm_until REAL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts(state);
CREATE TABLE IF NOT EXISTS rollout_waves (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    idx INTEGER NOT NULL,
    size INTEGER NOT NULL,
    started_at REAL,
    finished_at REAL,
    PRIMARY KEY (rollout_id, idx)
);
CREATE TABLE IF NOT EXISTS rollout_nodes (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id),
    node TEXT NOT NULL,
    position INTEGER NOT NULL,
    wave INTEGER NOT NULL,
    baseline_release TEXT,
    baseline_version TEXT,
    phase TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    started_at REAL,
    mark_reported_ts REAL,
    health_ts_seen REAL,
    health_seen_at REAL,
    on_target_at REAL,
    healthy_since REAL,
    seen INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout_id, node)
);
CREATE INDEX IF NOT EXISTS rollout_nodes_wave ON rollout_nodes(rollout_id, wave, phase);
CREATE INDEX IF NOT EXISTS rollout_nodes_node ON rollout_nodes(node);
"""

ACTIVE = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ABORTING)
DRIVEN = (RolloutState.RUNNING, RolloutState.PAUSED)
MAX_WAVES = 100

# Phases (see the module docstring).
WAITING, UNCHANGED, UPDATING, UPDATED = "waiting", "unchanged", "updating", "updated"
ROLLING_BACK, RESET, ROLLBACK_SENT = "rolling_back", "reset", "rollback_sent"
SKIPPED, RESET_FAILED, ROLLBACK_FAILED = "skipped", "reset_failed", "rollback_failed"
TOUCHED = (UPDATING, UPDATED)
RESTORING = (ROLLING_BACK, RESET, RESET_FAILED)  # an abort is finished once no node is in these

NODE_ATTEMPTS = 3
"""Ticks in a row a side effect on one node may fail before that node is given up (as failed)."""
_NOT_RESTORED = "not restored: "  # reason prefix of nodes an abort gave up on

_FAILED_STATES = frozenset({UpdateState.FAILED.value, UpdateState.ROLLED_BACK.value})
_SETTLED_STATES = frozenset({None, UpdateState.HEALTHY.value, UpdateState.IDLE.value})


# ---- the injected collaborators --------------------------------------------------------------


class FleetView(Protocol):
    """Implemented by the registry."""

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]: ...

    def node_view(self, node_id: str) -> NodeView: ...


class DesiredStates(Protocol):
    """Implemented on top of fleet/controller/desired.py's DesiredPublisher."""

    def publish_release(self, node: str, release: ReleaseRef | None) -> int: ...

    def current_release(self, node: str) -> ReleaseRef | None: ...


class Commands(Protocol):
    """Implemented by fleet/controller/commands.py's CommandTracker."""

    def send(
        self,
        node: str,
        action: str,
        args: dict[str, Any] | None = None,
        expires_in: float = 3600.0,
        rollout_id: str | None = None,
    ) -> object: ...


# ---- parsing the request ---------------------------------------------------------------------

_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def _parse_amount(what: str, spec: str) -> tuple[float, bool]:
    """``"25%"`` -> (25.0, True), ``"5"`` -> (5.0, False); BadRequest for anything else."""
    match = _AMOUNT.match(spec)
    if match is None:
        raise BadRequest(f"{what} {spec!r}: use a percentage like '25%' or a node count like '5'")
    value, percent = float(match.group(1)), match.group(2) == "%"
    if percent and not 0 < value <= 100:
        raise BadRequest(f"{what} {spec!r}: a percentage must be above 0% and at most 100%")
    if not percent and (value != int(value) or value < 1):
        raise BadRequest(f"{what} {spec!r}: a count must be a whole number of at least 1")
    return value, percent


def parse_waves(specs: Sequence[str], total: int) -> list[int]:
    """Cumulative wave ends for ``total`` nodes, e.g. ["1%", "25%", "100%"] over 10 -> [1, 3, 10].

    Each wave gets at least one node; waves left without a node (tiny selections) are dropped, and
    a final wave takes the rest when the list stops short of everyone (a rollout never leaves part
    of its selection silently behind).
    """
    if not specs:
        raise BadRequest("waves: give at least one wave")
    if len(specs) > MAX_WAVES:
        raise BadRequest(f"waves: at most {MAX_WAVES} waves")
    resolved: list[int] = []
    last_value: dict[bool, float] = {}
    for spec in specs:
        value, percent = _parse_amount("wave", spec)
        if value <= last_value.get(percent, 0):
            raise BadRequest(f"waves {','.join(specs)}: must be cumulative and increasing")
        last_value[percent] = value
        # The 1e-9 keeps 25% of 100 at 25 despite float error; ceil gives tiny percentages a node.
        count = math.ceil(total * value / 100 - 1e-9) if percent else int(value)
        if resolved and count < resolved[-1]:
            raise BadRequest(f"waves {','.join(specs)}: must be cumulative and increasing")
        resolved.append(min(count, total))
    ends: list[int] = []
    for count in resolved:
        end = max(count, ends[-1] + 1 if ends else 1)
        if end > total:
            break
        ends.append(end)
    if ends[-1] < total:
        ends.append(total)
    return ends


@dataclass(frozen=True)
class AbortCriteria:
    """Abort a wave at ``count`` failed nodes, or at ``percent`` of its finished nodes once at
    least ``min_finished`` finished (a single early failure must not look like 100%)."""

    count: int | None = None
    percent: float | None = None
    min_finished: int = 1

    @classmethod
    def parse(cls, spec: str, min_finished: int) -> AbortCriteria:
        value, percent = _parse_amount("max_failures", spec)
        if percent:
            return cls(percent=value, min_finished=min_finished)
        return cls(count=int(value), min_finished=min_finished)

    def breached(self, failed: int, finished: int) -> bool:
        if failed == 0:
            return False
        if self.count is not None:
            return failed >= self.count
        assert self.percent is not None
        return finished >= self.min_finished and failed * 100 >= self.percent * finished

    def describe(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


def _split_release(label: str) -> tuple[str, str]:
    name, at, version = label.rpartition("@")
    if not at or not name or not version:
        raise BadRequest(f"release {label!r}: use name@version")
    return name, version


def _canonical(selector: dict[str, str]) -> str:
    return json.dumps(selector, sort_keys=True, separators=(",", ":"))


def node_order(rollout_id: str, nodes: Iterable[NodeView]) -> list[NodeView]:
    """Canary nodes first, then a stable pseudo-random order per rollout: the same on every restart
    (it is stored anyway), and different rollouts do not always hit the same nodes first.

    A canary is a node an operator labelled ``ring=canary`` on the controller. The ring a node
    reports itself does not count: any device could otherwise put itself in the first wave of every
    rollout it matches.
    """

    def key(node: NodeView) -> tuple[bool, str]:
        digest = hashlib.sha256((rollout_id + node.id).encode()).hexdigest()
        return node.operator_labels.get("ring") != "canary", digest

    return sorted(nodes, key=key)


# ---- per-node tracking -----------------------------------------------------------------------


@dataclass(frozen=True)
class Track:
    """One row of rollout_nodes: what the engine has committed and observed about a node."""

    node: str
    wave: int
    phase: str
    outcome: NodeOutcome
    reason: str | None
    started_at: float | None
    mark_reported_ts: float | None  # reported_ts when the update started: only newer reports count
    health_ts_seen: float | None  # last health_ts seen; a different value is a new health message
    health_seen_at: float | None  # engine clock when a new health message was last seen
    on_target_at: float | None  # engine clock when the node was first seen on the target version
    healthy_since: float | None
    seen: bool  # online at some point during its wave
    baseline_release: str | None
    baseline_version: str | None


_TRACK_COLUMNS = ", ".join(field.name for field in fields(Track))
_OBSERVED = ("outcome", "reason", "health_ts_seen", "health_seen_at", "on_target_at", "healthy_since", "seen")


def _track(row: Sequence[Any]) -> Track:
    values = dict(zip((field.name for field in fields(Track)), row, strict=True))
    values["outcome"] = NodeOutcome(values["outcome"])
    values["seen"] = bool(values["seen"])
    return Track(**values)


@dataclass(frozen=True)
class WaveClock:
    """What classification needs to know about the rollout and the current moment."""

    now: float
    target_version: str
    soak: float
    health_timeout: float
    wave_started_at: float
    timed_out: bool


def observe(track: Track, view: NodeView | None, clock: WaveClock) -> Track:
    """Fold one look at the node into its track (no verdict yet)."""
    if view is None:
        return track
    now = clock.now
    seen = track.seen or view.status == NodeStatus.ONLINE
    seen = seen or (view.last_seen is not None and view.last_seen >= clock.wave_started_at)
    health_ts_seen, health_seen_at = track.health_ts_seen, track.health_seen_at
    if view.health_ts is not None and view.health_ts != track.health_ts_seen:
        health_ts_seen, health_seen_at = view.health_ts, now
    on_target = view.version == clock.target_version
    on_target_at = track.on_target_at if track.on_target_at is not None or not on_target else now
    fresh = health_seen_at is not None and now - health_seen_at <= clock.health_timeout
    healthy = on_target and fresh and view.healthy is True and view.update_state in _SETTLED_STATES
    healthy_since = (track.healthy_since if track.healthy_since is not None else now) if healthy else None
    return replace(
        track,
        seen=seen,
        health_ts_seen=health_ts_seen,
        health_seen_at=health_seen_at,
        on_target_at=on_target_at,
        healthy_since=healthy_since,
    )


def failure(track: Track, view: NodeView | None, clock: WaveClock) -> str | None:
    """Why the node failed, if it did: a failure report, ill health on the target, or silence."""
    if view is not None:
        newer_report = view.reported_ts is not None and (
            track.mark_reported_ts is None or view.reported_ts > track.mark_reported_ts
        )
        if newer_report and view.update_state in _FAILED_STATES:
            return f"reported {view.update_state}"
        if view.version == clock.target_version and view.healthy is False and track.health_seen_at is not None:
            return f"unhealthy on {clock.target_version}"
    if track.on_target_at is not None:
        # Silence is failure: a node that updated and then went quiet may be boot-looping.
        last_sign = max(track.on_target_at, track.health_seen_at or track.on_target_at)
        if clock.now - last_sign > clock.health_timeout:
            return f"no health message for {clock.now - last_sign:.0f}s after the update"
    return None


def classify(track: Track, view: NodeView | None, clock: WaveClock) -> Track:
    """The node's new track and outcome after one look at it."""
    track = observe(track, view, clock)
    reason = failure(track, view, clock)
    if reason is not None:
        return replace(track, outcome=NodeOutcome.FAILED, reason=reason)
    if track.healthy_since is not None and clock.now - track.healthy_since >= clock.soak:
        return replace(track, outcome=NodeOutcome.SUCCEEDED, reason=None)
    if clock.timed_out and track.outcome == NodeOutcome.PENDING:
        if track.seen:
            return replace(track, outcome=NodeOutcome.FAILED, reason="not finished when the wave timed out")
        return replace(track, outcome=NodeOutcome.UNREACHABLE, reason="never online during the wave")
    return track


# ---- the engine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One row of rollouts, with the request and target decoded."""

    id: str
    request: RolloutRequest
    target: ReleaseRef
    state: RolloutState
    current_wave: int
    created: float
    updated: float
    confirm_until: float | None
    detail: str | None

    @property
    def criteria(self) -> AbortCriteria:
        return AbortCriteria.parse(self.request.max_failures, self.request.min_finished)


# SQL below interpolates only these constant column lists, placeholders and literal WHERE
# clauses written in this module (hence the S608 suppressions); every value is a bound parameter.
_ROLLOUT_COLUMNS = "id, request, target, state, current_wave, created, updated, confirm_until, detail"


def _rollout(row: Sequence[Any]) -> Rollout:
    rid, request, target, state, current_wave, created, updated, confirm_until, detail = row
    return Rollout(
        id=rid,
        request=RolloutRequest.model_validate_json(request),
        target=ReleaseRef.model_validate_json(target),
        state=RolloutState(state),
        current_wave=current_wave,
        created=created,
        updated=updated,
        confirm_until=confirm_until,
        detail=detail,
    )


class RolloutEngine:
    """Starts, drives (``tick``), pauses, resumes and aborts rollouts; all state lives in ``db``."""

    def __init__(
        self,
        db: Database,
        fleet: FleetView,
        desired: DesiredStates,
        commands: Commands,
        releases: ReleaseStore,
        *,
        clock: Callable[[], float] = time.time,
        publish_batch: int = 1000,
    ) -> None:
        self.db = db
        self.fleet = fleet
        self.desired = desired
        self.commands = commands
        self.releases = releases
        self.clock = clock
        # Nodes whose update starts per tick: bounds one tick, so pause/abort get in between.
        self.publish_batch = publish_batch
        # Serialises the tick thread and API calls. Never held by db.lock's owner when taken, and
        # publishing happens outside transactions (DesiredPublisher must not nest inside db.lock).
        self._lock = threading.RLock()
        # Per-node errors by step (publish, start, classify, view, save, reset, rollback), for metrics.
        self.node_errors: Counter[str] = Counter()
        self._errors_lock = threading.Lock()  # node_errors only: a metrics scrape never waits for a tick
        self._failures: dict[tuple[str, str, str], int] = {}  # (rollout, node, step) -> failures in a row
        db.migrate(SCHEMA)

    # ---- operator API ----------------------------------------------------------------------

    def start(self, request: RolloutRequest) -> RolloutView:
        with self._lock:
            manifest = self._resolve(request.release)
            AbortCriteria.parse(request.max_failures, request.min_finished)  # BadRequest before any work
            selected = self.fleet.nodes(request.selector or None)
            if not selected:
                raise BadRequest(f"selector {_canonical(request.selector)} matches no node")
            rollout_id = "r-" + uuid.uuid4().hex[:12]
            ordered = node_order(rollout_id, selected)
            ends = parse_waves(request.waves, len(ordered))
            # Read before the transaction: the desired-state publisher must not run inside db.lock.
            baselines = {node.id: self.desired.current_release(node.id) for node in ordered}
            with self.db.transaction() as tx:
                self._check_conflicts(tx, request.selector, {node.id for node in ordered})
                self._insert(tx, rollout_id, request, manifest, ordered, ends, baselines)
            log.info("rollout %s of %s started: %d nodes in waves %s", rollout_id, manifest.label, len(ordered), ends)
            # Deltas from the baselines (the delta_bases the nodes will be sent) are made ahead, in the
            # store's background worker: the release service never computes one for a request.
            self.releases.prepare(manifest, [ref.digest for ref in baselines.values() if ref is not None])
            self._drive_safely(rollout_id)
            return self.get(rollout_id)

    def pause(self, rollout_id: str) -> RolloutView:
        return self._transition(rollout_id, RolloutState.RUNNING, RolloutState.PAUSED, "paused by the operator")

    def resume(self, rollout_id: str) -> RolloutView:
        return self._transition(rollout_id, RolloutState.PAUSED, RolloutState.RUNNING, None)

    def abort(self, rollout_id: str) -> RolloutView:
        with self._lock:
            rollout = self._load(rollout_id)
            if rollout.state in DRIVEN:
                self._begin_abort(rollout, "aborted by the operator")
            elif rollout.state != RolloutState.ABORTING:  # aborting again retries an interrupted rollback
                raise Conflict(f"rollout {rollout_id} is {rollout.state.value}: nothing to abort")
            self._drive_safely(rollout_id)
            return self.get(rollout_id)

    def get(self, rollout_id: str) -> RolloutView:
        with self._lock:
            return self._view(self._load(rollout_id))

    def list(self) -> builtins.list[RolloutView]:
        with self._lock:
            rows = self.db.query(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY created, id")  # noqa: S608
            return [self._view(_rollout(row)) for row in rows]

    def active(self) -> builtins.list[RolloutView]:
        return [view for view in self.list() if view.state in ACTIVE]

    def counts(self) -> dict[str, int]:
        """Rollouts by state, every state present (for metrics)."""
        found = dict(self.db.query("SELECT state, COUNT(*) FROM rollouts GROUP BY state"))
        return {state.value: int(found.get(state.value, 0)) for state in RolloutState}

    def metrics(self) -> dict[str, float]:
        """``fleet_rollout_node_errors_total{step=...}``: one node's errors, isolated from the others."""
        with self._errors_lock:
            errors = dict(self.node_errors)
        return {f'fleet_rollout_node_errors_total{{step="{step}"}}': float(n) for step, n in sorted(errors.items())}

    def tick(self) -> None:
        """Drive every rollout that has something to do; cheap when nothing changed."""
        with self._lock:
            now = self.clock()
            rows = self.db.query(
                "SELECT id FROM rollouts WHERE state IN (?, ?, ?) OR (state = ? AND confirm_until > ?)",
                (*(state.value for state in ACTIVE), RolloutState.ABORTED.value, now),
            )
            for (rollout_id,) in rows:
                self._drive_safely(rollout_id)

    # ---- starting --------------------------------------------------------------------------

    def _resolve(self, label: str) -> ReleaseManifest:
        name, version = _split_release(label)
        try:
            return self.releases.get(name, version)
        except ReleaseNotFound as exc:
            raise NotFound(f"release {label}: not in the release store") from exc

    def _check_conflicts(self, tx: sqlite3.Connection, selector: dict[str, str], nodes: set[str]) -> None:
        """Inside the start transaction, so two concurrent starts cannot both pass."""
        active = [state.value for state in ACTIVE]  # three states: the three placeholders below
        for rid, other in tx.execute("SELECT id, selector FROM rollouts WHERE state IN (?, ?, ?)", active):
            if other == _canonical(selector):
                raise Conflict(f"rollout {rid} is already active for selector {other}")
        rows = tx.execute(
            "SELECT n.rollout_id, n.node FROM rollout_nodes n JOIN rollouts r ON r.id = n.rollout_id"
            " WHERE r.state IN (?, ?, ?)",
            active,
        )
        for rid, node in rows:
            if node in nodes:
                raise Conflict(f"rollout {rid} is already active on node {node} (and maybe others)")

    def _insert(
        self,
        tx: sqlite3.Connection,
        rollout_id: str,
        request: RolloutRequest,
        manifest: ReleaseManifest,
        ordered: Sequence[NodeView],
        ends: Sequence[int],
        baselines: dict[str, ReleaseRef | None],
    ) -> None:
        """The whole plan in one transaction: order, wave assignment and baselines are fixed here,
        so a restart resumes exactly this plan."""
        now = self.clock()
        tx.execute(
            "INSERT INTO rollouts (id, release, selector, request, target, state, current_wave, created,"
            " updated) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
            (
                rollout_id,
                manifest.label,
                _canonical(request.selector),
                request.model_dump_json(),
                manifest.ref().model_dump_json(),
                RolloutState.RUNNING.value,
                now,
                now,
            ),
        )
        tx.executemany(
            "INSERT INTO rollout_waves (rollout_id, idx, size, started_at) VALUES (?, ?, ?, ?)",
            [(rollout_id, index, end, now if index == 0 else None) for index, end in enumerate(ends)],
        )
        wave_of = [index for index, end in enumerate(ends) for _ in range(end - (ends[index - 1] if index else 0))]
        tx.executemany(
            "INSERT INTO rollout_nodes (rollout_id, node, position, wave, baseline_release,"
            " baseline_version, phase, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    rollout_id,
                    node.id,
                    position,
                    wave_of[position],
                    _dump_ref(baselines[node.id]),
                    node.version,
                    WAITING,
                    NodeOutcome.PENDING.value,
                )
                for position, node in enumerate(ordered)
            ],
        )

    # ---- driving ---------------------------------------------------------------------------

    def _drive_safely(self, rollout_id: str) -> None:
        # Everything is committed before it is acted on, so the next tick retries from the same
        # point; one broken rollout (or a publish error) must not stop the others.
        try:
            self._drive(self._load(rollout_id))
        except Exception:
            log.exception("rollout %s: drive failed; retrying on the next tick", rollout_id)

    def _drive(self, rollout: Rollout) -> None:
        if rollout.state in DRIVEN:
            self._start_wave_nodes(rollout)
            self._classify_wave(rollout)
            reason = self._abort_reason(rollout)
            if reason is not None:
                self._begin_abort(rollout, reason)
                self._roll_back(self._load(rollout.id))
            else:
                self._maybe_advance(self._load(rollout.id))
        elif rollout.state == RolloutState.ABORTING:
            self._roll_back(rollout)
        elif rollout.state == RolloutState.ABORTED:
            self._confirm_rollbacks(rollout)

    def _start_wave_nodes(self, rollout: Rollout) -> None:
        """Commit the next batch of the wave as updating, then publish (and finish crashed publishes)."""
        now = self.clock()
        waiting = [
            node
            for (node,) in self.db.query(
                "SELECT node FROM rollout_nodes WHERE rollout_id = ? AND wave = ? AND phase = ?"
                " ORDER BY position LIMIT ?",
                (rollout.id, rollout.current_wave, WAITING, self.publish_batch),
            )
        ]
        if waiting:
            views = self._views(rollout, waiting)
            with self.db.transaction() as tx:
                for node in waiting:
                    try:
                        self._commit_start(tx, rollout, node, views.get(node), now)
                    except Exception as exc:  # noqa: BLE001 - this node's data: it fails, the batch goes on (logged)
                        self._node_error(rollout.id, node, "start", exc)
                        tx.execute(
                            "UPDATE rollout_nodes SET phase = ?, outcome = ?, reason = ?, started_at = ?"
                            " WHERE rollout_id = ? AND node = ?",
                            (SKIPPED, NodeOutcome.FAILED.value, f"not started: {_brief(exc)}", now, rollout.id, node),
                        )
                self._touch(tx, rollout.id, now)
        published = [
            track.node
            for track in self._tracks(rollout.id, "wave = ? AND phase = ?", (rollout.current_wave, UPDATING))
            if self._publish_target(rollout, track)
        ]
        if published:
            with self.db.transaction() as tx:
                tx.executemany(
                    "UPDATE rollout_nodes SET phase = ? WHERE rollout_id = ? AND node = ? AND phase = ?",
                    [(UPDATED, rollout.id, node, UPDATING) for node in published],
                )

    def _commit_start(
        self, tx: sqlite3.Connection, rollout: Rollout, node: str, view: NodeView | None, now: float
    ) -> None:
        if view is not None and view.version == rollout.target.version:
            phase, outcome, reason = UNCHANGED, NodeOutcome.SUCCEEDED, "already on the target version"
        else:
            phase, outcome, reason = UPDATING, NodeOutcome.PENDING, None
        tx.execute(
            "UPDATE rollout_nodes SET phase = ?, outcome = ?, reason = ?, started_at = ?, mark_reported_ts = ?,"
            " health_ts_seen = ? WHERE rollout_id = ? AND node = ?",
            (
                phase,
                outcome.value,
                reason,
                now,
                view.reported_ts if view else None,
                view.health_ts if view else None,
                rollout.id,
                node,
            ),
        )

    def _publish_target(self, rollout: Rollout, track: Track) -> bool:
        """Publish the target to one node; False (logged, retried next tick) if that failed, so
        one node's error does not hold back the rest of the wave."""
        try:
            current = self.desired.current_release(track.node)
            if current is not None and current.digest == rollout.target.digest:
                return True  # published before a crash: publishing again would start a new generation
            baseline = _load_ref(track.baseline_release)
            bases = [baseline.digest] if baseline is not None and baseline.digest != rollout.target.digest else []
            self.desired.publish_release(track.node, rollout.target.model_copy(update={"delta_bases": bases}))
        except Exception as exc:  # noqa: BLE001 - logged in _node_error
            # Retried on every tick; the wave timeout judges the node if it never works out.
            self._node_error(rollout.id, track.node, "publish", exc)
            return False
        self._node_ok(rollout.id, track.node, "publish")
        return True

    def _classify_wave(self, rollout: Rollout) -> None:
        """Classify the current wave's started nodes, plus unreachable nodes of earlier waves (a
        node that comes back late still converges, and still counts if it fails)."""
        tracks = self._tracks(
            rollout.id,
            "phase IN (?, ?) AND ((wave = ? AND outcome = ?) OR outcome = ?)",
            (*TOUCHED, rollout.current_wave, NodeOutcome.PENDING.value, NodeOutcome.UNREACHABLE.value),
        )
        if not tracks:
            return
        wave = self._wave_row(rollout.id, rollout.current_wave)
        now = self.clock()
        clock = WaveClock(
            now=now,
            target_version=rollout.target.version,
            soak=rollout.request.soak,
            health_timeout=rollout.request.health_timeout,
            wave_started_at=wave[0],
            timed_out=now >= wave[0] + rollout.request.wave_timeout,
        )
        views = self._views(rollout, [track.node for track in tracks])
        changed = []
        for track in tracks:
            try:
                new = classify(track, views.get(track.node), clock)
            except Exception as exc:  # noqa: BLE001 - a node that cannot be judged fails (logged)
                self._node_error(rollout.id, track.node, "classify", exc)
                new = replace(track, outcome=NodeOutcome.FAILED, reason=f"could not be judged: {_brief(exc)}")
            if track.outcome == NodeOutcome.UNREACHABLE and new.outcome == NodeOutcome.PENDING:
                new = replace(new, outcome=NodeOutcome.UNREACHABLE, reason=track.reason)
            if new != track:
                changed.append(new)
        if changed:
            self._save_observations(rollout.id, changed, now)

    def _save_observations(self, rollout_id: str, tracks: Sequence[Track], now: float) -> None:
        """One transaction for all; if that fails, node by node, so one bad row cannot keep the
        others' observations (and outcomes) from being saved."""
        sets = ", ".join(f"{column} = ?" for column in _OBSERVED)
        sql = f"UPDATE rollout_nodes SET {sets} WHERE rollout_id = ? AND node = ?"  # noqa: S608
        rows = [(*(_column(track, column) for column in _OBSERVED), rollout_id, track.node) for track in tracks]
        try:
            with self.db.transaction() as tx:
                tx.executemany(sql, rows)
                self._touch(tx, rollout_id, now)
        except Exception:
            if len(tracks) == 1:
                raise
            for track in tracks:
                try:
                    self._save_observations(rollout_id, [track], now)
                except Exception as exc:  # noqa: BLE001 - logged in _node_error
                    self._node_error(rollout_id, track.node, "save", exc)
                    reason = f"could not be recorded: {_brief(exc)}"
                    self.db.execute(
                        "UPDATE rollout_nodes SET outcome = ?, reason = ? WHERE rollout_id = ? AND node = ?",
                        (NodeOutcome.FAILED.value, reason, rollout_id, track.node),
                    )
            return
        for track in tracks:
            if track.outcome != NodeOutcome.PENDING:
                log.debug("rollout %s: %s %s (%s)", rollout_id, track.node, track.outcome.value, track.reason)

    def _abort_reason(self, rollout: Rollout) -> str | None:
        criteria = rollout.criteria
        tally: dict[int, Counter[str]] = {}
        for wave, outcome, count in self.db.query(
            "SELECT wave, outcome, COUNT(*) FROM rollout_nodes WHERE rollout_id = ? AND wave <= ?"
            " GROUP BY wave, outcome",
            (rollout.id, rollout.current_wave),
        ):
            tally.setdefault(wave, Counter())[outcome] = count
        for wave, counts in sorted(tally.items()):
            failed = counts[NodeOutcome.FAILED.value]
            finished = failed + counts[NodeOutcome.SUCCEEDED.value]
            if criteria.breached(failed, finished):
                # Waves are numbered from 1 wherever people read them (CLI tables, logs, this detail).
                number, threshold = wave + 1, criteria.describe()
                return f"{failed} of {finished} finished nodes failed in wave {number} (threshold {threshold})"
        return None

    def _maybe_advance(self, rollout: Rollout) -> None:
        """Close the current wave once every node is terminal (the timeout made them so)."""
        (open_nodes,) = self.db.query(
            "SELECT COUNT(*) FROM rollout_nodes WHERE rollout_id = ? AND wave = ? AND (outcome = ? OR phase = ?)",
            (rollout.id, rollout.current_wave, NodeOutcome.PENDING.value, WAITING),
        )[0]
        if open_nodes or rollout.state != RolloutState.RUNNING:
            return
        now = self.clock()
        (waves,) = self.db.query("SELECT COUNT(*) FROM rollout_waves WHERE rollout_id = ?", (rollout.id,))[0]
        last = rollout.current_wave + 1 >= waves
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE rollout_waves SET finished_at = ? WHERE rollout_id = ? AND idx = ?",
                (now, rollout.id, rollout.current_wave),
            )
            if last:
                tx.execute(
                    "UPDATE rollouts SET state = ?, detail = ?, updated = ? WHERE id = ?",
                    (RolloutState.SUCCEEDED.value, self._summary(tx, rollout.id), now, rollout.id),
                )
            else:
                tx.execute(
                    "UPDATE rollout_waves SET started_at = ? WHERE rollout_id = ? AND idx = ?",
                    (now, rollout.id, rollout.current_wave + 1),
                )
                tx.execute(
                    "UPDATE rollouts SET current_wave = ?, updated = ? WHERE id = ?",
                    (rollout.current_wave + 1, now, rollout.id),
                )
        if last:
            self._forget_failures(rollout.id)
            log.info("rollout %s succeeded", rollout.id)
            return
        log.info("rollout %s: wave %d started", rollout.id, rollout.current_wave + 2)  # numbered from 1
        self._start_wave_nodes(self._load(rollout.id))

    @staticmethod
    def _summary(tx: sqlite3.Connection, rollout_id: str) -> str:
        counts = dict(
            tx.execute(
                "SELECT outcome, COUNT(*) FROM rollout_nodes WHERE rollout_id = ? GROUP BY outcome", (rollout_id,)
            )
        )
        return ", ".join(f"{counts[outcome.value]} {outcome.value}" for outcome in NodeOutcome if outcome in counts)

    # ---- aborting --------------------------------------------------------------------------

    def _begin_abort(self, rollout: Rollout, reason: str) -> None:
        now = self.clock()
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE rollouts SET state = ?, detail = ?, updated = ? WHERE id = ?",
                (RolloutState.ABORTING.value, reason, now, rollout.id),
            )
            tx.execute(
                "UPDATE rollout_nodes SET phase = ? WHERE rollout_id = ? AND phase IN (?, ?)",
                (ROLLING_BACK, rollout.id, *TOUCHED),
            )
        log.warning("rollout %s aborting: %s", rollout.id, reason)

    def _roll_back(self, rollout: Rollout) -> None:
        """Baseline desired state to every touched node first (the part that undoes the damage),
        then one rollback command each, committed one by one: a command is not idempotent.

        Node by node: one node's error never holds back the others' reset or command. The failed
        step is retried on the next tick; after ``NODE_ATTEMPTS`` failures the node is given up
        (failed, reason ``not restored: ...``; a node whose baseline could not be published still
        gets its rollback command). The rollout is aborted once no node is left to restore.
        """
        reset: list[str] = []
        given_up: list[tuple[str, str]] = []
        for track in self._tracks(rollout.id, "phase = ?", (ROLLING_BACK,)):
            try:
                baseline = _load_ref(track.baseline_release)
                current = self.desired.current_release(track.node)
                if _digest(current) != _digest(baseline):
                    self.desired.publish_release(track.node, baseline)
            except Exception as exc:  # noqa: BLE001 - logged in _node_error
                if self._node_error(rollout.id, track.node, "reset", exc, give_up=True):
                    given_up.append((track.node, f"{_NOT_RESTORED}baseline desired state not published: {_brief(exc)}"))
                continue
            self._node_ok(rollout.id, track.node, "reset")
            reset.append(track.node)
        if reset or given_up:
            with self.db.transaction() as tx:
                tx.executemany(
                    "UPDATE rollout_nodes SET phase = ? WHERE rollout_id = ? AND node = ?",
                    [(RESET, rollout.id, node) for node in reset],
                )
                tx.executemany(
                    "UPDATE rollout_nodes SET phase = ?, outcome = ?, reason = ? WHERE rollout_id = ? AND node = ?",
                    [(RESET_FAILED, NodeOutcome.FAILED.value, why, rollout.id, node) for node, why in given_up],
                )
        for track in self._tracks(rollout.id, "phase IN (?, ?)", (RESET, RESET_FAILED)):
            args = {"release": rollout.target.name, "from": rollout.target.version, "to": track.baseline_version}
            try:
                self.commands.send(track.node, "rollback", args, rollout_id=rollout.id)
            except Exception as exc:  # noqa: BLE001 - logged in _node_error
                if self._node_error(rollout.id, track.node, "rollback", exc, give_up=True):
                    why = track.reason if track.phase == RESET_FAILED else None
                    why = why or f"{_NOT_RESTORED}rollback command not sent: {_brief(exc)}"
                    self.db.execute(
                        "UPDATE rollout_nodes SET phase = ?, outcome = ?, reason = ? WHERE rollout_id = ? AND node = ?",
                        (ROLLBACK_FAILED, NodeOutcome.FAILED.value, why, rollout.id, track.node),
                    )
                continue
            self._node_ok(rollout.id, track.node, "rollback")
            self.db.execute(
                "UPDATE rollout_nodes SET phase = ? WHERE rollout_id = ? AND node = ?",
                (ROLLBACK_SENT, rollout.id, track.node),
            )
        (left,) = self.db.query(
            "SELECT COUNT(*) FROM rollout_nodes WHERE rollout_id = ? AND phase IN (?, ?, ?)", (rollout.id, *RESTORING)
        )[0]
        if left:
            log.warning("rollout %s: %d node(s) not restored yet; retrying on the next tick", rollout.id, left)
            return
        not_restored = [
            node
            for (node,) in self.db.query(
                "SELECT node FROM rollout_nodes WHERE rollout_id = ? AND reason LIKE ? ORDER BY position",
                (rollout.id, _NOT_RESTORED + "%"),
            )
        ]
        detail = rollout.detail
        if not_restored:
            more = " ..." if len(not_restored) > 10 else ""
            detail = f"{detail}; not restored: {', '.join(not_restored[:10])}{more}"
        now = self.clock()
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE rollouts SET state = ?, detail = ?, confirm_until = ?, updated = ? WHERE id = ?",
                (RolloutState.ABORTED.value, detail, now + rollout.request.wave_timeout, now, rollout.id),
            )
        self._forget_failures(rollout.id)
        log.warning("rollout %s aborted: %s", rollout.id, detail)

    def _confirm_rollbacks(self, rollout: Rollout) -> None:
        """After an abort, nodes seen back on their baseline version become rolled_back."""
        tracks = self._tracks(
            rollout.id,
            "phase IN (?, ?) AND outcome != ?",
            (ROLLBACK_SENT, ROLLBACK_FAILED, NodeOutcome.ROLLED_BACK.value),
        )
        views = self._views(rollout, [track.node for track in tracks]) if tracks else {}
        back = [
            replace(track, outcome=NodeOutcome.ROLLED_BACK, reason=track.reason)
            for track in tracks
            if (view := views.get(track.node)) is not None
            and view.version == track.baseline_version
            and view.version != rollout.target.version
        ]
        if back:
            self._save_observations(rollout.id, back, self.clock())
        if len(back) == len(tracks):  # every touched node is back: stop watching
            self.db.execute("UPDATE rollouts SET confirm_until = NULL WHERE id = ?", (rollout.id,))

    # ---- storage helpers -------------------------------------------------------------------

    def _transition(
        self, rollout_id: str, source: RolloutState, target: RolloutState, detail: str | None
    ) -> RolloutView:
        with self._lock:
            rollout = self._load(rollout_id)
            if rollout.state != source:
                raise Conflict(f"rollout {rollout_id} is {rollout.state.value}, not {source.value}")
            self.db.execute(
                "UPDATE rollouts SET state = ?, detail = ?, updated = ? WHERE id = ?",
                (target.value, detail, self.clock(), rollout_id),
            )
            log.info("rollout %s %s", rollout_id, target.value)
            return self.get(rollout_id)

    def _load(self, rollout_id: str) -> Rollout:
        rows = self.db.query(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,))  # noqa: S608
        if not rows:
            raise NotFound(f"rollout {rollout_id}: no such rollout")
        return _rollout(rows[0])

    def _tracks(self, rollout_id: str, where: str, params: Sequence[Any]) -> builtins.list[Track]:
        rows = self.db.query(
            f"SELECT {_TRACK_COLUMNS} FROM rollout_nodes WHERE rollout_id = ? AND {where} ORDER BY position",  # noqa: S608
            (rollout_id, *params),
        )
        return [_track(row) for row in rows]

    def _wave_row(self, rollout_id: str, index: int) -> tuple[float, float | None]:
        started, finished = self.db.query(
            "SELECT started_at, finished_at FROM rollout_waves WHERE rollout_id = ? AND idx = ?", (rollout_id, index)
        )[0]
        return float(started), finished

    def _views(self, rollout: Rollout, nodes: Sequence[str]) -> dict[str, NodeView]:
        """Current views of ``nodes``: one registry query for the selector, single lookups for
        nodes that left it (relabelled) since the rollout started; unknown nodes are left out."""
        views = {view.id: view for view in self.fleet.nodes(rollout.request.selector or None)}
        for node in nodes:
            if node not in views:
                try:
                    views[node] = self.fleet.node_view(node)
                except NotFound:
                    continue
                except Exception as exc:  # noqa: BLE001 - this node only, judged as unknown (logged)
                    self._node_error(rollout.id, node, "view", exc)
        return views

    # ---- per-node errors -------------------------------------------------------------------

    def _node_error(self, rollout_id: str, node: str, step: str, exc: Exception, *, give_up: bool = False) -> bool:
        """Log and count one node's error in ``step``. With ``give_up``: True once the step failed
        ``NODE_ATTEMPTS`` times in a row for the node (the caller gives the node up)."""
        key = (rollout_id, node, step)
        attempts = self._failures[key] = self._failures.get(key, 0) + 1
        with self._errors_lock:
            self.node_errors[step] += 1
        final = give_up and attempts >= NODE_ATTEMPTS
        then = "giving up on the node" if final else "retrying on the next tick" if give_up else "other nodes go on"
        # The traceback once per node and step: a node failing every tick must not flood the log.
        log.error("rollout %s: %s failed for %s (%s; %s)", rollout_id, step, node, _brief(exc), then,
                  exc_info=exc if attempts == 1 else None)  # fmt: skip
        if final:
            del self._failures[key]
        return final

    def _node_ok(self, rollout_id: str, node: str, step: str) -> None:
        self._failures.pop((rollout_id, node, step), None)

    def _forget_failures(self, rollout_id: str) -> None:
        """The rollout is finished: its nodes' failure streaks no longer matter."""
        for key in [key for key in self._failures if key[0] == rollout_id]:
            del self._failures[key]

    @staticmethod
    def _touch(tx: sqlite3.Connection, rollout_id: str, now: float) -> None:
        tx.execute("UPDATE rollouts SET updated = ? WHERE id = ?", (now, rollout_id))

    def _view(self, rollout: Rollout) -> RolloutView:
        per_wave: dict[int, Counter[NodeOutcome]] = {}
        outcomes: dict[str, NodeOutcome] = {}
        for node, wave, outcome in self.db.query(
            "SELECT node, wave, outcome FROM rollout_nodes WHERE rollout_id = ? ORDER BY position", (rollout.id,)
        ):
            outcomes[node] = NodeOutcome(outcome)
            per_wave.setdefault(wave, Counter())[NodeOutcome(outcome)] += 1
        waves = []
        for index, _size, started, finished in self.db.query(
            "SELECT idx, size, started_at, finished_at FROM rollout_waves WHERE rollout_id = ? ORDER BY idx",
            (rollout.id,),
        ):
            counts = per_wave.get(index, Counter())
            waves.append(
                WaveView(
                    index=index,
                    nodes=sum(counts.values()),
                    started_at=started,
                    finished_at=finished,
                    counts={outcome: counts[outcome] for outcome in NodeOutcome},
                )
            )
        return RolloutView(
            id=rollout.id,
            release=rollout.request.release,
            selector=rollout.request.selector,
            state=rollout.state,
            current_wave=rollout.current_wave,
            waves=waves,
            created=rollout.created,
            updated=rollout.updated,
            detail=rollout.detail,
            nodes=outcomes,
        )


def _column(track: Track, column: str) -> Any:
    value = getattr(track, column)
    if isinstance(value, NodeOutcome):
        return value.value
    if isinstance(value, bool):
        return int(value)
    return value


def _brief(exc: BaseException) -> str:
    """An exception as one short line for a node's reason and the log."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _dump_ref(ref: ReleaseRef | None) -> str | None:
    return None if ref is None else ref.model_dump_json()


def _load_ref(raw: str | None) -> ReleaseRef | None:
    return None if raw is None else ReleaseRef.model_validate_json(raw)


def _digest(ref: ReleaseRef | None) -> str | None:
    return None if ref is None else ref.digest
