"""Supervise the device's workload: start it, restart it with backoff when it exits, stop it cleanly.

The child runs in its own session (and so its own process group), so stopping it signals the whole
group and no grandchild outlives the workload. Exits are reported as ``WorkloadEvent`` values that
the agent turns into ``events`` messages.

Concurrency model (one asyncio event loop): ``run()`` is the only place that starts children;
``stop()`` and ``restart()`` only set a request flag, wake the loop and terminate the current child.
Starting and terminating share one lock, so a child that is being started while ``stop()`` runs is
either never started or terminated right after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from agent.backoff import Backoff, BackoffPolicy

logger = logging.getLogger(__name__)

DEFAULT_BACKOFF = BackoffPolicy()

WorkloadEventKind = Literal["started", "exited", "crash_loop", "stopped"]


@dataclass(frozen=True)
class WorkloadEvent:
    """Something notable happened to the workload; the agent publishes it on ``events``."""

    kind: WorkloadEventKind
    pid: int | None = None
    exit_code: int | None = None
    """The child's return code; negative for a signal (like ``subprocess``); None if it never started."""
    restart_in: float | None = None
    """Seconds until the next start (``exited`` only); None when the supervisor is stopping."""
    restarts: int = 0
    detail: str | None = None


@dataclass(frozen=True)
class _Exit:
    pid: int | None
    exit_code: int | None
    detail: str
    ran_for: float


