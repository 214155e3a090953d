"""The device side of the protocol as decisions without I/O: one core for the agent and ``fleet sim``.

Everything here is a plain function or a small value object: no sockets, files, asyncio or clocks
(``now`` is passed in). The agent (``agent.desired``, ``agent.commands``, ``agent.updater`` and
``agent.update``) and the simulator (``fleet.tools.sim``) call the same functions, so a simulated
device decides exactly what a real one decides:

- desired state: apply a newer generation, ignore a replay of the applied one, ignore (and count)
  a stale one (:func:`accept_desired`);
- commands: duplicate (with the earlier status), expired, unknown action or unexpected arguments
  (rejected, with the texts operators see), else accepted (:func:`command_intake`);
- updates: nothing to do, switch to a release still on disk, or download (:func:`plan_update`);
- the MQTT download: which chunk window to ask for, when a window is filled, complete, timed out
  or lost to a reconnect, how long to wait after a server error (:func:`ask_window`,
  :func:`window_status`, :func:`after_server_error`), and which chunks to keep (:func:`check_chunk`);
- rollback commands: nothing to do, fail, or roll back to the previous release, from the running
  and previous versions and the command's ``from``/``to`` (:func:`decide_rollback`);
- controller time: the offset to the controller's clock learned from signed messages' ``issued_at``,
  on which command expiry is judged (:func:`learn_controller_time`, :func:`controller_now`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.protocol.messages import Ack, AckStatus, ArtifactChunk, ArtifactRequest, Command, ReleaseRef, digest_hex

# ---- desired state ---------------------------------------------------------------------------

STALE_DESIRED = "stale_desired"
"""The counter a stale desired state increments."""


class DesiredVerdict(StrEnum):
    APPLY = "apply"
    REPLAY = "replay"  # the applied generation again (the retained copy, resent on every subscribe)
    STALE = "stale"  # lower than the applied one: an old controller, or a replayed message


@dataclass(frozen=True)
class DesiredDecision:
    verdict: DesiredVerdict
    generation: int
    applied: int  # -1: nothing applied yet

    @property
    def apply(self) -> bool:
        return self.verdict is DesiredVerdict.APPLY

    @property
    def counter(self) -> str | None:
        """The counter to increment, if any."""
        return STALE_DESIRED if self.verdict is DesiredVerdict.STALE else None

    @property
    def reason(self) -> str | None:
        """What to log (a warning) when the document is ignored as stale; a replay is silent."""
        if self.verdict is not DesiredVerdict.STALE:
            return None
        return f"ignored desired generation {self.generation} (applied {self.applied})"


def accept_desired(applied: int | None, generation: int) -> DesiredDecision:
    """Whether a desired state of ``generation`` is applied on a device that applied ``applied``
    (None: none yet, so even generation 0 applies). Generations only grow: anything not newer
    is ignored."""
    current = -1 if applied is None else applied
    if generation > current:
        verdict = DesiredVerdict.APPLY
    elif generation == current:
        verdict = DesiredVerdict.REPLAY
    else:
        verdict = DesiredVerdict.STALE
    return DesiredDecision(verdict, generation, current)


# ---- commands --------------------------------------------------------------------------------

ACTIONS: tuple[str, ...] = ("ping", "report", "restart", "reload", "rollback")
"""The actions a device runs."""

ACTION_ARGS: dict[str, frozenset[str]] = {"rollback": frozenset({"release", "from", "to", "reason", "rollout"})}
"""Arguments each action accepts; a rollout's rollback names what it undoes (for the record only)."""

INTERRUPTED = "interrupted: the agent stopped while executing it; not repeated"
"""The ``failed`` detail of a command that was executing when the agent stopped."""


class Intake(StrEnum):
    ACCEPT = "accept"
    DUPLICATE = "duplicate"
    EXPIRED = "expired"
    REJECTED = "rejected"


@dataclass(frozen=True)
class CommandIntake:
    """What to do with a command that just arrived: the ack to send and whether to run it.

    ``EXPIRED`` and ``REJECTED`` are remembered with ``ack.value`` as their status (so a resend is
    a duplicate); ``ACCEPT`` sends ``accepted`` and runs it, then ``done`` or ``failed``
    (:func:`result`); ``DUPLICATE`` changes nothing."""

    outcome: Intake
    ack: AckStatus
    detail: str | None

    @property
    def execute(self) -> bool:
        return self.outcome is Intake.ACCEPT

    @property
    def remember(self) -> bool:
        """True when the device records ``ack.value`` as the command's final status now."""
        return self.outcome in (Intake.EXPIRED, Intake.REJECTED)


