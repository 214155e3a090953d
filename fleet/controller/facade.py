"""What the controller offers to its HTTP API and CLI: typed views and the operations on them.

The HTTP layer (fleet/controller/api.py) depends on this Protocol only, so it can be tested against any
implementation and the controller's internals can change without touching the API.

Every field of every view has a description (its docstring, ``use_attribute_docstrings``): the API's
OpenAPI document is generated from them. Times are unix seconds (floats) on the wire; fields typed
``Moment`` carry a marker so the CLI can print them as ISO-8601 (``fleet ... -o json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from fleet.protocol.errors import FleetError

if TYPE_CHECKING:
    from fleet.controller.selectors import Selector

T = TypeVar("T")


class NotFound(FleetError):
    """An unknown node, command, rollout, release or token (HTTP 404)."""


class Conflict(FleetError):
    """The request contradicts current state, e.g. a second rollout for the same selector (HTTP 409)."""


class BadRequest(FleetError):
    """The request itself is invalid, e.g. a selector matching no node or a malformed wave list (HTTP 400)."""


class Unauthorized(FleetError):
    """No credentials, or credentials that do not hold: unknown, expired or revoked (HTTP 401)."""


class Forbidden(FleetError):
    """Valid credentials whose role does not allow the request (HTTP 403)."""


class _MomentMarker:
    """Marks a float field as a point in time in unix seconds (see ``Moment``)."""

    def __repr__(self) -> str:
        return "Moment"


MOMENT = _MomentMarker()
Moment = Annotated[float, MOMENT]
"""A point in time, unix seconds; the CLI shows it as ISO-8601 in JSON and YAML output."""
OptionalMoment = Annotated[float | None, MOMENT]


class View(BaseModel):
    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)


class NodeStatus(StrEnum):
    ONLINE = "online"
    STALE = "stale"  # online, but heartbeats are late
    OFFLINE = "offline"


class NodeView(View):
    """A node as its own messages describe it, with the labels an operator set on the controller."""

    id: str
    """The node id: its device certificate's CN."""
    status: NodeStatus
    """online, stale (heartbeats are late) or offline (its last will, or silent for offline_after)."""
    version: str | None = None
    """The release version it reports running."""
    previous_version: str | None = None
    """The version it ran before, the target of a rollback."""
    update_state: str | None = None
    """The agent's update state: idle, downloading, verifying, installing, healthy, failed, rolled_back."""
    healthy: bool | None = None
    """Its last health message: all probes passing (null: none yet)."""
    generation: int | None = None
    """The last desired-state generation the agent reported applied."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Effective labels, matched by selectors: the reported ones overlaid with the operator's."""
    operator_labels: dict[str, str] = Field(default_factory=dict)
    """Labels set on the controller; they alone decide the canary ring (ring=canary)."""
    reported_labels: dict[str, str] = Field(default_factory=dict)
    """Labels as the node reports them; never trusted alone."""
    last_seen: OptionalMoment = None
    """When any message from the node last arrived (unix seconds, the controller's clock)."""
    health_ts: OptionalMoment = None
    """When its last health message arrived; silence after an update is a failure."""
    reported_ts: OptionalMoment = None
    """When its last reported-state message arrived."""
    agent_version: str | None = None
    """The fleet-agent version it runs."""
    heartbeat: dict[str, Any] = Field(default_factory=dict)
    """Its last heartbeat: seq, uptime (s), cpu (%), mem_free and disk_free (bytes), latency_ms, version."""
    clock_offset: float | None = None
    """Its clock minus the controller's in seconds (positive: ahead), from its messages' timestamps
    (null: not measured since the controller started)."""


class HealthRecord(View):
    """One health message of a node."""

    ts: Moment
    """When it arrived (unix seconds)."""
    healthy: bool
    """All probes passing."""
    detail: str | None = None
    """The failing probes, if any."""


class NodeEvent(View):
    """A notable event a node reported (update progress: download, verify, install, switch, rollback)."""

    kind: str
    """What happened, e.g. update.downloading, update.installed, update.rolled_back."""
    detail: str | None = None
    """One line for people."""
    data: dict[str, Any] = Field(default_factory=dict)
    """Machine-readable details (versions, chunk counts, reasons)."""
    ts: Moment
    """When the node says it happened (unix seconds, the device's clock within the controller's bounds)."""


