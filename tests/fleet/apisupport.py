"""An in-memory ControllerFacade and the API's security pieces on an in-memory database, for the
API tests (tests/fleet/test_api.py) and the CLI tests (tests/fleet/test_ops_cli.py)."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from certs import AccessRole
from fleet.controller.api import ApiSecurity
from fleet.controller.audit import AuditLog, IdempotencyStore
from fleet.controller.auth import CertificateAuthenticator, HostCheck, TokenStore
from fleet.controller.bounds import check_operator_label
from fleet.controller.facade import (
    AckRecord,
    BadRequest,
    CommandView,
    Conflict,
    FleetStats,
    HealthRecord,
    HealthView,
    IdentityView,
    NodeDetail,
    NodeEvent,
    NodeOutcome,
    NodeStatus,
    NodeView,
    NotFound,
    PlannedWave,
    ReleaseView,
    RolloutPlan,
    RolloutProgress,
    RolloutRequest,
    RolloutState,
    RolloutView,
    WaveView,
)
from fleet.controller.metrics import ControllerMetrics
from fleet.controller.storage import Database

RELEASES = frozenset({"app@1.2.0", "app@1.3.0"})
ACTIONS = frozenset({"restart", "ping", "rollback"})


class MemoryController:
    """A small ControllerFacade: enough behaviour to exercise every route and error of the API.

    Commands gain one ack per read (accepted, then done) and a running rollout finishes one node per
    read, so clients that poll see a trail grow and a rollout end without any clock in the test.
    Commands to gw-0003 (offline) are never acknowledged. ``sent`` counts commands really sent.
    """

    def __init__(self) -> None:
        now = time.time()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.sent = 0
        self._nodes = {
            view.id: view
            for view in (
                NodeView(id="gw-0001", status=NodeStatus.ONLINE, version="1.1.0", healthy=True, last_seen=now,
                         labels={"ring": "canary", "site": "plant-3"},
                         heartbeat={"seq": 7, "uptime": 69.19798, "cpu": 3.25, "mem_free": 24420249600,
                                    "disk_free": 2 * 1024**3, "latency_ms": 3.0}),
                NodeView(id="gw-0002", status=NodeStatus.ONLINE, version="1.1.0", healthy=True, last_seen=now,
                         labels={"ring": "main", "site": "plant-3"}),
                NodeView(id="gw-0003", status=NodeStatus.OFFLINE, version="1.0.0", last_seen=now - 600,
                         labels={"ring": "main", "site": "plant-7"}),
            )
        }  # fmt: skip
        self._nodes = {
            node: view.model_copy(update={"reported_labels": view.labels}) for node, view in self._nodes.items()
        }
        self._health = {
            "gw-0001": [
                HealthRecord(ts=now - 50, healthy=True, detail=None),
                HealthRecord(ts=now - 40, healthy=True, detail=None),
                HealthRecord(ts=now - 30, healthy=False, detail="http: 500"),
                HealthRecord(ts=now - 5, healthy=True, detail="all checks passed"),
            ]
        }
        self._events = {
            "gw-0001": [
                NodeEvent(kind="update.downloading", detail="app@1.1.0", data={"chunks": 3}, ts=now - 60),
                NodeEvent(kind="update.installed", detail="app@1.1.0", ts=now - 55),
                NodeEvent(kind="update.healthy", data={"version": "1.1.0"}, ts=now - 50),
            ]
        }
        self._commands: dict[str, CommandView] = {}
        self._rollouts: dict[str, RolloutView] = {}

    # ---- nodes and commands ----

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        wanted = (selector or {}).items()
        return [view for view in self._nodes.values() if wanted <= view.labels.items()]

    def node(self, node_id: str) -> NodeDetail:
        view = self._known(node_id)
        commands = [command for command in self._commands.values() if command.node == node_id]
        return NodeDetail(
            node=view, health_history=self._health.get(node_id, []), commands=commands, events=self.node_events(node_id)
        )

    def node_events(self, node_id: str) -> list[NodeEvent]:
        self._known(node_id)
        return list(self._events.get(node_id, []))

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView:
        self._known(node_id)
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))}")
        now = time.time()
        command = CommandView(
            id=f"cmd-{next(self._ids)}", node=node_id, action=action, args=args or {}, status="pending",
            created=now, expires_at=now + expires_in, attempts=1,
        )  # fmt: skip
        with self._lock:
            self._commands[command.id] = command
            self.sent += 1
        return command

    def command(self, command_id: str) -> CommandView:
        with self._lock:
            command = self._commands.get(command_id)
            if command is None:
                raise NotFound(f"no command {command_id!r}")
            trail = ("accepted", "done")
            offline = self._nodes[command.node].status is NodeStatus.OFFLINE  # never answers
            if not offline and command.status != "cancelled" and len(command.acks) < len(trail):
                status = trail[len(command.acks)]
                detail = "restarting in 1s" if status == "accepted" else None
                acks = [*command.acks, AckRecord(status=status, detail=detail, ts=time.time())]
                command = command.model_copy(update={"acks": acks, "status": status})
                self._commands[command_id] = command
            return command

    def cancel_command(self, command_id: str) -> CommandView:
        with self._lock:
            command = self._commands.get(command_id)
            if command is None:
                raise NotFound(f"no command {command_id!r}")
            if command.status != "pending":
                raise Conflict(f"command {command_id} is {command.status}: only a pending command can be cancelled")
            command = command.model_copy(update={"status": "cancelled"})
            self._commands[command_id] = command
            return command

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        view = self._known(node_id)
        problems = [problem for key, value in labels.items() if (problem := check_operator_label(key, value))]
        if problems:
            raise BadRequest("; ".join(problems))
        operator = {} if replace_all else dict(view.operator_labels)
        for key, value in labels.items():
            if value is None:
                operator.pop(key, None)
            else:
                operator[key] = value
        effective = view.reported_labels | operator
        self._nodes[node_id] = view.model_copy(update={"operator_labels": operator, "labels": effective})
        return self._nodes[node_id]

    def _known(self, node_id: str) -> NodeView:
        view = self._nodes.get(node_id)
        if view is None:
            raise NotFound(f"no node {node_id!r}")
        return view

    # ---- rollouts ----

    def _check(self, request: RolloutRequest) -> list[str]:
        if request.release not in RELEASES:
            raise NotFound(f"no release {request.release!r} in the store")
        matched = sorted(view.id for view in self.nodes(request.selector))
        if not matched:
            raise BadRequest(f"selector {request.selector} matches no node")
        return matched

    def start_rollout(self, request: RolloutRequest) -> RolloutView:
        matched = self._check(request)
        for other in self._rollouts.values():
            if other.selector == request.selector and other.state not in {RolloutState.ABORTED, RolloutState.SUCCEEDED}:
                raise Conflict(f"rollout {other.id} is already {other.state.value} for this selector")
        now = time.time()
        waves = [WaveView(index=0, nodes=1, started_at=now), WaveView(index=1, nodes=len(matched) - 1)]
        view = RolloutView(
            id=f"ro-{next(self._ids)}", release=request.release, selector=request.selector,
            state=RolloutState.RUNNING, current_wave=0, waves=waves, created=now, updated=now,
            nodes=dict.fromkeys(matched, NodeOutcome.PENDING),
        )  # fmt: skip
        self._rollouts[view.id] = view
        return view

    def plan_rollout(self, request: RolloutRequest) -> RolloutPlan:
        matched = self._check(request)
        canaries = [node for node in matched if self._nodes[node].labels.get("ring") == "canary"]
        ordered = canaries + [node for node in matched if node not in canaries]
        waves = [PlannedWave(number=1, nodes=ordered[:1]), PlannedWave(number=2, nodes=ordered[1:])]
        return RolloutPlan(
            release=request.release, selector=request.selector, nodes=len(ordered), waves=waves,
            canaries=canaries, conflicts=[], note="canaries first",
        )  # fmt: skip

    def rollouts(self) -> list[RolloutView]:
        return list(self._rollouts.values())

    def rollout(self, rollout_id: str) -> RolloutView:
        with self._lock:
            view = self._rollout(rollout_id)
            if view.state is RolloutState.RUNNING:
                view = self._advance(view)
            return view

    def _advance(self, view: RolloutView) -> RolloutView:
        """One more node succeeds; waves fill in order; the rollout succeeds when none is pending."""
        pending = [node for node, outcome in view.nodes.items() if outcome is NodeOutcome.PENDING]
        outcomes = {**view.nodes, pending[0]: NodeOutcome.SUCCEEDED} if pending else dict(view.nodes)
        done = sum(outcome is NodeOutcome.SUCCEEDED for outcome in outcomes.values())
        waves, start = [], 0
        for wave in view.waves:
            finished = min(max(done - start, 0), wave.nodes)
            waves.append(wave.model_copy(update={"counts": {NodeOutcome.SUCCEEDED: finished}}))
            start += wave.nodes
        current = 0 if done < view.waves[0].nodes else len(view.waves) - 1
        state = RolloutState.SUCCEEDED if len(pending) <= 1 else RolloutState.RUNNING
        update = {"nodes": outcomes, "waves": waves, "current_wave": current, "state": state, "updated": time.time()}
        self._rollouts[view.id] = view.model_copy(update=update)
        return self._rollouts[view.id]

    def pause_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.RUNNING}, RolloutState.PAUSED)

    def resume_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.PAUSED}, RolloutState.RUNNING)

    def abort_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.RUNNING, RolloutState.PAUSED}, RolloutState.ABORTED)

    def _move(self, rollout_id: str, allowed: set[RolloutState], target: RolloutState) -> RolloutView:
        with self._lock:
            view = self._rollout(rollout_id)
            if view.state not in allowed:
                raise Conflict(f"rollout {rollout_id} is {view.state.value}; cannot go to {target.value}")
            detail = "aborted by the operator" if target is RolloutState.ABORTED else None
            view = view.model_copy(update={"state": target, "updated": time.time(), "detail": detail})
            self._rollouts[rollout_id] = view
            return view

    def _rollout(self, rollout_id: str) -> RolloutView:
        view = self._rollouts.get(rollout_id)
        if view is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return view

    # ---- the rest ----

    def list_releases(self) -> list[ReleaseView]:
        return [
            ReleaseView(
                name="app",
                version=label.split("@")[1],
                label=label,
                digest="sha256:" + "0" * 64,
                size=1000,
                chunks=1,
                chunk_size=65536,
                entry=["./run"],
                health_probe="http http://127.0.0.1:8080/healthz",
                created_at=1.7e9,
                signed=True,
            )
            for label in sorted(RELEASES)
        ]

    def identities(self) -> list[IdentityView]:
        return [IdentityView(name="operator", role="operator", access="admin", not_after=2e9, source="pki")]

    def health(self) -> HealthView:
        return HealthView(ok=True, broker="connected", database="ok", leader=True, tick_age=0.1)

    def stats(self) -> FleetStats:
        by_status = {status.value: 0 for status in NodeStatus}
        for view in self._nodes.values():
            by_status[view.status.value] += 1
        running = [view for view in self._rollouts.values() if view.state is RolloutState.RUNNING]
        return FleetStats(
            nodes_by_status=by_status,
            nodes_by_version={"1.1.0": 2, "1.0.0": 1},
            nodes_by_health={"healthy": 2, "unhealthy": 0, "unknown": 1},
            rollouts_by_state={"running": len(running)},
            rollouts=[
                RolloutProgress(view.id, view.release, view.state.value, 1, len(view.waves), {"pending": 2})
                for view in running
            ],
            heartbeats_received=1234,
            commands_pending=sum(command.status == "pending" for command in self._commands.values()),
        )


@dataclass
class Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@dataclass
class Access:
    """The API's security on an in-memory database, with a token per role."""

    security: ApiSecurity
    clock: Clock
    tokens: dict[str, str]  # role -> token


def memory_access(
    controller: MemoryController,
    *,
    certificates: CertificateAuthenticator | None = None,
    hosts: HostCheck | None = None,
) -> Access:
    db = Database(":memory:")
    clock = Clock()
    store = TokenStore(db, clock=clock)
    tokens = {role.value: store.create(f"{role.value}-token", role, None, "test")[1] for role in AccessRole}
    security = ApiSecurity(
        tokens=store,
        audit=AuditLog(db, clock=clock),
        idempotency=IdempotencyStore(db, clock=clock),
        metrics=ControllerMetrics("9.9.9", controller.stats),
        certificates=certificates,
        hosts=hosts,
    )
    return Access(security, clock, tokens)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
