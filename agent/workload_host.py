"""The workload as the agent hosts it: which command runs, with which environment, under which
``Supervisor``; and the workload a killed agent left behind.

The command is the running release's entry point, else the configured one. The supervisor's job
is owned by the agent's ``Jobs`` even when it starts late (the first release of a node that had no
configured workload). The pid of each started workload is stored, so the next agent stops an
orphan before it starts its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.backoff import BackoffPolicy
from agent.config import AgentSettings
from agent.desired import config_json_path
from agent.jobs import Jobs
from agent.probes import HealthMonitor
from agent.runas import run_as
from agent.store import Store
from agent.update.releases import Release
from agent.workload import Supervisor, WorkloadEvent

log = logging.getLogger(__name__)

WORKLOAD_KEY = "workload_process"  # [pid, create_time] of the running workload, for orphan reaping
ORPHAN_STOP_TIMEOUT = 10.0


def workload_spec(settings: AgentSettings, release: Release | None) -> tuple[list[str], Path | None] | None:
    """The command to supervise and its directory: the release's entry point, else the configured
    workload; None when there is neither."""
    if release is not None and release.entry:
        program = release.directory / release.entry[0]
        entry = [str(program) if not Path(release.entry[0]).is_absolute() and program.exists() else release.entry[0]]
        return entry + release.entry[1:], release.directory
    workload = settings.workload
    return None if workload is None else (list(workload.command), workload.cwd)


def workload_env(settings: AgentSettings) -> dict[str, str]:
    workload = settings.workload
    extra = dict(workload.env) if workload is not None else {}
    user = run_as(settings)
    identity = user.env() if user is not None else {}
    return {**os.environ, **identity, **extra, "FLEET_CONFIG": str(config_json_path(settings.state_dir))}


def popen_user(settings: AgentSettings) -> dict[str, Any]:
    """``subprocess`` keywords that start a process as the workload's user ({}: the agent's own)."""
    user = run_as(settings)
    return user.popen_kwargs() if user is not None else {}


async def reap_orphaned_workload(store: Store, node: str) -> None:
    """A kill -9 of the agent leaves its workload running; stop it before starting a new one."""
    stored = store.get(WORKLOAD_KEY)
    if stored is None:
        return
    pid, created = json.loads(stored)
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - created) > 0.01:
            return  # the pid was reused by an unrelated process
        log.warning("%s: stopping workload pid %d left over from a previous agent", node, pid)
        os.killpg(pid, signal.SIGTERM)
        if not await _wait_gone(process, ORPHAN_STOP_TIMEOUT):
            os.killpg(pid, signal.SIGKILL)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
    store.delete(WORKLOAD_KEY)


async def _wait_gone(process: psutil.Process, timeout: float) -> bool:
    """True once the process exited; a zombie counts as gone (it is not our child to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.02)
    return False


class WorkloadHost:
    """Owns the ``Supervisor`` of the workload (None while there is nothing to run)."""

    def __init__(
        self,
        settings: AgentSettings,
        store: Store,
        health: HealthMonitor,
        jobs: Jobs,
        event: Callable[[str, str | None, dict[str, Any]], None],
        release: Release | None,
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.health = health
        self.jobs = jobs
        self._event = event
        self.exits = 0  # monotonically growing: the update health gate counts exits in its window
        self.supervisor = self._new_supervisor(release)

    @property
    def configured(self) -> bool:
        return self.supervisor is not None

    def env(self) -> dict[str, str]:
        return workload_env(self.settings)

    def start(self) -> None:
        if self.supervisor is not None:
            self.jobs.start("workload", self.supervisor.run(), may_finish=True)

    async def run_release(self, release: Release | None) -> None:
        """Switch the supervised workload to ``release`` (None: the configured one); returns once
        the new process is started."""
        spec = workload_spec(self.settings, release)
        if spec is None:
            await self.stop()
            self.supervisor = None
            return
        if self.supervisor is None:
            self.supervisor = self._new_supervisor(release)
            self.start()
            return
        command, cwd = spec
        self.supervisor.set_command(command, cwd=cwd, env=self.env())
        self.supervisor.run_as = popen_user(self.settings)
        await self.supervisor.restart()

    async def restart(self) -> int | None:
        """Restart the workload; its new pid (None when nothing is configured or it did not start)."""
        if self.supervisor is None:
            return None
        await self.supervisor.restart()
        self.health.reset()
        return self.supervisor.pid

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()

    def _new_supervisor(self, release: Release | None) -> Supervisor | None:
        spec = workload_spec(self.settings, release)
        if spec is None:
            return None
        command, cwd = spec
        workload = self.settings.workload
        return Supervisor(
            self.node,
            command,
            cwd=cwd,
            env=self.env(),
            backoff=workload.restart_backoff.policy() if workload is not None else BackoffPolicy(1.0, 300.0, 0.5),
            healthy_after=workload.healthy_after if workload is not None else 30.0,
            log_file=self.settings.state_dir / "workload.log",
            on_event=self._on_event,
            run_as=popen_user(self.settings),
        )

    def _on_event(self, event: WorkloadEvent) -> None:
        data = {
            "pid": event.pid,
            "exit_code": event.exit_code,
            "restart_in": event.restart_in,
            "restarts": event.restarts,
        }
        self._event(f"workload_{event.kind}", event.detail, {k: v for k, v in data.items() if v is not None})
        if event.kind == "exited":
            self.exits += 1
        if event.kind == "started":
            self.health.reset()
            if event.pid is not None:
                self._remember(event.pid)

    def _remember(self, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return
        self.store.put(WORKLOAD_KEY, json.dumps([pid, created]).encode())