def refusal(command: Command, now: float, actions: Collection[str] = ACTIONS) -> tuple[AckStatus, str] | None:
    """Why a new command is not run: expired, unknown action, or arguments the action does not take."""
    if command.expires_at is not None and command.expires_at < now:
        return AckStatus.EXPIRED, f"expired at {command.expires_at:.0f}"
    if command.action not in actions:
        return AckStatus.REJECTED, f"unknown action {command.action!r}; known: {', '.join(sorted(actions))}"
    unexpected = set(command.args) - ACTION_ARGS.get(command.action, frozenset())
    if unexpected:
        return AckStatus.REJECTED, f"{command.action} does not take {', '.join(sorted(unexpected))}"
    return None


def command_intake(
    command: Command, *, earlier: str | None, now: float, actions: Collection[str] = ACTIONS
) -> CommandIntake:
    """Decide on a valid command. ``earlier``: the status recorded for this id before (None: new)."""
    if earlier is not None:
        return CommandIntake(Intake.DUPLICATE, AckStatus.DUPLICATE, f"already seen: {earlier}")
    problem = refusal(command, now, actions)
    if problem is None:
        return CommandIntake(Intake.ACCEPT, AckStatus.ACCEPTED, None)
    status, reason = problem
    outcome = Intake.EXPIRED if status is AckStatus.EXPIRED else Intake.REJECTED
    return CommandIntake(outcome, status, reason)


def refusable_id(raw: Mapping[str, Any]) -> str | None:
    """The id under which an invalid command is answered ``rejected``; None when it has no usable id
    (then it is only logged)."""
    command_id = raw.get("id")
    if isinstance(command_id, str) and command_id and len(command_id) <= 128 and not command_id.isspace():
        return command_id
    return None


def result(detail: str | None = None, *, error: str | None = None) -> tuple[AckStatus, str | None]:
    """The final ack of an accepted command: ``done`` with its detail, or ``failed`` with the error."""
    if error is not None:
        return AckStatus.FAILED, error
    return AckStatus.DONE, detail


def ack(command_id: str, status: AckStatus, detail: str | None, now: float) -> Ack:
    return Ack(id=command_id, status=status, detail=detail, ts=now)


class CommandMemory:
    """The command ids a device has seen with their latest status, at most ``limit`` (oldest
    forgotten first). The agent keeps its history in SQLite; the simulator keeps this."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._seen: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def status(self, command_id: str) -> str | None:
        return self._seen.get(command_id)

    def record(self, command_id: str, status: str) -> None:
        self._seen[command_id] = status
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)


# ---- rollback --------------------------------------------------------------------------------

CONFIGURED_WORKLOAD = "the configured workload"
"""What runs when no release is installed (how rollback texts name it)."""

ROLLBACK_REASON = "rollback command"
"""The reason reported with ``rolled_back`` after an operator's or a rollout's rollback."""

NO_PREVIOUS_RELEASE = "no previous release"


class RollbackVerdict(StrEnum):
    NOOP = "noop"  # done, nothing changes; the detail says why
    FAIL = "fail"  # failed with the detail
    ROLL_BACK = "roll_back"  # switch to ``back_to`` (None: the configured workload)


@dataclass(frozen=True)
class RollbackDecision:
    verdict: RollbackVerdict
    detail: str | None = None
    back_to: str | None = None


def decide_rollback(running: str | None, previous: str | None, args: Mapping[str, Any]) -> RollbackDecision:
    """Roll back to the previous release. A rollout names what it undoes (``from``) and where to
    (``to``): a device that is not on ``from`` (never updated, or already back by itself) is left
    alone, so a rollback never pushes a device below its baseline.

    ``running``/``previous``: the installed releases' versions (None: none)."""
    undo, back_to = args.get("from"), args.get("to")
    if undo is not None and running != undo:
        shown = running or CONFIGURED_WORKLOAD
        return RollbackDecision(RollbackVerdict.NOOP, f"not running {undo} (running {shown}): nothing to roll back")
    if back_to is not None and running == back_to:
        return RollbackDecision(RollbackVerdict.NOOP, f"already on {back_to}")
    if back_to is not None and previous != back_to:
        return RollbackDecision(RollbackVerdict.FAIL, f"release {back_to} is not installed")
    if running is None:
        return RollbackDecision(RollbackVerdict.FAIL, NO_PREVIOUS_RELEASE)
    return RollbackDecision(RollbackVerdict.ROLL_BACK, back_to=previous)


