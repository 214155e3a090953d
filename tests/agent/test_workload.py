"""The workload supervisor against real child processes (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.backoff import BackoffPolicy
from agent.workload import Supervisor, WorkloadEvent

pytestmark = pytest.mark.timeout(60)

TINY_BACKOFF = BackoffPolicy(initial=0.05, maximum=0.4, jitter=0)
CRASH = [sys.executable, "-c", "import sys; sys.exit(3)"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
DEADLINE = 10.0


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


class Recorder:
    """Collects workload events; lets a test wait (with a deadline) for a condition on them."""

    def __init__(self) -> None:
        self.events: list[WorkloadEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: WorkloadEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: str) -> list[WorkloadEvent]:
        return [event for event in self.events if event.kind == kind]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def supervising(supervisor: Supervisor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(supervisor.run(), name="test-supervisor")
    try:
        yield task
    finally:
        async with asyncio.timeout(DEADLINE):
            await supervisor.stop()
            await task


def live_group_members(pgid: int) -> list[int]:
    """Processes of the group that still run (zombies are dead; reaping orphans is init's job)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


async def poll_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Poll state outside the event loop (processes, files), which offers nothing to await."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


def test_crashing_child_is_restarted_with_growing_capped_delays() -> None:
    async def scenario() -> None:
        events = Recorder()
        supervisor = Supervisor(
            "gw-test", CRASH, backoff=TINY_BACKOFF, crash_loop_restarts=4, crash_loop_window=60, on_event=events
        )
        async with supervising(supervisor):
            await events.wait_for(lambda: len(events.of("exited")) >= 7)
        exits = events.of("exited")[:7]
        assert {event.exit_code for event in exits} == {3}
        assert [event.restart_in for event in exits] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.4, 0.4, 0.4])
        assert [event.restarts for event in exits] == list(range(7))
        assert len(events.of("crash_loop")) == 1  # once per episode, although it keeps crashing
        assert events.of("crash_loop")[0].restarts == 3  # the fourth exit within the window
        assert supervisor.last_exit_code == 3
        assert events.events[-1].kind == "stopped"

    run(scenario)


def test_stop_kills_the_whole_process_group() -> None:
    async def scenario() -> None:
        events = Recorder()
        supervisor = Supervisor("gw-test", ["sh", "-c", "sleep 60 & sleep 60"], stop_timeout=5, on_event=events)
        task = asyncio.create_task(supervisor.run(), name="test-supervisor")
        await events.wait_for(lambda: bool(events.of("started")))
        pgid = supervisor.pid
        assert pgid is not None and os.getpgid(pgid) == pgid  # its own group
        await poll_until(lambda: len(live_group_members(pgid)) >= 3)  # sh and both sleeps

        started = time.monotonic()
        async with asyncio.timeout(DEADLINE):
            await supervisor.stop()
            await task
        assert time.monotonic() - started < 2  # SIGTERM sufficed, no wait for stop_timeout
        await poll_until(lambda: not live_group_members(pgid))

        assert not supervisor.running and supervisor.pid is None
        exited = events.of("exited")[-1]
        assert exited.restart_in is None and exited.exit_code == -signal.SIGTERM
        assert events.events[-1].kind == "stopped"

    run(scenario)


def test_cancelling_run_kills_the_group_and_reaps_the_child() -> None:
    async def scenario() -> None:
        events = Recorder()
        supervisor = Supervisor("gw-test", ["sh", "-c", "sleep 60 & sleep 60"], on_event=events)
        task = asyncio.create_task(supervisor.run(), name="test-supervisor")
        await events.wait_for(lambda: bool(events.of("started")))
        pgid = supervisor.pid
        assert pgid is not None
        await poll_until(lambda: len(live_group_members(pgid)) >= 3)

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert supervisor.last_exit_code == -signal.SIGKILL  # reaped, so no zombie is left
        await poll_until(lambda: not live_group_members(pgid))

    run(scenario)


def test_restart_starts_a_new_child_at_once() -> None:
    async def scenario() -> None:
        events = Recorder()
        supervisor = Supervisor("gw-test", SLEEPER, backoff=BackoffPolicy(initial=30, maximum=30), on_event=events)
        async with supervising(supervisor):
            await events.wait_for(lambda: bool(events.of("started")))
            first = supervisor.pid
            async with asyncio.timeout(DEADLINE):
                await supervisor.restart()
            second = supervisor.pid
            assert first is not None and second is not None and second != first
            assert supervisor.running and supervisor.restarts == 1
            assert not live_group_members(first)
            exited = events.of("exited")
            assert len(exited) == 1 and exited[0].pid == first and exited[0].restart_in == 0.0
            assert [event.pid for event in events.of("started")] == [first, second]

    run(scenario)


