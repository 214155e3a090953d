"""Owned jobs: a failing job is logged at once and stops the agent; nothing is swallowed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.jobs import JobFailed, Jobs
from tests.conftest import Pki


async def forever() -> None:
    await asyncio.Event().wait()


async def fail(after: float, message: str) -> None:
    await asyncio.sleep(after)
    raise RuntimeError(message)


def test_a_failing_job_is_logged_at_once_and_stops_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        stopped = asyncio.Event()
        jobs = Jobs("gw-a", on_failure=stopped.set)
        async with jobs.owned():
            jobs.start("steady", forever())
            jobs.start("broken", fail(0.01, "boom"))
            await asyncio.wait_for(stopped.wait(), 5)
            assert "gw-a: broken failed: boom" in caplog.text  # before any shutdown
        assert [name for name, _ in jobs.failures] == ["broken"]
        with pytest.raises(JobFailed, match="broken failed: boom"):
            jobs.raise_if_failed()

    with caplog.at_level(logging.ERROR, logger="agent.jobs"):
        asyncio.run(scenario())


def test_a_job_started_late_is_owned_too() -> None:
    async def scenario() -> None:
        stopped = asyncio.Event()
        jobs = Jobs("gw-a", on_failure=stopped.set)
        async with jobs.owned():
            jobs.start("steady", forever())
            await asyncio.sleep(0.01)
            jobs.start("late", fail(0.01, "late boom"), may_finish=True)
            await asyncio.wait_for(stopped.wait(), 5)
        assert [name for name, _ in jobs.failures] == ["late"]

    asyncio.run(scenario())


def test_a_job_that_returns_counts_as_failed_unless_it_may_finish() -> None:
    async def done() -> None:
        pass

    async def scenario() -> None:
        stopped = asyncio.Event()
        jobs = Jobs("gw-a", on_failure=stopped.set)
        async with jobs.owned():
            jobs.start("workload", done(), may_finish=True)
            jobs.start("outbox", done())
            await asyncio.wait_for(stopped.wait(), 5)
        assert [name for name, _ in jobs.failures] == ["outbox"]

    asyncio.run(scenario())


def test_errors_while_stopping_are_recorded_not_dropped() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await forever()
        finally:
            raise OSError("cleanup failed")

    async def broken_step() -> None:
        raise RuntimeError("step failed")

    async def scenario() -> None:
        jobs = Jobs("gw-a", on_failure=lambda: None)
        later: list[str] = []
        async with jobs.owned():
            jobs.start("transport", fails_when_cancelled())
            await asyncio.sleep(0.01)
            await jobs.run_step("stopping the workload", broken_step())
            later.append("next step ran")
            await jobs.cancel_all()
            jobs.start("too-late", forever())  # refused quietly: the agent is stopping
        assert later == ["next step ran"]
        assert [(name, str(exc)) for name, exc in jobs.failures] == [
            ("stopping the workload", "step failed"),
            ("transport", "cleanup failed"),
        ]
        with pytest.raises(JobFailed, match=r"stopping the workload failed: step failed \(and 1 more"):
            jobs.raise_if_failed()

    asyncio.run(scenario())


def test_the_agent_stops_with_an_error_when_a_job_fails(tmp_path: Path, pki: Pki) -> None:
    settings = AgentSettings.model_validate(
        {
            "node_id": "gw-a",
            "server_addr": "127.0.0.1:1",  # nothing listens: the transport keeps retrying
            "tls": {
                "ca": str(pki.paths.ca_cert),
                "cert": str(pki.paths.device("gw-a").cert),
                "key": str(pki.paths.device("gw-a").key),
            },
            "state_dir": str(tmp_path / "state"),
        }
    )
    agent = Agent(settings)

    async def broken_heartbeats() -> None:
        raise RuntimeError("no heartbeat today")

    agent.telemetry.heartbeat_forever = broken_heartbeats  # type: ignore[method-assign]
    with pytest.raises(JobFailed, match="heartbeat failed: no heartbeat today"):
        asyncio.run(asyncio.wait_for(agent.run(), 30))