class AckRecord(View):
    """One acknowledgement of a command by its node."""

    status: str
    """accepted, done, failed, rejected, duplicate or expired."""
    detail: str | None = None
    """The node's one-line explanation."""
    ts: Moment
    """When the controller received it (unix seconds)."""


class CommandView(View):
    """A command to one node, followed until its final acknowledgement."""

    id: str
    """The command id (the agent executes each id once)."""
    node: str
    """The node it is for."""
    action: str
    """ping, report, restart, reload or rollback."""
    args: dict[str, Any] = Field(default_factory=dict)
    """The action's arguments."""
    status: str
    """pending (no ack yet), cancelled, accepted, done, failed, rejected, duplicate or expired."""
    created: Moment
    """When it was sent first (unix seconds)."""
    expires_at: OptionalMoment = None
    """After this the controller stops resending and the agent refuses it (unix seconds)."""
    attempts: int = 0
    """How often it was published."""
    acks: list[AckRecord] = Field(default_factory=list)
    """The ack trail, oldest first."""


class NodeDetail(View):
    """One node with its health history (as transitions and raw), recent commands and update events."""

    node: NodeView
    """The node."""
    health_history: list[HealthRecord] = Field(default_factory=list)
    """Its last health messages, oldest first."""
    commands: list[CommandView] = Field(default_factory=list)
    """Its most recent commands, newest first."""
    events: list[NodeEvent] = Field(default_factory=list)
    """Its most recent update events, oldest first."""


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
    """One wave of a rollout. Waves are numbered from 1 everywhere people read them: wave 1 is ``index`` 0."""

    index: int
    """Position in the rollout's list of waves, from 0 (people call it wave index + 1)."""
    nodes: int
    """Nodes in this wave."""
    started_at: OptionalMoment = None
    """When the wave started (unix seconds)."""
    finished_at: OptionalMoment = None
    """When every node of the wave was judged (unix seconds)."""
    counts: dict[NodeOutcome, int] = Field(default_factory=dict)
    """Nodes of the wave per outcome."""

    @property
    def number(self) -> int:
        """The wave's number as people, logs and the CLI name it: 1 for the first."""
        return self.index + 1


class RolloutRequest(BaseModel):
    """A staged, health-gated rollout of one release to the nodes matching a selector."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    release: str = Field(min_length=3, max_length=200)
    """name@version of a release in the controller's release store."""
    selector: dict[str, str] = Field(default_factory=dict, max_length=32)
    """Label equality (key: value); empty: every node."""
    waves: list[str] = Field(default_factory=lambda: ["1%", "25%", "100%"])
    """Cumulative wave sizes: percentages (1%) or node counts (5); canary-labelled nodes go first."""
    soak: float = Field(default=120.0, ge=0, le=7 * 86400)
    """Seconds a node must stay healthy on the new version to succeed."""
    wave_timeout: float = Field(default=1800.0, gt=0, le=30 * 86400)
    """Seconds a wave may take; nodes not finished by then fail (or are unreachable if never online)."""
    health_timeout: float = Field(default=90.0, gt=0, le=86400)
    """Health silence after the update, in seconds, that counts as failure."""
    max_failures: str = Field(default="5%", max_length=16)
    """Abort when a wave reaches this many failed nodes: a percentage (5%) or a count (3)."""
    min_finished: int = Field(default=1, ge=1, le=1_000_000)
    """Finished nodes in a wave before a percentage threshold applies."""


class RolloutAction(View):
    """Who did something to a rollout, from the audit trail."""

    action: str
    """start_rollout, pause_rollout, resume_rollout or abort_rollout."""
    actor: str
    """The certificate CN or the token name."""
    via: str
    """certificate or token."""
    ts: Moment
    """When (unix seconds)."""
    request_id: str
    """The request's id (X-Request-Id)."""


class RolloutView(View):
    """A rollout with its progress per wave and per node."""

    id: str
    """The rollout id."""
    release: str
    """name@version being rolled out."""
    selector: dict[str, str]
    """The label selector it targets."""
    state: RolloutState
    """running, paused, aborting (rolling touched nodes back), aborted or succeeded."""
    current_wave: int
    """Index (from 0) of the wave being driven; people call it wave current_wave + 1."""
    waves: list[WaveView]
    """Its waves in order."""
    created: Moment
    """When it started (unix seconds)."""
    updated: Moment
    """When its state last changed (unix seconds)."""
    detail: str | None = None
    """Why it aborted, or what it is waiting for."""
    nodes: dict[str, NodeOutcome] = Field(default_factory=dict)
    """Every targeted node and its outcome."""
    actions: list[RolloutAction] = Field(default_factory=list)
    """Who started, paused, resumed or aborted it, oldest first (from the audit trail)."""