def test_restart_cuts_a_backoff_wait_short() -> None:
    async def scenario() -> None:
        events = Recorder()
        supervisor = Supervisor("gw-test", CRASH, backoff=BackoffPolicy(initial=30, maximum=30), on_event=events)
        async with supervising(supervisor):
            await events.wait_for(lambda: bool(events.of("exited")))
            assert events.of("exited")[0].restart_in == 30
            started = time.monotonic()
            async with asyncio.timeout(DEADLINE):
                await supervisor.restart()
            assert time.monotonic() - started < 2
            assert len(events.of("started")) == 2

    run(scenario)


def test_missing_binary_is_retried_with_backoff_and_reported(tmp_path: Path) -> None:
    async def scenario() -> None:
        events = Recorder()
        missing = tmp_path / "no-such-binary"
        supervisor = Supervisor("gw-test", [str(missing)], backoff=TINY_BACKOFF, on_event=events)
        async with supervising(supervisor):
            await events.wait_for(lambda: len(events.of("exited")) >= 3)
            assert supervisor.pid is None
        exits = events.of("exited")[:3]
        assert all(event.exit_code is None and event.pid is None for event in exits)
        assert all(event.detail is not None and "No such file" in event.detail for event in exits)
        assert [event.restart_in for event in exits] == pytest.approx([0.05, 0.1, 0.2])
        assert not events.of("started")

    run(scenario)


def test_child_ignoring_sigterm_gets_sigkill_after_stop_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        events = Recorder()
        log = tmp_path / "logs" / "workload.log"
        stubborn = (
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)"
        )
        supervisor = Supervisor(
            "gw-test", [sys.executable, "-c", stubborn], stop_timeout=0.3, log_file=log, on_event=events
        )
        task = asyncio.create_task(supervisor.run(), name="test-supervisor")
        # The log file doubles as the signal that the handler is installed.
        await poll_until(lambda: log.exists() and "ready" in log.read_text())

        started = time.monotonic()
        async with asyncio.timeout(DEADLINE):
            await supervisor.stop()
            await task
        took = time.monotonic() - started
        assert 0.3 <= took < 3
        assert events.of("exited")[-1].exit_code == -signal.SIGKILL

    run(scenario)


def test_backoff_resets_after_a_healthy_run() -> None:
    async def scenario() -> None:
        events = Recorder()
        runs_a_while = [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(1)"]
        supervisor = Supervisor("gw-test", runs_a_while, backoff=TINY_BACKOFF, healthy_after=0.2, on_event=events)
        async with supervising(supervisor):
            await events.wait_for(lambda: len(events.of("exited")) >= 3)
        assert [event.restart_in for event in events.of("exited")[:3]] == pytest.approx([0.05, 0.05, 0.05])

    run(scenario)


def test_set_command_takes_effect_at_the_next_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        events = Recorder()
        log = tmp_path / "workload.log"
        announce = "import sys, time; print(sys.argv[1], flush=True); time.sleep(60)"
        supervisor = Supervisor("gw-test", [sys.executable, "-c", announce, "v1"], log_file=log, on_event=events)
        async with supervising(supervisor):
            await poll_until(lambda: log.exists() and "v1" in log.read_text())
            supervisor.set_command([sys.executable, "-c", announce, "v2"], cwd=tmp_path, env={"LANG": "C"})
            assert "v2" not in log.read_text()  # the running child is left alone
            async with asyncio.timeout(DEADLINE):
                await supervisor.restart()
            await poll_until(lambda: "v2" in log.read_text())
        assert log.read_text().split() == ["v1", "v2"]  # appended, not truncated

    run(scenario)


def test_a_failing_event_handler_does_not_stop_supervision() -> None:
    async def scenario() -> None:
        seen = Recorder()

        def faulty(event: WorkloadEvent) -> None:
            seen(event)
            raise RuntimeError("consumer bug")

        supervisor = Supervisor("gw-test", CRASH, backoff=TINY_BACKOFF, on_event=faulty)
        async with supervising(supervisor):
            await seen.wait_for(lambda: len(seen.of("exited")) >= 2)

    run(scenario)