def _describe_returncode(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    """Keeps one workload process running; see the module docstring for the concurrency model."""

    def __init__(
        self,
        node_id: str,
        command: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        healthy_after: float = 30.0,
        crash_loop_restarts: int = 5,
        crash_loop_window: float = 300.0,
        stop_timeout: float = 10.0,
        log_file: Path | None = None,
        on_event: Callable[[WorkloadEvent], None] = lambda event: None,
        run_as: Mapping[str, Any] | None = None,
    ) -> None:
        if not command:
            raise ValueError("workload command must not be empty")
        self.node_id = node_id
        self._command: tuple[str, ...] = tuple(command)
        self._cwd = cwd
        self._env: dict[str, str] | None = dict(env) if env is not None else None
        self._backoff = Backoff(backoff)
        self.healthy_after = healthy_after
        self.crash_loop_restarts = crash_loop_restarts
        self.crash_loop_window = crash_loop_window
        self.stop_timeout = stop_timeout
        self.log_file = log_file
        self._on_event = on_event
        self.run_as = dict(run_as) if run_as is not None else {}  # subprocess user/group/extra_groups

        self.restarts = 0
        self.last_exit_code: int | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._starts = 0
        self._recent_exits: deque[float] = deque()
        self._in_crash_loop = False
        self._loop_active = False
        self._stop_requested = False
        self._restart_requested = False
        self._lifecycle = asyncio.Lock()  # serialises starting and terminating the child
        self._wake = asyncio.Event()  # interrupts the backoff sleep
        self._progress = asyncio.Event()  # replaced after each start and at loop exit; see _wait_until

    # -- public state -------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The pid (and process group id) of the running child, None between runs."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether a child process is alive right now."""
        return self._process is not None and self._process.returncode is None

    # -- control ----------------------------------------------------------------------------------

    def set_command(
        self, command: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        """Use this command for the next (re)start; the running child is left alone."""
        if not command:
            raise ValueError("workload command must not be empty")
        self._command = tuple(command)
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        logger.info("%s: workload command set to %s", self.node_id, shlex.join(self._command))

    async def restart(self) -> None:
        """Terminate the child and start it again at once with a fresh backoff.

        Returns once the new child has been started (or failed to start), or at once if ``run()``
        is not active.
        """
        logger.info("%s: workload restart requested", self.node_id)
        self._restart_requested = True
        self._backoff.reset()
        self._wake.set()
        await self._terminate_child()
        starts_before = self._starts
        await self._wait_until(lambda: self._starts > starts_before or self._stop_requested)

    async def stop(self) -> None:
        """Terminate the child (SIGTERM, SIGKILL after ``stop_timeout``) and make ``run()`` return.

        Stopping is final: a later ``run()`` returns at once.
        """
        logger.info("%s: workload stop requested", self.node_id)
        self._stop_requested = True
        self._wake.set()
        await self._terminate_child()
        await self._wait_until(lambda: False)

    # -- the owned loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the child and keep it running until ``stop()``; cancelling kills the child group."""
        if self._loop_active:
            raise RuntimeError("Supervisor.run() is already running")
        self._loop_active = True
        self._restart_requested = False
        try:
            await self._supervise()
            self._emit(WorkloadEvent("stopped", restarts=self.restarts, exit_code=self.last_exit_code))
        except asyncio.CancelledError:
            await self._kill_on_cancel()
            raise
        finally:
            self._loop_active = False
            self._signal_progress()

    async def _supervise(self) -> None:
        while True:
            exited = await self._run_child_once()
            if exited is None:  # stop() came before the child was started
                return
            self.last_exit_code = exited.exit_code
            if self._stop_requested:
                self._report_exit(exited, restart_in=None)
                return
            delay = self._delay_after(exited)
            self._report_exit(exited, restart_in=delay)
            await self._sleep_unless_woken(delay)

    async def _run_child_once(self) -> _Exit | None:
        async with self._lifecycle:
            if self._stop_requested:
                return None
            # Consumed here, together with the wake-up, so a later request is never lost.
            self._restart_requested = False
            self._wake.clear()
            if self._starts:
                self.restarts += 1
            started_at = time.monotonic()
            failure = await self._start_child()
            self._starts += 1
            self._signal_progress()
        process = self._process
        if failure is not None or process is None:
            return _Exit(None, None, failure or "not started", 0.0)
        returncode = await process.wait()
        ran_for = time.monotonic() - started_at
        self._kill_group(process.pid, signal.SIGKILL)  # leftovers of a child that exited on its own
        return _Exit(process.pid, returncode, _describe_returncode(returncode), ran_for)

    async def _start_child(self) -> str | None:
        """Start the child; returns why it could not be started, or None."""
        command = self._command
        try:
            with self._open_log() as log:
                self._process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log if log is not None else asyncio.subprocess.DEVNULL,
                    stderr=log if log is not None else asyncio.subprocess.DEVNULL,
                    cwd=self._cwd,
                    env=self._env,
                    start_new_session=True,  # own process group: stop() signals every descendant
                    **self.run_as,  # the workload's own user (workload.user), none of root's groups
                )
        except OSError as exc:
            self._process = None
            logger.error("%s: workload %s could not be started: %s", self.node_id, shlex.join(command), exc)
            return str(exc)
        logger.info("%s: workload started with pid %s: %s", self.node_id, self._process.pid, shlex.join(command))
        self._emit(WorkloadEvent("started", pid=self._process.pid, restarts=self.restarts))
        return None

    def _open_log(self) -> AbstractContextManager[IO[bytes] | None]:
        """The log opened for appending, 0600 (the agent's: a workload of its own user writes it
        through the inherited descriptor); the parent closes its copy once the child has it."""
        if self.log_file is None:
            return nullcontext()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)  # an older agent's log
        return open(fd, "ab")  # closed by the caller's with

    def _delay_after(self, exited: _Exit) -> float:
        """Backoff before the next start; also tracks crash loops. Requested restarts do not wait."""
        if self._restart_requested:
            return 0.0
        if exited.ran_for >= self.healthy_after:
            # A child that ran long enough was healthy: its exit starts a new episode.
            self._backoff.reset()
            self._recent_exits.clear()
            self._in_crash_loop = False
        self._note_crash(time.monotonic())
        return self._backoff.next_delay()

    def _note_crash(self, now: float) -> None:
        self._recent_exits.append(now)
        while self._recent_exits and now - self._recent_exits[0] > self.crash_loop_window:
            self._recent_exits.popleft()
        looping = len(self._recent_exits) >= self.crash_loop_restarts
        if looping and not self._in_crash_loop:
            detail = f"{len(self._recent_exits)} exits within {self.crash_loop_window:g}s"
            logger.warning("%s: workload is crash looping: %s", self.node_id, detail)
            self._emit(WorkloadEvent("crash_loop", restarts=self.restarts, detail=detail))
        self._in_crash_loop = looping

    def _report_exit(self, exited: _Exit, restart_in: float | None) -> None:
        if restart_in is None:
            logger.info("%s: workload exited (%s); not restarting", self.node_id, exited.detail)
        else:
            logger.warning("%s: workload exited (%s); restarting in %.2fs", self.node_id, exited.detail, restart_in)
        self._emit(
            WorkloadEvent(
                "exited",
                pid=exited.pid,
                exit_code=exited.exit_code,
                restart_in=restart_in,
                restarts=self.restarts,
                detail=exited.detail,
            )
        )

    async def _sleep_unless_woken(self, delay: float) -> None:
        if self._stop_requested or self._restart_requested:
            return
        with suppress(TimeoutError):  # the normal case: the backoff delay elapsed
            await asyncio.wait_for(self._wake.wait(), delay)

    # -- terminating ------------------------------------------------------------------------------

    async def _terminate_child(self) -> None:
        async with self._lifecycle:
            process = self._process
            if process is None or process.returncode is not None:
                return
            logger.info("%s: terminating workload pid %s", self.node_id, process.pid)
            self._kill_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                logger.warning(
                    "%s: workload pid %s ignored SIGTERM for %gs; sending SIGKILL",
                    self.node_id,
                    process.pid,
                    self.stop_timeout,
                )
                self._kill_group(process.pid, signal.SIGKILL)
                await process.wait()
            # Descendants that survived SIGTERM while the leader exited.
            self._kill_group(process.pid, signal.SIGKILL)

    async def _kill_on_cancel(self) -> None:
        """The agent is going away: no grace period, but reap the child so it is no zombie."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        logger.warning("%s: supervisor cancelled; killing workload pid %s", self.node_id, process.pid)
        self._kill_group(process.pid, signal.SIGKILL)
        await process.wait()
        self.last_exit_code = process.returncode

    def _kill_group(self, pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass  # the whole group is gone already
        except PermissionError as exc:
            logger.error("%s: cannot signal workload group %s: %s", self.node_id, pgid, exc)

    # -- helpers ----------------------------------------------------------------------------------

    def _signal_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds or ``run()`` is no longer active."""
        while self._loop_active and not predicate():
            progress = self._progress
            await progress.wait()

    def _emit(self, event: WorkloadEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            # A faulty event consumer must not stop the supervision of the workload.
            logger.exception("%s: workload event handler failed on %s", self.node_id, event.kind)