class PlannedWave(View):
    """One wave of a rollout plan."""

    number: int
    """The wave's number, from 1."""
    nodes: list[str]
    """The nodes that land in it."""


class RolloutPlan(View):
    """What ``POST /v1/rollouts`` would do with the same request now, without doing it."""

    release: str
    """name@version."""
    selector: dict[str, str]
    """The label selector."""
    nodes: int
    """Nodes the selector matches."""
    waves: list[PlannedWave]
    """The waves, in order, with their nodes."""
    canaries: list[str]
    """Nodes an operator labelled ring=canary: they always go first."""
    conflicts: list[str]
    """Active rollouts that already target some of these nodes (the start would be refused)."""
    note: str
    """How the order after the canaries is chosen."""


class ReleaseView(View):
    """A signed release in the controller's release store."""

    name: str
    """The release name."""
    version: str
    """The release version."""
    label: str
    """name@version, what a rollout names."""
    digest: str
    """sha256 of the payload."""
    size: int
    """Payload size in bytes."""
    chunks: int
    """Number of transfer chunks."""
    chunk_size: int
    """Chunk size in bytes."""
    entry: list[str]
    """The workload command, relative to the release directory."""
    health_probe: str | None = None
    """The release's health probe (kind and target), if it has one."""
    created_at: Moment
    """When it was built (unix seconds)."""
    signed: bool
    """Whether the manifest carries a signature (agents refuse unsigned releases)."""


class AccessRoleName(StrEnum):
    """An API role (certs.AccessRole, repeated here so the API schema names it)."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class TokenRequest(BaseModel):
    """Body of ``POST /v1/tokens``."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """The token's name: the actor the audit trail records for it (unique among active tokens)."""
    role: AccessRoleName
    """viewer, operator or admin."""
    expires_in: float | None = Field(default=None, gt=0, le=10 * 366 * 86400)
    """Seconds until it expires; null: never."""


class TokenView(View):
    """An API token without its secret (shown once, at creation; stored only as a salted hash)."""

    name: str
    """The token's name."""
    role: AccessRoleName
    """viewer, operator or admin."""
    created: Moment
    """When it was created (unix seconds)."""
    created_by: str
    """Who created it."""
    expires_at: OptionalMoment = None
    """When it expires (unix seconds); null: never."""
    revoked_at: OptionalMoment = None
    """When it was revoked (unix seconds); null: active."""


class TokenCreated(View):
    """A new API token: ``token`` is shown this once."""

    info: TokenView
    """The token's name, role and expiry."""
    token: str
    """The secret; send it as ``Authorization: Bearer <token>`` (the CLI reads FLEET_TOKEN)."""


class AuditEntry(View):
    """One change requested through the API, or refused."""

    seq: int
    """Position in the trail (increasing)."""
    ts: Moment
    """When (unix seconds)."""
    actor: str
    """The certificate CN or the token name."""
    via: str
    """certificate or token."""
    role: str
    """The actor's role at the time."""
    action: str
    """The operation id, e.g. start_rollout, send_command, create_token."""
    target: str | None = None
    """What it acted on: a node, command, rollout or token."""
    request_id: str
    """The request's id (X-Request-Id)."""
    outcome: str
    """ok, failed (the controller refused it: 4xx) or denied (the role does not allow it: 403)."""
    status: int
    """The HTTP status answered."""
    detail: str | None = None
    """The error, for outcomes other than ok."""


class IdentityView(View):
    """A certificate identity the controller knows: from its PKI directory or seen on the API."""

    name: str
    """The certificate CN."""
    role: str
    """server, controller, operator or ca."""
    access: str | None = None
    """An operator's API role."""
    not_after: Moment
    """When the certificate expires (unix seconds)."""
    revoked: bool = False
    """Listed in crl.pem."""
    source: str
    """pki (a file in the PKI directory) or api (presented to the API)."""


