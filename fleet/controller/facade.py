"""What the controller offers to its HTTP API and CLI: typed views and the operations on them.

The HTTP layer (fleet/controller/api.py) depends on this Protocol only, so it can be tested against any
implementation and the controller's internals can change without touching the API.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from fleet.protocol.errors import FleetError


class NotFound(FleetError):
    """An unknown node, command, rollout or release (HTTP 404, CLI exit 2)."""


class Conflict(FleetError):
    """The request contradicts current state, e.g. a second rollout for the same selector (HTTP 409)."""


class BadRequest(FleetError):
    """The request itself is invalid, e.g. a selector matching no node or a malformed wave list (HTTP 400)."""


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class NodeStatus(StrEnum):
    ONLINE = "online"
    STALE = "stale"  # online, but heartbeats are late
    OFFLINE = "offline"


class NodeView(View):
    id: str
    status: NodeStatus
    version: str | None = None
    previous_version: str | None = None
    update_state: str | None = None  # the agent's reported state (idle, downloading, ..., rolled_back)
    healthy: bool | None = None
    generation: int | None = None  # last generation the agent reported applied
    # Effective labels, matched by selectors: the reported ones overlaid with the operator's.
    labels: dict[str, str] = Field(default_factory=dict)
    operator_labels: dict[str, str] = Field(default_factory=dict)  # set on the controller; decide the canary ring
    reported_labels: dict[str, str] = Field(default_factory=dict)  # as the node reports them, never trusted alone
    last_seen: float | None = None  # any message from the node
    health_ts: float | None = None  # last health message: silence after an update is failure
    reported_ts: float | None = None
    agent_version: str | None = None
    heartbeat: dict[str, Any] = Field(default_factory=dict)  # seq, uptime, cpu, mem_free, disk_free, latency_ms


class HealthRecord(View):
    ts: float
    healthy: bool
    detail: str | None = None


class AckRecord(View):
    status: str  # accepted, done, failed, rejected, duplicate, expired
    detail: str | None = None
    ts: float


class CommandView(View):
    id: str
    node: str
    action: str
    args: dict[str, Any] = Field(default_factory=dict)
    status: str  # pending (no ack yet), accepted, done, failed, rejected, duplicate, expired
    created: float
    expires_at: float | None = None
    attempts: int = 0
    acks: list[AckRecord] = Field(default_factory=list)


class NodeDetail(View):
    node: NodeView
    health_history: list[HealthRecord] = Field(default_factory=list)
    commands: list[CommandView] = Field(default_factory=list)


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"  # rolling touched nodes back
    ABORTED = "aborted"
    SUCCEEDED = "succeeded"


class NodeOutcome(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    ROLLED_BACK = "rolled_back"


class WaveView(View):
    index: int
    nodes: int
    started_at: float | None = None
    finished_at: float | None = None
    counts: dict[NodeOutcome, int] = Field(default_factory=dict)


class RolloutRequest(BaseModel):
    release: str  # name@version in the release store
    selector: dict[str, str] = Field(default_factory=dict)  # label equality; empty: every node
    waves: list[str] = Field(default_factory=lambda: ["1%", "25%", "100%"])  # cumulative: "1%", "25%" or counts "5"
    soak: float = Field(default=120.0, ge=0)  # seconds a node must stay healthy on the new version
    wave_timeout: float = Field(default=1800.0, gt=0)
    health_timeout: float = Field(default=90.0, gt=0)  # health silence after the update counts as failure
    max_failures: str = "5%"  # "5%" or a count "3": abort when reached
    min_finished: int = Field(default=1, ge=1)  # finished nodes before a percentage threshold applies


class RolloutView(View):
    id: str
    release: str
    selector: dict[str, str]
    state: RolloutState
    current_wave: int
    waves: list[WaveView]
    created: float
    updated: float
    detail: str | None = None
    nodes: dict[str, NodeOutcome] = Field(default_factory=dict)


class ControllerFacade(Protocol):
    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]: ...

    def node(self, node_id: str) -> NodeDetail: ...  # NotFound

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView: ...  # NotFound for an unknown node, BadRequest for a malformed action

    def command(self, command_id: str) -> CommandView: ...  # NotFound

    def start_rollout(self, request: RolloutRequest) -> RolloutView: ...  # NotFound (release), BadRequest, Conflict

    def rollouts(self) -> list[RolloutView]: ...

    def rollout(self, rollout_id: str) -> RolloutView: ...  # NotFound

    def pause_rollout(self, rollout_id: str) -> RolloutView: ...

    def resume_rollout(self, rollout_id: str) -> RolloutView: ...

    def abort_rollout(self, rollout_id: str) -> RolloutView: ...

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        """Operator labels (``PUT``/``PATCH /nodes/{id}/labels``, ``fleet label``): ``labels`` maps a
        key to its new value, or to None to remove it; ``replace_all`` makes the given labels the
        node's whole set. NotFound; BadRequest for a malformed label."""
        ...

    def metrics(self) -> dict[str, float]: ...  # flat name -> value, rendered by the API as Prometheus text


def parse_label_changes(items: list[str]) -> dict[str, str | None]:
    """``["ring=canary", "site-"]`` as ``{"ring": "canary", "site": None}`` (CLI: set and remove)."""
    changes: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            if not key or not value:
                raise BadRequest(f"label {item!r}: expected KEY=VALUE to set or KEY- to remove")
            changes[key] = value
        elif item.endswith("-") and len(item) > 1:
            changes[item[:-1]] = None
        else:
            raise BadRequest(f"label {item!r}: expected KEY=VALUE to set or KEY- to remove")
    return changes


def parse_selector(text: str | None, what: str = "selector") -> dict[str, str]:
    """``ring=canary,site=plant-3`` as a dict; empty or missing selects every node (API and CLI)."""
    selector: dict[str, str] = {}
    if not text:
        return selector
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise BadRequest(f"{what} {text!r}: expected key=value[,key=value...], got {part!r}")
        if key in selector and selector[key] != value:
            raise BadRequest(f"{what} {text!r}: label {key!r} given twice")
        selector[key] = value
    return selector