def rolled_back(running: str, back_to: str | None) -> str:
    """The ``done`` detail of a rollback."""
    return f"rolled back from {running} to {back_to or CONFIGURED_WORKLOAD}"


# ---- updates ---------------------------------------------------------------------------------


class UpdatePlan(StrEnum):
    NONE = "none"  # already running it, or it failed for this generation: wait for a new one
    SWITCH = "switch"  # still installed (the previous release coming back): switch without downloading
    DOWNLOAD = "download"


def plan_update(
    target: ReleaseRef | None,
    generation: int,
    *,
    running: str | None,
    installed: Collection[str],
    failed: tuple[str, int] | None = None,
) -> UpdatePlan:
    """What converging to ``target`` takes. ``running``: the running release's digest;
    ``installed``: digests of the releases on disk; ``failed``: (digest, generation) of the release
    that failed or was rolled back, not retried for that generation."""
    if target is None or target.digest == running:
        return UpdatePlan.NONE
    if failed is not None and failed == (target.digest, generation):
        return UpdatePlan.NONE
    return UpdatePlan.SWITCH if target.digest in installed else UpdatePlan.DOWNLOAD


# ---- the chunked download over MQTT ----------------------------------------------------------

PROGRESS_EVERY = 1.0
"""Seconds between ``downloading`` progress reports (the last chunk is always reported)."""


def first_missing(have: Collection[int], total: int | None) -> int:
    """The first chunk not held (``total`` when all are; unknown total: no upper bound)."""
    index = 0
    while index in have and (total is None or index < total):
        index += 1
    return index


@dataclass(frozen=True)
class WindowAsk:
    """One ``artifact/req``: ``window`` chunks from ``first``, asked holding ``held`` chunks at
    ``at`` (monotonic seconds) on connection ``connection``."""

    first: int
    window: int
    held: int
    at: float
    connection: int

    def request(self, digest: str, delta_base: str | None = None) -> ArtifactRequest:
        return ArtifactRequest(digest=digest, first=self.first, window=self.window, delta_base=delta_base)


def ask_window(have: Collection[int], total: int | None, window: int, *, now: float, connection: int) -> WindowAsk:
    """The next window to ask for: from the first missing chunk, ``window`` chunks."""
    return WindowAsk(first_missing(have, total), window, len(have), now, connection)


class WindowStatus(StrEnum):
    WAITING = "waiting"  # keep waiting for chunks
    RECONNECTED = "reconnected"  # a new connection since asking: the chunks in flight are lost, ask again
    SERVER_ERROR = "server_error"  # the release server answered with an error
    COMPLETE = "complete"  # every chunk is held
    FILLED = "filled"  # the whole window arrived: ask for the next one
    TIMED_OUT = "timed_out"  # the window did not fill in time: ask again


def window_status(
    ask: WindowAsk,
    *,
    held: int,
    complete: bool,
    now: float,
    timeout: float,
    connection: int,
    server_error: bool = False,
) -> WindowStatus:
    """Where an asked window stands, holding ``held`` chunks now; anything but ``WAITING`` ends the wait."""
    if connection != ask.connection:
        return WindowStatus.RECONNECTED
    if server_error:
        return WindowStatus.SERVER_ERROR
    if complete:
        return WindowStatus.COMPLETE
    if held - ask.held >= ask.window:
        return WindowStatus.FILLED
    if now - ask.at >= timeout:
        return WindowStatus.TIMED_OUT
    return WindowStatus.WAITING


def wait_left(ask: WindowAsk, now: float, timeout: float) -> float:
    """Seconds until the asked window times out."""
    return max(0.0, ask.at + timeout - now)


def progressed(ask: WindowAsk, status: WindowStatus, held: int) -> bool:
    """Whether the wait for ``ask`` ended with progress: new chunks, or a reconnect (asking again
    at once is then right, not a stall)."""
    return status is WindowStatus.RECONNECTED or held > ask.held


def after_server_error(failures: int, max_failures: int) -> float | None:
    """Seconds to wait before asking again after the ``failures``-th server error in one download;
    None: give up (the update fails with :func:`server_error_reason`)."""
    if failures >= max_failures:
        return None
    return float(min(30.0, 2.0**failures))


def server_error_reason(error: str) -> str:
    return f"release server: {error}"


def refetch_bad_artifact(attempt: int, max_failures: int) -> bool:
    """Every chunk matched its digest, yet the assembled artifact does not verify (corrupt or forged
    at the source): fetch it again from scratch, unless this was attempt ``max_failures``."""
    return attempt < max_failures