class HealthView(View):
    """``/healthz``: what the controller needs to work, each checked cheaply."""

    ok: bool
    """Broker connected, database answering and the periodic loop running."""
    broker: str
    """connected or disconnected."""
    database: str
    """ok, or the problem."""
    leader: bool
    """Whether this controller drives rollouts and resends (always, unless it shares ingest)."""
    tick_age: float | None = None
    """Seconds since the periodic loop last finished a round (null: not started)."""


class Page(BaseModel, Generic[T]):
    """One page of a list: pass ``next_cursor`` as ``cursor`` for the next one (null: the last page)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    items: list[T]
    """The entries of this page."""
    next_cursor: str | None = None
    """Opaque; null when this is the last page."""


@dataclass(frozen=True)
class RolloutProgress:
    """An active rollout's progress, for metrics."""

    id: str
    release: str
    state: str
    wave: int  # number, from 1
    waves: int
    outcomes: dict[str, int]


@dataclass(frozen=True)
class CertificateExpiry:
    name: str
    role: str
    not_after: float


@dataclass(frozen=True)
class FleetStats:
    """What the controller exports at a scrape (fleet.controller.metrics turns it into metric families)."""

    nodes_by_status: dict[str, int] = field(default_factory=dict)
    nodes_by_version: dict[str, int] = field(default_factory=dict)
    nodes_by_health: dict[str, int] = field(default_factory=dict)
    rollouts_by_state: dict[str, int] = field(default_factory=dict)
    rollouts: list[RolloutProgress] = field(default_factory=list)
    heartbeats_received: int = 0
    heartbeat_rate: float = 0.0
    invalid_messages: int = 0
    commands_pending: int = 0
    artifact_chunks_sent: int = 0
    artifact_bytes_sent: int = 0
    artifact_requests_dropped: int = 0
    artifact_requests_limited: dict[str, int] = field(default_factory=dict)
    """Requests the release service's fair share cut: replaced, clamped, refused, full_for_delta."""
    deltas_pending: int = 0
    tick_errors: int = 0
    leader: bool = True
    rejected_values: dict[str, int] = field(default_factory=dict)
    rollout_node_errors: dict[str, int] = field(default_factory=dict)
    certificates: list[CertificateExpiry] = field(default_factory=list)


class ControllerFacade(Protocol):
    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]: ...

    def node(self, node_id: str) -> NodeDetail: ...  # NotFound

    def node_events(self, node_id: str) -> list[NodeEvent]: ...  # NotFound; oldest first

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView: ...  # NotFound for an unknown node, BadRequest for a malformed action

    def command(self, command_id: str) -> CommandView: ...  # NotFound

    def cancel_command(self, command_id: str) -> CommandView: ...  # NotFound; Conflict unless pending

    def start_rollout(self, request: RolloutRequest) -> RolloutView: ...  # NotFound (release), BadRequest, Conflict

    def plan_rollout(self, request: RolloutRequest) -> RolloutPlan: ...  # as start_rollout, changing nothing

    def rollouts(self) -> list[RolloutView]: ...

    def rollout(self, rollout_id: str) -> RolloutView: ...  # NotFound

    def pause_rollout(self, rollout_id: str) -> RolloutView: ...

    def resume_rollout(self, rollout_id: str) -> RolloutView: ...

    def abort_rollout(self, rollout_id: str) -> RolloutView: ...

    def list_releases(self) -> list[ReleaseView]: ...

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        """Operator labels (``PUT``/``PATCH /v1/nodes/{id}/labels``, ``fleet label``): ``labels`` maps a
        key to its new value, or to None to remove it; ``replace_all`` makes the given labels the
        node's whole set. NotFound; BadRequest for a malformed label."""
        ...

    def identities(self) -> list[IdentityView]: ...  # the certificates the controller knows

    def health(self) -> HealthView: ...  # cheap: /healthz is polled

    def stats(self) -> FleetStats: ...  # for a metrics scrape


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
    """``ring=canary,site=plant-3`` as a dict; empty or missing selects every node (rollouts take
    equality only; lists take ``fleet.controller.selectors.Selector``)."""
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


def select(nodes: list[NodeView], selector: Selector | None) -> list[NodeView]:
    """The nodes whose effective labels match ``selector`` (all without one)."""
    return nodes if selector is None else [node for node in nodes if selector.matches(node.labels)]
