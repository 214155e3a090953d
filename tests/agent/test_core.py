"""agent.core: the device protocol's decisions, shared by the agent and ``fleet sim``."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import core
from fleet.protocol.messages import AckStatus, ArtifactChunk, Command, ReleaseRef

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DIGEST_C = "sha256:" + "c" * 64
NOW = 1_700_000_000.0
generations = st.integers(min_value=0, max_value=2**63 - 1)


def release(digest: str = DIGEST_A, version: str = "2.0.0") -> ReleaseRef:
    return ReleaseRef(name="app", version=version, digest=digest, size=10, chunk_size=4)


# ---- desired state ---------------------------------------------------------------------------


def test_desired_newer_applies_same_is_a_silent_replay_lower_is_stale() -> None:
    assert core.accept_desired(None, 0).verdict is core.DesiredVerdict.APPLY  # even generation 0
    assert core.accept_desired(5, 7).apply
    replay = core.accept_desired(7, 7)
    assert (replay.verdict, replay.counter, replay.reason) == (core.DesiredVerdict.REPLAY, None, None)
    stale = core.accept_desired(7, 3)
    assert stale.verdict is core.DesiredVerdict.STALE
    assert stale.counter == "stale_desired"
    assert stale.reason == "ignored desired generation 3 (applied 7)"  # the agent's log line


@given(applied=st.none() | generations, incoming=generations)
def test_desired_applies_exactly_the_newer_generations(applied: int | None, incoming: int) -> None:
    decision = core.accept_desired(applied, incoming)
    current = -1 if applied is None else applied
    assert decision.apply == (incoming > current)
    assert (decision.counter is not None) == (incoming < current)


@given(st.lists(generations, max_size=30))
def test_applied_generation_never_goes_down(sequence: list[int]) -> None:
    applied: int | None = None
    for generation in sequence:
        if core.accept_desired(applied, generation).apply:
            assert applied is None or generation > applied
            applied = generation
    assert applied == (max(sequence) if sequence else None)


# ---- commands --------------------------------------------------------------------------------


def command(action: str = "ping", **fields: Any) -> Command:
    return Command(id="c1", action=action, **fields)


def test_new_valid_command_is_accepted_and_run() -> None:
    intake = core.command_intake(command(), earlier=None, now=NOW)
    assert (intake.outcome, intake.ack, intake.detail, intake.execute, intake.remember) == (
        core.Intake.ACCEPT,
        AckStatus.ACCEPTED,
        None,
        True,
        False,
    )


@pytest.mark.parametrize("earlier", ["received", "executing", "done", "failed", "rejected", "expired"])
def test_a_seen_command_is_a_duplicate_with_its_earlier_status(earlier: str) -> None:
    # Even an expired or unknown one: the id decides first.
    intake = core.command_intake(command("launch", expires_at=1.0), earlier=earlier, now=NOW)
    assert (intake.outcome, intake.ack, intake.detail) == (
        core.Intake.DUPLICATE,
        AckStatus.DUPLICATE,
        f"already seen: {earlier}",
    )
    assert not intake.execute and not intake.remember


def test_expired_command() -> None:
    intake = core.command_intake(command(expires_at=NOW - 5), earlier=None, now=NOW)
    assert (intake.ack, intake.detail) == (AckStatus.EXPIRED, f"expired at {NOW - 5:.0f}")
    assert intake.remember and not intake.execute
    assert core.command_intake(command(expires_at=NOW), earlier=None, now=NOW).execute  # not before it passed


def test_unknown_action_and_unexpected_arguments_are_rejected_with_the_agents_texts() -> None:
    unknown = core.command_intake(command("launch-missiles"), earlier=None, now=NOW)
    assert (unknown.ack, unknown.detail) == (
        AckStatus.REJECTED,
        "unknown action 'launch-missiles'; known: ping, reload, report, restart, rollback",
    )
    assert unknown.remember
    extra = core.command_intake(command("ping", args={"x": 1, "a": 2}), earlier=None, now=NOW)
    assert (extra.ack, extra.detail) == (AckStatus.REJECTED, "ping does not take a, x")
    rollout = {"release": "app", "from": "2", "to": "1", "reason": "r", "rollout": "r1"}
    assert core.command_intake(command("rollback", args=rollout), earlier=None, now=NOW).execute
    # Expiry is checked before the action: an expired unknown action is `expired`.
    assert core.command_intake(command("launch", expires_at=1.0), earlier=None, now=NOW).ack is AckStatus.EXPIRED


def test_known_actions_can_be_narrowed() -> None:
    intake = core.command_intake(command("restart"), earlier=None, now=NOW, actions=("ping",))
    assert intake.detail == "unknown action 'restart'; known: ping"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"id": "c9", "action": 42}, "c9"),
        ({"action": "ping"}, None),
        ({"id": 7}, None),
        ({"id": ""}, None),
        ({"id": "   "}, None),
        ({"id": "x" * 129}, None),
        ({"id": "x" * 128}, "x" * 128),
    ],
)
def test_invalid_command_is_answered_under_a_usable_id_only(raw: dict[str, Any], expected: str | None) -> None:
    assert core.refusable_id(raw) == expected


def test_results_and_acks() -> None:
    assert core.result("pong") == (AckStatus.DONE, "pong")
    assert core.result(error="boom") == (AckStatus.FAILED, "boom")
    ack = core.ack("c1", AckStatus.DONE, "pong", NOW)
    assert (ack.id, ack.status, ack.detail, ack.ts) == ("c1", AckStatus.DONE, "pong", NOW)


def test_command_memory_forgets_the_oldest() -> None:
    memory = core.CommandMemory(limit=2)
    memory.record("a", "received")
    memory.record("a", "done")
    memory.record("b", "done")
    memory.record("c", "rejected")
    assert (memory.status("a"), memory.status("b"), memory.status("c"), len(memory)) == (None, "done", "rejected", 2)


@given(st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=40))
def test_each_command_id_runs_at_most_once(ids: list[str]) -> None:
    memory = core.CommandMemory()
    runs: dict[str, int] = {}
    for command_id in ids:
        earlier = memory.status(command_id)
        if earlier is None:
            memory.record(command_id, "received")
        intake = core.command_intake(Command(id=command_id, action="ping"), earlier=earlier, now=NOW)
        if intake.execute:
            runs[command_id] = runs.get(command_id, 0) + 1
            memory.record(command_id, "done")
    assert runs == dict.fromkeys(set(ids), 1)


# ---- rollback --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "previous", "args", "verdict", "detail", "back_to"),
    [
        # An operator's rollback: back to the previous release, or to the configured workload.
        ("2.0", "1.0", {}, core.RollbackVerdict.ROLL_BACK, None, "1.0"),
        ("1.0", None, {}, core.RollbackVerdict.ROLL_BACK, None, None),
        (None, None, {}, core.RollbackVerdict.FAIL, "no previous release", None),
        # A rollout's rollback on a device not on `from`: left alone.
        (
            "1.0",
            "2.0",
            {"from": "2.0", "to": "1.0"},
            core.RollbackVerdict.NOOP,
            "not running 2.0 (running 1.0): nothing to roll back",
            None,
        ),
        (
            None,
            None,
            {"from": "9.9.9", "to": "8.8.8"},
            core.RollbackVerdict.NOOP,
            "not running 9.9.9 (running the configured workload): nothing to roll back",
            None,
        ),
        ("1.0", "0.9", {"to": "1.0"}, core.RollbackVerdict.NOOP, "already on 1.0", None),
        ("2.0", "1.5", {"from": "2.0", "to": "1.0"}, core.RollbackVerdict.FAIL, "release 1.0 is not installed", None),
        ("2.0", None, {"to": "1.0"}, core.RollbackVerdict.FAIL, "release 1.0 is not installed", None),
        (None, None, {"to": "1.0"}, core.RollbackVerdict.FAIL, "release 1.0 is not installed", None),
        ("2.0", "1.0", {"from": "2.0", "to": "1.0"}, core.RollbackVerdict.ROLL_BACK, None, "1.0"),
    ],
)
def test_rollback_decision(
    running: str | None,
    previous: str | None,
    args: dict[str, Any],
    verdict: core.RollbackVerdict,
    detail: str | None,
    back_to: str | None,
) -> None:
    assert core.decide_rollback(running, previous, args) == core.RollbackDecision(verdict, detail, back_to)


versions = st.none() | st.sampled_from(["1.0", "2.0", "3.0"])


@given(running=versions, previous=versions, undo=versions, to=versions)
def test_rollback_never_lands_off_to_or_from_off_from(
    running: str | None, previous: str | None, undo: str | None, to: str | None
) -> None:
    args = {k: v for k, v in (("from", undo), ("to", to)) if v is not None}
    decision = core.decide_rollback(running, previous, args)
    if decision.verdict is core.RollbackVerdict.ROLL_BACK:
        assert running is not None
        assert decision.back_to == previous
        assert to is None or decision.back_to == to  # never somewhere else than asked
        assert undo is None or running == undo  # only undoes what it names
    else:
        assert decision.detail


def test_rolled_back_detail() -> None:
    assert core.rolled_back("2.0", "1.0") == "rolled back from 2.0 to 1.0"
    assert core.rolled_back("1.0", None) == "rolled back from 1.0 to the configured workload"


# ---- update plan -----------------------------------------------------------------------------


def test_update_plan() -> None:
    assert core.plan_update(None, 1, running=DIGEST_A, installed={DIGEST_A}) is core.UpdatePlan.NONE
    assert core.plan_update(release(DIGEST_A), 1, running=DIGEST_A, installed={DIGEST_A}) is core.UpdatePlan.NONE
    assert core.plan_update(release(DIGEST_B), 1, running=DIGEST_A, installed={DIGEST_A}) is core.UpdatePlan.DOWNLOAD
    assert core.plan_update(release(DIGEST_B), 1, running=None, installed=set()) is core.UpdatePlan.DOWNLOAD
    back = core.plan_update(release(DIGEST_B), 2, running=DIGEST_A, installed={DIGEST_A, DIGEST_B})
    assert back is core.UpdatePlan.SWITCH
    # Failed (or rolled back) for this generation: not again; a new generation tries again.
    failed = (DIGEST_B, 3)
    assert core.plan_update(release(DIGEST_B), 3, running=DIGEST_A, installed=(), failed=failed).value == "none"
    assert core.plan_update(release(DIGEST_B), 4, running=DIGEST_A, installed=(), failed=failed).value == "download"


# ---- chunk windows ---------------------------------------------------------------------------


def test_first_missing() -> None:
    assert core.first_missing(set(), None) == 0
    assert core.first_missing({0, 1, 3}, 5) == 2
    assert core.first_missing({0, 1, 2}, 3) == 3
    assert core.first_missing({0, 1, 2}, None) == 3


@given(st.sets(st.integers(0, 40)), st.none() | st.integers(0, 40))
def test_first_missing_is_the_lowest_gap(have: set[int], total: int | None) -> None:
    first = core.first_missing(have, total)
    assert all(index in have for index in range(first))
    assert first not in have or (total is not None and first == total)
    if total is not None:
        assert first <= total


def ask(first: int = 0, window: int = 8, held: int = 0, at: float = 100.0, connection: int = 1) -> core.WindowAsk:
    return core.WindowAsk(first, window, held, at, connection)


def status(window_ask: core.WindowAsk, **changes: Any) -> core.WindowStatus:
    values: dict[str, Any] = {"held": 0, "complete": False, "now": 101.0, "timeout": 15.0, "connection": 1}
    return core.window_status(window_ask, **(values | changes))


def test_window_asks_from_the_first_missing_chunk() -> None:
    asked = core.ask_window({0, 1, 2, 4}, 10, 8, now=5.0, connection=3)
    assert asked == core.WindowAsk(first=3, window=8, held=4, at=5.0, connection=3)
    request = asked.request(DIGEST_A, DIGEST_B)
    assert (request.digest, request.first, request.window, request.delta_base) == (DIGEST_A, 3, 8, DIGEST_B)


def test_window_status() -> None:
    window_ask = ask(held=4)
    assert status(window_ask, held=11) is core.WindowStatus.WAITING  # 7 of 8 arrived
    assert status(window_ask, held=12) is core.WindowStatus.FILLED
    assert status(window_ask, held=6, complete=True) is core.WindowStatus.COMPLETE
    assert status(window_ask, held=6, now=115.0) is core.WindowStatus.TIMED_OUT
    assert status(window_ask, held=6, connection=2) is core.WindowStatus.RECONNECTED
    assert status(window_ask, held=6, server_error=True) is core.WindowStatus.SERVER_ERROR
    # A reconnect wins over everything: what was in flight is lost.
    assert status(window_ask, held=12, complete=True, server_error=True, connection=2).value == "reconnected"
    assert status(window_ask, held=12, complete=True, server_error=True).value == "server_error"
    assert status(window_ask, held=12, complete=True).value == "complete"


def test_progress_and_time_left() -> None:
    window_ask = ask(held=4)
    assert core.progressed(window_ask, core.WindowStatus.TIMED_OUT, 4) is False  # a stall
    assert core.progressed(window_ask, core.WindowStatus.TIMED_OUT, 5) is True  # one lost chunk
    assert core.progressed(window_ask, core.WindowStatus.RECONNECTED, 4) is True  # ask at once, no stall
    assert core.wait_left(window_ask, 110.0, 15.0) == 5.0
    assert core.wait_left(window_ask, 120.0, 15.0) == 0.0


@given(held=st.integers(0, 20), extra=st.integers(0, 20), elapsed=st.floats(0, 30), window=st.integers(1, 8))
def test_a_window_ends_when_filled_or_timed_out(held: int, extra: int, elapsed: float, window: int) -> None:
    window_ask = ask(window=window, held=held)
    result = status(window_ask, held=held + extra, now=window_ask.at + elapsed)
    if extra >= window:
        assert result is core.WindowStatus.FILLED
    elif elapsed >= 15.0:
        assert result is core.WindowStatus.TIMED_OUT
    else:
        assert result is core.WindowStatus.WAITING


@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(1, 16), st.integers(1, 60))
def test_window_driver_fetches_every_chunk_once_however_chunks_get_lost(
    lost: list[bool], window: int, total: int
) -> None:
    """Drive the core like the agent: ask, receive the window, some chunks lost (``lost``, then
    none), ask again. Each request starts at a missing chunk, and the download completes."""
    have: set[int] = set()
    losses = iter(lost)
    now = 0.0
    for _round in range(10 * total + 50):
        window_ask = core.ask_window(have, total, window, now=now, connection=1)
        assert window_ask.first not in have and window_ask.first < total
        for index in range(window_ask.first, min(total, window_ask.first + window)):
            if not next(losses, False):
                have.add(index)
        now += 20.0 if len(have) - window_ask.held < window else 0.5
        result = status(window_ask, held=len(have), complete=len(have) >= total, now=now)
        assert result is not core.WindowStatus.WAITING
        if result is core.WindowStatus.COMPLETE:
            break
    else:
        pytest.fail("the download did not complete")
    assert have == set(range(total))


def test_server_error_backoff_then_give_up() -> None:
    assert [core.after_server_error(n, 5) for n in range(1, 6)] == [2.0, 4.0, 8.0, 16.0, None]
    assert core.after_server_error(6, 10) == 30.0  # capped
    assert core.server_error_reason("unknown release x") == "release server: unknown release x"


def test_bad_artifact_is_fetched_again_up_to_max_failures() -> None:
    assert [core.refetch_bad_artifact(attempt, 3) for attempt in (1, 2, 3)] == [True, True, False]
    assert core.artifact_refused("2.0.0", 3) == "artifact for 2.0.0 failed verification 3 times"


def chunk(index: int = 0, data: bytes = b"abcd", **changes: Any) -> ArtifactChunk:
    fields: dict[str, Any] = {
        "digest": DIGEST_A,
        "index": index,
        "data": data,
        "total": 3,
        "size": 10,
        "artifact": DIGEST_C,
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
    }
    return ArtifactChunk(**(fields | changes))


def test_check_chunk() -> None:
    assert core.check_chunk(chunk(), DIGEST_A) is core.ChunkVerdict.KEEP
    assert core.check_chunk(chunk(), DIGEST_B) is core.ChunkVerdict.STALE
    assert core.check_chunk(chunk(), None) is core.ChunkVerdict.STALE
    assert core.check_chunk(chunk(error="gone"), None) is core.ChunkVerdict.SERVER_ERROR  # whatever its digest
    assert core.check_chunk(chunk(sha256=None), DIGEST_A) is core.ChunkVerdict.INCOMPLETE
    assert core.check_chunk(chunk(total=None), DIGEST_A) is core.ChunkVerdict.INCOMPLETE
    assert core.check_chunk(chunk(sha256=DIGEST_B), DIGEST_A) is core.ChunkVerdict.CORRUPT
    assert core.check_chunk(chunk(index=3), DIGEST_A) is core.ChunkVerdict.OUT_OF_RANGE


def test_progress_reports_at_most_every_second_and_always_the_last() -> None:
    assert core.progress_due(10.0, 0.0, 1, 5)
    assert not core.progress_due(10.5, 10.0, 2, 5)
    assert core.progress_due(10.5, 10.0, 5, 5)
    assert core.progress_detail(2, 5) == "chunk 2/5"
