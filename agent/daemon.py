"""The agent daemon: puts the agent's parts together and runs them until it is stopped.

One asyncio loop owns everything. Each part owns one concept (``link``: the MQTT session,
``outbox``: what must reach the controller, ``desired``: desired state and runtime settings,
``commands``: exactly-once commands, ``telemetry``: heartbeats/health/events, ``workload_host``:
the supervised workload, ``localconfig``: the configuration file, ``updater``: releases); their
loops are jobs owned by one TaskGroup (``agent.jobs``). A job that fails stops the agent, which
shuts down in order and exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from pathlib import Path

from agent import __version__, sdnotify
from agent.commands import Commands, action_table
from agent.config import AgentSettings
from agent.desired import Desired, load_desired, runtime_from
from agent.jobs import Jobs
from agent.link import Link
from agent.localconfig import LocalConfig
from agent.outbox import Outbox
from agent.probes import HealthMonitor
from agent.runas import prepare_state_dir
from agent.store import Store
from agent.telemetry import Telemetry
from agent.trust import ControllerKey
from agent.update.hooks import Hooks
from agent.update.releases import Release
from agent.updater import Updater
from agent.workload_host import WorkloadHost, popen_user, reap_orphaned_workload
from fleet.protocol.topics import Channel

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, settings: AgentSettings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.node = settings.node_id
        prepare_state_dir(settings)  # the agent's alone, but what the workload's user must read (agent.runas)
        self.store = Store(settings.state_dir / "agent.db", outbox_limit=settings.outbox_limit)
        self.counters: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self.jobs = Jobs(self.node, on_failure=self.stop)
        self.link = Link(settings, self.counters)
        self.transport = self.link.transport
        self.outbox = Outbox(self.node, self.store, self.transport)
        self.telemetry = Telemetry(
            self.node,
            settings.state_dir,
            self.store,
            self.outbox,
            self.transport,
            heartbeat_interval=lambda: self.desired.runtime.heartbeat_interval,
            health_state=lambda: self.health.state,
            counters=self.counters,
        )
        desired = load_desired(self.store, self.node)
        self.health = HealthMonitor(
            self.node,
            runtime_from(settings, desired).probe,
            on_change=self.telemetry.publish_health,
            on_result=self.telemetry.probe_ran,
            run_as=popen_user(settings),  # exec probes as the workload's user
        )
        key = ControllerKey.from_settings(settings, self.store)  # ConfigError without a key (agent.trust)
        self.desired = Desired(
            settings,
            desired,
            store=self.store,
            outbox=self.outbox,
            transport=self.transport,
            key=key,
            health=self.health,
            telemetry=self.telemetry,
            refuse=self.link.refuse,
            converge=lambda release, generation: self.updater.set_target(release, generation),  # noqa: PLW0108 - made below
            counters=self.counters,
        )
        self.updater = Updater(
            settings,
            self.store,
            self.transport,
            self.health,
            Hooks(
                report=self.desired.report,
                event=self.telemetry.event,
                run_release=self._run_release,
                workload_exits=lambda: self.workload.exits,
            ),
        )
        running = self.updater.current()
        self.workload = WorkloadHost(settings, self.store, self.health, self.jobs, self.telemetry.event, running)
        if running is not None:
            self.desired.apply_release_probe(running, self.workload.env())
        self.local_config = LocalConfig(
            config_path, settings, apply=self._use_settings, reconnect=self.transport.request_reconnect
        )
        self.commands = Commands(
            settings,
            store=self.store,
            outbox=self.outbox,
            transport=self.transport,
            key=key,
            refuse=self.link.refuse,
            actions=action_table(
                report=self._report_now,
                workload=self.workload,
                reload_config=self.local_config.reload,
                updater=self.updater,
            ),
        )
        self.link.handlers = {
            Channel.DESIRED: self.desired.intake,
            Channel.CMD: self.commands.intake,
            Channel.ARTIFACT_CHUNK: self.updater.on_chunk,
        }
        self.link.on_connect = [self.updater.on_reconnect, self.desired.report, self.outbox.wake]

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until ``stop()`` (SIGTERM, SIGINT) or a failed job; JobFailed in the latter case."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.local_config.request_reload)
        try:
            await reap_orphaned_workload(self.store, self.node)
            self.commands.recover()
            self.store.prune_commands(
                time.time() - self.settings.command_retention, self.settings.command_history_limit
            )
            async with self.jobs.owned():
                self._start_jobs()
                log.info("%s: agent %s started (state in %s)", self.node, __version__, self.settings.state_dir)
                sdnotify.notify("READY=1")
                await self._stop.wait()
                await self._shutdown()
        finally:
            self.store.close()
        self.jobs.raise_if_failed()

    def stop(self) -> None:
        self._stop.set()

    def _start_jobs(self) -> None:
        self.jobs.start("transport", self.transport.run())
        self.jobs.start("outbox", self.outbox.flush_forever())
        self.jobs.start("heartbeat", self.telemetry.heartbeat_forever())
        self.jobs.start("commands", self.commands.execute_forever())
        self.jobs.start("config-watch", self.local_config.watch_forever())
        self.jobs.start("health", self.health.run())
        self.workload.start()
        # After the workload: a health window re-run after a crash should watch a started workload.
        self.jobs.start("updates", self.updater.run())
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            self.jobs.start("watchdog", sdnotify.feed_watchdog_forever(interval))
        self.desired.converge()

    async def _shutdown(self) -> None:
        """Stop the workload gently and say offline while the link is up, then cancel every job."""
        log.info("%s: agent stopping", self.node)
        sdnotify.notify("STOPPING=1")
        await self.jobs.run_step("stopping the workload", self.workload.stop())
        await self.jobs.run_step("disconnecting", self.link.close())
        await self.jobs.cancel_all()

    # ---- what joins the parts --------------------------------------------------------------

    async def _run_release(self, release: Release | None) -> None:
        """The updater switched releases: watch the new one with its probe, run its workload."""
        self.desired.apply_release_probe(release, self.workload.env())
        await self.workload.run_release(release)

    def _report_now(self) -> None:
        self.desired.report()
        self.telemetry.publish_health(self.health.state)

    def _use_settings(self, settings: AgentSettings) -> None:
        """The configuration file was reloaded: every part that reads settings sees the new ones."""
        self.settings = settings
        self.transport.settings = settings
        self.commands.settings = settings
        self.workload.settings = settings
        self.health.run_as = popen_user(settings)
        self.desired.apply_settings(settings)