def artifact_refused(version: str, attempts: int) -> str:
    """The reason an update fails after ``attempts`` artifacts that did not verify."""
    return f"artifact for {version} failed verification {attempts} times"


class ChunkVerdict(StrEnum):
    KEEP = "keep"  # verified: store it (unless already held)
    SERVER_ERROR = "server_error"  # ``chunk.error``: the server cannot serve the request
    STALE = "stale"  # of an abandoned or finished download, or none is running
    INCOMPLETE = "incomplete"  # lacks its digests, size or total
    OUT_OF_RANGE = "out_of_range"  # an index past the artifact's last chunk
    CORRUPT = "corrupt"  # the data does not match its sha256: ask again


def check_chunk(chunk: ArtifactChunk, downloading: str | None) -> ChunkVerdict:
    """Whether to keep a chunk that arrived while downloading the payload ``downloading``."""
    if chunk.error is not None:
        return ChunkVerdict.SERVER_ERROR
    if downloading is None or chunk.digest != downloading:
        return ChunkVerdict.STALE
    if chunk.sha256 is None or chunk.artifact is None or chunk.size is None or chunk.total is None:
        return ChunkVerdict.INCOMPLETE
    if chunk.index >= chunk.total:
        return ChunkVerdict.OUT_OF_RANGE
    if digest_hex(chunk.sha256) != hashlib.sha256(chunk.data).hexdigest():
        return ChunkVerdict.CORRUPT
    return ChunkVerdict.KEEP


def progress_due(now: float, last_report: float, done: int, total: int) -> bool:
    """Whether to report download progress now (at most every :data:`PROGRESS_EVERY` seconds, and
    always for the last chunk)."""
    return done >= total or now - last_report >= PROGRESS_EVERY


def progress_detail(done: int, total: int) -> str:
    return f"chunk {done}/{total}"


# ---- controller time -------------------------------------------------------------------------
#
# A device's clock may be off by hours (no RTC, no NTP yet). Command expiry is the controller's
# promise, so it is judged on the controller's clock: every signed desired state and command carries
# ``issued_at`` (controller time), and at receipt the controller's clock reads at least that. So
# ``issued_at - now`` is a lower bound of (controller time - device time); a message that waited
# (a resend, a retained desired state, a command queued for an offline device) only gives a lower
# one. The estimate is therefore the highest recent sample: a higher one replaces it, one within
# ``CLOCK_CONFIRM`` below it confirms it, a lower one is ignored, unless the estimate went
# ``CLOCK_TRUST`` without confirmation (the controller's clock may have been set back): then the
# most recent sample is trusted. A step of the device's own clock (NTP setting it) is not a
# sample: the agent measures it against a clock that does not step and shifts the estimate
# (:func:`clock_stepped`).

CLOCK_CONFIRM = 5.0
"""Seconds a sample may be below the estimate and still confirm it (transit, scheduling)."""

CLOCK_TRUST = 86_400.0
"""Seconds an estimate holds against lower samples without being confirmed."""


@dataclass(frozen=True)
class ControllerClock:
    """The controller's clock as this device knows it: ``offset`` = controller time - device time,
    learned from the signed message the device received at device time ``at`` (or confirmed then)."""

    offset: float
    at: float

    def now(self, device_now: float) -> float:
        """Controller time at device time ``device_now``."""
        return device_now + self.offset


def learn_controller_time(clock: ControllerClock | None, issued_at: float, now: float) -> ControllerClock:
    """The estimate after a (verified) message issued at controller time ``issued_at`` arrived at
    device time ``now``."""
    sample = issued_at - now
    if clock is None or sample > clock.offset:
        return ControllerClock(sample, now)
    if sample >= clock.offset - CLOCK_CONFIRM:
        return ControllerClock(clock.offset, now)
    if abs(now - clock.at) > CLOCK_TRUST:
        return ControllerClock(sample, now)
    return clock


def clock_stepped(clock: ControllerClock, step: float) -> ControllerClock:
    """The estimate after the device's own clock jumped by ``step`` seconds (NTP set it): the
    controller's clock did not move, so the offset moves the other way."""
    return ControllerClock(clock.offset - step, clock.at + step)


def controller_now(clock: ControllerClock | None, now: float) -> float:
    """Controller time at device time ``now``; the device's own clock until a signed message taught
    the offset. Expiry is judged on this (pass it as ``now`` to :func:`refusal` and
    :func:`command_intake`)."""
    return now if clock is None else clock.now(now)
