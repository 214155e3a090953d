"""The agent's background jobs, owned by one ``asyncio.TaskGroup``.

A job that fails is logged the moment it fails and stops the agent, which then shuts down in order
and exits non-zero. A job started after the others (the workload supervisor of a first release) is
owned the same way. Shutdown cancels what is left and waits for it; an error raised while a job
unwinds, or by a shutdown step, is logged and counts as a failure as well: none is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from fleet.protocol.errors import FleetError

log = logging.getLogger(__name__)

RECANCEL_AFTER = 1.0  # seconds


class JobFailed(FleetError):
    """A job of the agent failed (or ended while the agent ran); the agent stopped because of it."""


class Jobs:
    def __init__(self, node: str, on_failure: Callable[[], None]) -> None:
        self.node = node
        self._on_failure = on_failure
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failures: list[tuple[str, Exception]] = []

    @contextlib.asynccontextmanager
    async def owned(self) -> AsyncIterator[None]:
        """Jobs are started inside; on leaving, the ones still running are cancelled and awaited."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                yield
            finally:
                await self.cancel_all()
        self._group = None

    def start(self, name: str, job: Coroutine[Any, Any, None], *, may_finish: bool = False) -> None:
        """Run ``job`` as the task ``agent-<name>``. Unless ``may_finish``, a job that returns while
        the agent runs is a failure too: every job but the workload's runs until cancelled."""
        if self._group is None:
            job.close()
            raise RuntimeError(f"job {name} started outside Jobs.owned()")
        if self._stopping:
            job.close()  # the agent is going away: nothing new starts
            log.info("%s: %s not started: the agent is stopping", self.node, name)
            return
        self._tasks.append(self._group.create_task(self._guarded(name, job, may_finish), name=f"agent-{name}"))

    async def _guarded(self, name: str, job: Coroutine[Any, Any, None], may_finish: bool) -> None:
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged with its traceback by record_failure
            self.record_failure(name, exc)
            return
        if not may_finish and not self._stopping:
            self.record_failure(name, JobFailed(f"{name} ended while the agent was running"))

    def record_failure(self, name: str, exc: Exception) -> None:
        """Log ``exc`` now, remember it for the exit status, and stop the agent."""
        log.error("%s: %s failed: %s", self.node, name, exc, exc_info=exc)
        self.failures.append((name, exc))
        self._on_failure()

    async def run_step(self, name: str, step: Awaitable[None]) -> None:
        """One step of an orderly shutdown: a failure is recorded and the next step still runs."""
        try:
            await step
        except Exception as exc:  # noqa: BLE001 - logged with its traceback by record_failure
            self.record_failure(name, exc)

    async def cancel_all(self) -> None:
        """Cancel every job and wait until all have ended. A job still running a second after its
        cancellation is cancelled again: one can lose a cancellation (``asyncio.wait_for`` on
        Python 3.11 does when what it waits for completes at the same moment)."""
        self._stopping = True
        pending = {task for task in self._tasks if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=RECANCEL_AFTER)
            for task in pending:
                log.warning("%s: %s still running after it was cancelled; cancelling again", self.node, task.get_name())

    def raise_if_failed(self) -> None:
        if not self.failures:
            return
        name, first = self.failures[0]
        more = f" (and {len(self.failures) - 1} more failures, logged above)" if len(self.failures) > 1 else ""
        raise JobFailed(f"{name} failed: {first}{more}") from first
