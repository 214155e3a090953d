"""The agent daemon: desired state, exactly-once commands, outbox, heartbeats, workload and health.

One asyncio loop owns everything; each background job is a named task started in ``run`` and
cancelled when it ends. Anything the controller must learn goes through the durable outbox in
``Store`` first and is flushed in order whenever the link is up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import string
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agent import __version__, failpoints, sdnotify
from agent.backoff import BackoffPolicy
from agent.config import AgentSettings, load_settings, parse_duration
from agent.files import write_atomically
from agent.probes import HealthMonitor, HealthState
from agent.store import CommandStatus, OutboxKind, Store
from agent.transport import Inbound, Transport, Will
from agent.updater import Hooks, Release, UpdateFailed, Updater
from agent.workload import Supervisor, WorkloadEvent
from fleet.protocol.codec import decode_raw, encode, encode_document, validate
from fleet.protocol.errors import ConfigError, FleetError, InvalidMessage, Rejected, TransportError
from fleet.protocol.messages import (
    Ack,
    AckStatus,
    Command,
    DesiredState,
    Event,
    Health,
    Heartbeat,
    Message,
    ProbeSpec,
    Reported,
    Status,
    UpdateState,
)
from fleet.protocol.topics import Channel, channel_qos, channel_retained, node_topic, parse_node_topic

log = logging.getLogger(__name__)

OUTBOX_WINDOW = 20
DESIRED_KEY = "desired"
# Arguments each action accepts; a rollout's rollback names what it undoes (for the record only).
ACTION_ARGS: dict[str, frozenset[str]] = {"rollback": frozenset({"release", "from", "to", "reason", "rollout"})}
WORKLOAD_KEY = "workload_process"  # [pid, create_time] of the running workload, for orphan reaping


class CommandFailed(FleetError):
    """A command ran and did not achieve its effect; the detail goes into the `failed` ack."""


@dataclass
class Runtime:
    """Settings the agent applies without restarting: local file overlaid by desired-state config."""

    heartbeat_interval: float
    labels: dict[str, str]
    probe: ProbeSpec | None
    config: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        text = json.dumps([self.heartbeat_interval, self.labels, self.config], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def runtime_from(settings: AgentSettings, desired: DesiredState | None) -> Runtime:
    workload_probe = settings.workload.health.spec() if settings.workload and settings.workload.health else None
    runtime = Runtime(settings.heartbeat_interval, dict(settings.labels), workload_probe)
    if desired is None:
        return runtime
    config = dict(desired.config)
    if "heartbeat_interval" in config:
        runtime.heartbeat_interval = max(1.0, parse_duration(config["heartbeat_interval"]))
    if isinstance(config.get("labels"), dict):
        runtime.labels |= {str(k): str(v) for k, v in config["labels"].items()}
    if desired.health is not None:
        runtime.probe = desired.health
    runtime.config = config
    return runtime


def _wait_gone(process: psutil.Process, timeout: float) -> bool:
    """True once the process exited; a zombie counts as gone (it is not our child to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


class Agent:
    def __init__(self, settings: AgentSettings, config_path: Path | None = None) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.config_path = config_path
        self.store = Store(settings.state_dir / "agent.db", outbox_limit=settings.outbox_limit)
        self.counters: Counter[str] = Counter()
        self.desired = self._load_desired()
        self.runtime = runtime_from(settings, self.desired)
        self.transport = Transport(
            settings,
            will=Will(self._topic(Channel.STATUS), encode(Status(state="offline", agent_version=__version__))),
            on_message=self._on_inbound,
            on_connected=self._on_connected,
        )
        self.health = HealthMonitor(
            self.node, self.runtime.probe, on_change=self._health_changed, on_result=self._health_probed
        )
        self.updater = Updater(
            settings,
            self.store,
            self.transport,
            self.health,
            Hooks(
                report=self._publish_reported,
                event=self._event,
                run_release=self._run_release,
                workload_exits=lambda: self._workload_exits,
            ),
        )
        self._workload_exits = 0
        self._last_state = UpdateState.IDLE
        self._tasks: list[asyncio.Task[None]] = []
        running = self.updater.current()
        self.supervisor = self._new_supervisor(running)
        if running is not None:
            self._apply_release_probe(running)
        self._controller_key = self._load_controller_key(settings)
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._outbox_wake = asyncio.Event()
        self._heartbeat_wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._started = time.monotonic()
        self._heartbeat_seq = 0
        self._config_mtime = self._config_file_mtime()

    # ---- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        self._reap_orphaned_workload()
        self._recover_commands()
        self.store.prune_commands(time.time() - self.settings.command_retention, self.settings.command_history_limit)
        jobs: dict[str, Coroutine[Any, Any, None]] = {
            "transport": self.transport.run(),
            "outbox": self._flush_outbox_forever(),
            "heartbeat": self._heartbeat_forever(),
            "commands": self._execute_commands_forever(),
            "config-watch": self._watch_config_forever(),
            "health": self.health.run(),
        }
        if self.supervisor is not None:
            jobs["workload"] = self.supervisor.run()
        # After the workload: a health window re-run after a crash should watch a started workload.
        jobs["updates"] = self.updater.run()
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            jobs["watchdog"] = sdnotify.feed_watchdog_forever(interval)
        if self.desired is not None:
            self.updater.set_target(self.desired.release, self.desired.generation)
        self._tasks = [asyncio.create_task(job, name=f"agent-{name}") for name, job in jobs.items()]
        log.info("%s: agent %s started (state in %s)", self.node, __version__, self.settings.state_dir)
        sdnotify.notify("READY=1")
        try:
            await self._until_stopped_or_failed(self._tasks)
        finally:
            await self._shutdown(self._tasks)

    def stop(self) -> None:
        self._stop.set()

    async def _until_stopped_or_failed(self, tasks: list[asyncio.Task[None]]) -> None:
        stopper = asyncio.create_task(self._stop.wait(), name="agent-stop-wait")
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        log.info("%s: agent stopping", self.node)
        sdnotify.notify("STOPPING=1")
        if self.supervisor is not None:
            await self.supervisor.stop()
        offline = encode(Status(state="offline", ts=time.time(), agent_version=__version__))
        await self.transport.close(final=(self._topic(Channel.STATUS), offline))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()

    def _reap_orphaned_workload(self) -> None:
        """A kill -9 of the agent leaves its workload running; stop it before starting a new one."""
        stored = self.store.get(WORKLOAD_KEY)
        if stored is None:
            return
        pid, created = json.loads(stored)
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) > 0.01:
                return  # the pid was reused by an unrelated process
            log.warning("%s: stopping workload pid %d left over from a previous agent", self.node, pid)
            os.killpg(pid, signal.SIGTERM)
            if not _wait_gone(process, timeout=10):
                os.killpg(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
        self.store.delete(WORKLOAD_KEY)

    def _remember_workload(self, pid: int) -> None:
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return
        self.store.put(WORKLOAD_KEY, json.dumps([pid, created]).encode())

    def _workload_spec(self, release: Release | None) -> tuple[list[str], Path | None] | None:
        """The command to supervise: the installed release's entry point, else the configured one."""
        if release is not None and release.entry:
            program = release.directory / release.entry[0]
            entry = [
                str(program) if not Path(release.entry[0]).is_absolute() and program.exists() else release.entry[0]
            ]
            return entry + release.entry[1:], release.directory
        workload = self.settings.workload
        return None if workload is None else (list(workload.command), workload.cwd)

    def _workload_env(self) -> dict[str, str]:
        workload = self.settings.workload
        extra = dict(workload.env) if workload is not None else {}
        return {**os.environ, **extra, "FLEET_CONFIG": str(self._config_json_path())}

    def _new_supervisor(self, release: Release | None) -> Supervisor | None:
        spec = self._workload_spec(release)
        if spec is None:
            return None
        command, cwd = spec
        workload = self.settings.workload
        return Supervisor(
            self.node,
            command,
            cwd=cwd,
            env=self._workload_env(),
            backoff=workload.restart_backoff.policy() if workload is not None else BackoffPolicy(1.0, 300.0, 0.5),
            healthy_after=workload.healthy_after if workload is not None else 30.0,
            log_file=self.settings.state_dir / "workload.log",
            on_event=self._workload_event,
        )

    async def _run_release(self, release: Release | None) -> None:
        """Switch the supervised workload to ``release`` (None: the configured one); returns once
        the new process is started."""
        spec = self._workload_spec(release)
        self._apply_release_probe(release)
        if spec is None:
            if self.supervisor is not None:
                await self.supervisor.stop()
                self.supervisor = None
            return
        if self.supervisor is None:
            self.supervisor = self._new_supervisor(release)
            assert self.supervisor is not None
            self._tasks.append(asyncio.create_task(self.supervisor.run(), name="agent-workload"))
            return
        command, cwd = spec
        self.supervisor.set_command(command, cwd=cwd, env=self._workload_env())
        await self.supervisor.restart()

    def _apply_release_probe(self, release: Release | None) -> None:
        """Probe precedence: desired state's health spec, then the release's, then the local file's."""
        desired_probe = self.desired.health if self.desired is not None else None
        probe = desired_probe or (release.health if release is not None else None) or self.runtime.probe
        if probe is not None and "$" in probe.target:
            # One release serves many devices: ${APP_PORT} etc. come from this device's workload env.
            target = string.Template(probe.target).safe_substitute(self._workload_env())
            probe = probe.model_copy(update={"target": target})
        self.runtime.probe = probe
        self.health.set_spec(probe)
        self.health.reset()

    # ---- connection ------------------------------------------------------------------------

    def _topic(self, channel: Channel) -> str:
        return node_topic(self.node, channel)

    async def _on_connected(self) -> None:
        online = Status(state="online", ts=time.time(), agent_version=__version__)
        self.transport.publish(self._topic(Channel.STATUS), encode(online), qos=1, retain=True)
        # Subscribing again on every connect makes the broker resend the retained desired state:
        # nothing depends on having seen the messages published while we were away.
        # Chunks at QoS 0: they are asked for on demand and asked again when lost, so the broker must
        # not queue or redeliver them (with QoS 1 a link dropping every few chunks built a backlog
        # of redeliveries that the next drop cut again, forever).
        self.transport.subscribe(
            [(self._topic(Channel.DESIRED), 1), (self._topic(Channel.CMD), 1), (self._topic(Channel.ARTIFACT_CHUNK), 0)]
        )
        self.updater.on_reconnect()
        self._publish_reported()
        self._outbox_wake.set()

    def _on_inbound(self, inbound: Inbound) -> None:
        try:
            node, channel = parse_node_topic(inbound.topic)
        except InvalidMessage as exc:
            self._refuse_message(inbound, str(exc))
            return
        if node != self.node:
            self._refuse_message(inbound, f"message for {node} delivered to {self.node}")
            return
        if channel is Channel.DESIRED:
            self._handle_desired(inbound)
        elif channel is Channel.CMD:
            self._handle_command(inbound)
        elif channel is Channel.ARTIFACT_CHUNK:
            self.updater.on_chunk(inbound)
            self.transport.ack(inbound)
        else:
            self._refuse_message(inbound, f"{channel} is not handled by this agent version")

    def _refuse_message(self, inbound: Inbound, reason: str) -> None:
        self.counters["invalid_messages"] += 1
        log.warning("%s: ignored message on %s: %s", self.node, inbound.topic, reason)
        self.transport.ack(inbound)

    # ---- desired state ---------------------------------------------------------------------

    def _load_desired(self) -> DesiredState | None:
        stored = self.store.get(DESIRED_KEY)
        if stored is None:
            return None
        try:
            return validate(DESIRED_KEY, decode_raw(DESIRED_KEY, stored), DesiredState)
        except InvalidMessage as exc:
            log.error("%s: stored desired state unreadable, starting without it: %s", self.node, exc)
            return None

    def _handle_desired(self, inbound: Inbound) -> None:
        if not inbound.payload:
            self.transport.ack(inbound)  # a cleared retained topic: nothing to converge to
            return
        try:
            raw = decode_raw(inbound.topic, inbound.payload)
            if self._controller_key is not None:
                self._verify(raw)
            desired = validate(inbound.topic, raw, DesiredState)
        except InvalidMessage as exc:
            self._refuse_message(inbound, str(exc))
            self._event("desired_rejected", str(exc))
            return
        applied = self.desired.generation if self.desired is not None else -1
        if desired.generation <= applied:
            if desired.generation < applied:
                self.counters["stale_desired"] += 1
                log.warning("%s: ignored desired generation %d (applied %d)", self.node, desired.generation, applied)
            self.transport.ack(inbound)
            return
        self.store.put(DESIRED_KEY, encode_document(raw))
        self.transport.ack(inbound)
        self.desired = desired
        log.info("%s: applying desired generation %d", self.node, desired.generation)
        self._apply_runtime(runtime_from(self.settings, desired))
        self._publish_reported()
        self.updater.set_target(desired.release, desired.generation)

    def _apply_runtime(self, runtime: Runtime) -> None:
        old = self.runtime
        self.runtime = runtime
        if runtime.heartbeat_interval != old.heartbeat_interval:
            self._heartbeat_wake.set()
        if runtime.probe != old.probe:
            self.health.set_spec(runtime.probe)
        if runtime.config != old.config or not self._config_json_path().exists():
            write_atomically(self._config_json_path(), json.dumps(runtime.config, sort_keys=True).encode())

    def _config_json_path(self) -> Path:
        return self.settings.state_dir / "config.json"

    def _publish_reported(
        self, state: UpdateState | None = None, detail: str | None = None, progress: float | None = None
    ) -> None:
        if state is None:
            state = self._last_state
        self._last_state = state
        reported = Reported(
            generation=self.desired.generation if self.desired is not None else 0,
            version=self._stored_text("version"),
            previous_version=self._stored_text("previous_version"),
            state=state,
            config_digest=self.runtime.digest(),
            detail=detail,
            progress=progress,
            labels=self.runtime.labels,
            ts=time.time(),
        )
        self._enqueue(Channel.REPORTED, reported, OutboxKind.STATE)

    def _stored_text(self, key: str) -> str | None:
        value = self.store.get(key)
        return None if value is None else value.decode()

    # ---- commands --------------------------------------------------------------------------

    def _handle_command(self, inbound: Inbound) -> None:
        try:
            raw = decode_raw(inbound.topic, inbound.payload)
        except InvalidMessage as exc:
            self._refuse_message(inbound, str(exc))
            return
        command_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        try:
            if self._controller_key is not None and (self.settings.require_signed_commands or "signature" in raw):
                self._verify(raw)
            command = validate(inbound.topic, raw, Command)
        except InvalidMessage as exc:
            self._refuse_message(inbound, str(exc))
            if command_id and len(command_id) <= 128 and not command_id.isspace():
                self._refuse_command(command_id, str(raw.get("action", "?")), AckStatus.REJECTED, exc.reason)
            return
        existing = self.store.record_command(command.id, command.action, inbound.payload, command.expires_at)
        if existing is not None:
            self._ack(command.id, AckStatus.DUPLICATE, f"already seen: {existing.status}")
            self.transport.ack(inbound)
            return
        problem = self._refusal(command)
        if problem is not None:
            status, reason = problem
            self.store.set_command_status(command.id, CommandStatus(status.value), reason)
            self._ack(command.id, status, reason)
            self.transport.ack(inbound)
            return
        failpoints.hit("command.received")  # durable, not yet acknowledged to the broker
        self.transport.ack(inbound)
        self._ack(command.id, AckStatus.ACCEPTED, None)
        self._commands.put_nowait(command)

    def _refuse_command(self, command_id: str, action: str, status: AckStatus, reason: str) -> None:
        self.store.record_refused(command_id, action[:64], CommandStatus(status.value), reason)
        self._ack(command_id, status, reason)

    def _refusal(self, command: Command) -> tuple[AckStatus, str] | None:
        if command.expires_at is not None and command.expires_at < time.time():
            return AckStatus.EXPIRED, f"expired at {command.expires_at:.0f}"
        if command.action not in self._actions():
            return AckStatus.REJECTED, f"unknown action {command.action!r}; known: {', '.join(sorted(self._actions()))}"
        unexpected = set(command.args) - ACTION_ARGS.get(command.action, frozenset())
        if unexpected:
            return AckStatus.REJECTED, f"{command.action} does not take {', '.join(sorted(unexpected))}"
        return None

    def _actions(self) -> dict[str, Callable[[Command], Awaitable[str | None]]]:
        return {
            "ping": self._do_ping,
            "report": self._do_report,
            "restart": self._do_restart,
            "reload": self._do_reload,
            "rollback": self._do_rollback,
        }

    def _recover_commands(self) -> None:
        """After a crash: run what was stored but never started; never repeat what had started."""
        for record in self.store.commands_in(CommandStatus.EXECUTING):
            detail = "interrupted: the agent stopped while executing it; not repeated"
            self.store.set_command_status(record.id, CommandStatus.FAILED, detail)
            self._ack(record.id, AckStatus.FAILED, detail)
        for record in self.store.commands_in(CommandStatus.RECEIVED):
            if record.payload is None:
                continue
            try:
                command = validate("stored", decode_raw("stored", record.payload), Command)
            except InvalidMessage as exc:
                self.store.set_command_status(record.id, CommandStatus.FAILED, str(exc))
                continue
            self._commands.put_nowait(command)

    async def _execute_commands_forever(self) -> None:
        while True:
            command = await self._commands.get()
            await self._execute(command)

    async def _execute(self, command: Command) -> None:
        self.store.set_command_status(command.id, CommandStatus.EXECUTING)
        failpoints.hit("command.executing")
        log.info("%s: executing command %s (%s)", self.node, command.id, command.action)
        try:
            detail = await self._actions()[command.action](command)
        except (Rejected, CommandFailed, ConfigError, UpdateFailed) as exc:
            self.store.set_command_status(command.id, CommandStatus.FAILED, str(exc))
            self._ack(command.id, AckStatus.FAILED, str(exc))
            return
        self.store.set_command_status(command.id, CommandStatus.DONE, detail)
        self._ack(command.id, AckStatus.DONE, detail)

    async def _do_ping(self, _command: Command) -> str:
        return "pong"

    async def _do_report(self, _command: Command) -> str:
        self._publish_reported()
        self._publish_health(self.health.state)
        return "reported"

    async def _do_restart(self, _command: Command) -> str:
        if self.supervisor is None:
            raise CommandFailed("no workload configured")
        await self.supervisor.restart()
        self.health.reset()
        return f"workload restarted (pid {self.supervisor.pid})"

    async def _do_reload(self, _command: Command) -> str:
        return self._reload_local_config()

    async def _do_rollback(self, command: Command) -> str:
        """Back to the previous release. A rollout names what it undoes (``from``) and where to
        (``to``): a node that is not on ``from`` (never updated, or already rolled back by itself)
        is left alone, so a rollback never pushes a node below its baseline."""
        current = self.updater.current()
        running = current.version if current is not None else None
        undo, back_to = command.args.get("from"), command.args.get("to")
        if undo is not None and running != undo:
            return f"not running {undo} (running {running or 'the configured workload'}): nothing to roll back"
        if back_to is not None and running == back_to:
            return f"already on {back_to}"
        previous = self.updater.previous()
        if back_to is not None and (previous is None or previous.version != back_to):
            raise CommandFailed(f"release {back_to} is not installed")
        result = await self.updater.rollback("rollback command")
        if current is not None:
            self.updater.mark_left_behind(current.digest)
        return result

    def _ack(self, command_id: str, status: AckStatus, detail: str | None) -> None:
        self._enqueue(Channel.ACK, Ack(id=command_id, status=status, detail=detail, ts=time.time()), OutboxKind.ACK)

    def _verify(self, raw: dict[str, Any]) -> None:
        from fleet.protocol.signing import verify_document

        assert self._controller_key is not None
        verify_document(raw, self._controller_key)

    @staticmethod
    def _load_controller_key(settings: AgentSettings) -> Any:
        if settings.controller_public_key is None:
            return None
        from fleet.protocol.signing import load_public_key

        try:
            return load_public_key(settings.controller_public_key.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{settings.controller_public_key}: cannot read: {exc.strerror}") from exc

    # ---- outbox ----------------------------------------------------------------------------

    def _enqueue(self, channel: Channel, message: Message, kind: OutboxKind) -> None:
        self.store.enqueue(
            self._topic(channel), encode(message), qos=channel_qos(channel), retain=channel_retained(channel), kind=kind
        )
        self._outbox_wake.set()

    async def _flush_outbox_forever(self) -> None:
        while True:
            await self.transport.wait_connected()
            batch = self.store.pending(OUTBOX_WINDOW)
            if not batch:
                self._outbox_wake.clear()
                await self._outbox_wake.wait()
                continue
            try:
                await self._send_batch(batch)
            except TransportError as exc:
                log.info("%s: outbox flush paused (%s); %d waiting", self.node, exc, self.store.outbox_size())
                await asyncio.sleep(0.1)  # wait_connected() blocks until the transport is back

    async def _send_batch(self, batch: list[Any]) -> None:
        futures = [self.transport.publish(item.topic, item.payload, qos=item.qos, retain=item.retain) for item in batch]
        for item, future in zip(batch, futures, strict=True):
            await future
            self.store.delivered(item.seq)

    # ---- heartbeats and health -------------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter: the first real reading covers one interval
        while True:
            self._heartbeat_wake.clear()
            try:
                await asyncio.wait_for(self._heartbeat_wake.wait(), self.runtime.heartbeat_interval)
                continue  # the interval changed: start a fresh one
            except TimeoutError:
                pass
            self._send_heartbeat()
            self._publish_health(self.health.state)

    def _send_heartbeat(self) -> None:
        self._heartbeat_seq += 1
        heartbeat = Heartbeat(
            seq=self._heartbeat_seq,
            uptime=time.monotonic() - self._started,
            cpu=psutil.cpu_percent(interval=None),
            mem_free=psutil.virtual_memory().available,
            disk_free=psutil.disk_usage(str(self.settings.state_dir)).free,
            latency_ms=self.transport.last_rtt_ms,
            version=self._stored_text("version"),
        )
        if not self.transport.connected:
            return  # a heartbeat is only worth something now; the outbox would replay stale ones
        try:
            self.transport.publish(self._topic(Channel.HEARTBEAT), encode(heartbeat), qos=0)
        except TransportError:
            return
        log.debug("%s: heartbeat seq=%d", self.node, heartbeat.seq)

    def _health_changed(self, state: HealthState) -> None:
        self._publish_health(state)

    def _health_probed(self, state: HealthState) -> None:
        self.counters["probes"] += 1

    def _publish_health(self, state: HealthState) -> None:
        health = Health(
            version=self._stored_text("version"),
            healthy=state.healthy is not False,
            probes=[state.last] if state.last is not None else [],
            consecutive_failures=state.consecutive_failures,
            ts=time.time(),
        )
        self._enqueue(Channel.HEALTH, health, OutboxKind.TELEMETRY)

    def _workload_event(self, event: WorkloadEvent) -> None:
        data = {
            "pid": event.pid,
            "exit_code": event.exit_code,
            "restart_in": event.restart_in,
            "restarts": event.restarts,
        }
        self._event(f"workload_{event.kind}", event.detail, {k: v for k, v in data.items() if v is not None})
        if event.kind == "exited":
            self._workload_exits += 1
        if event.kind == "started":
            self.health.reset()
            if event.pid is not None:
                self._remember_workload(event.pid)

    def _event(self, kind: str, detail: str | None, data: dict[str, Any] | None = None) -> None:
        self._enqueue(
            Channel.EVENTS, Event(kind=kind, detail=detail, data=data or {}, ts=time.time()), OutboxKind.TELEMETRY
        )

    # ---- local configuration ---------------------------------------------------------------

    def _config_file_mtime(self) -> float | None:
        if self.config_path is None:
            return None
        try:
            return self.config_path.stat().st_mtime
        except OSError:
            return None

    async def _watch_config_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reload_requested.wait(), self.settings.config_poll_interval)
            except TimeoutError:
                if self._config_file_mtime() == self._config_mtime:
                    continue
            self._reload_requested.clear()
            try:
                self._reload_local_config()
            except ConfigError as exc:
                log.error("%s: configuration not reloaded, keeping the running one: %s", self.node, exc)

    def _reload_local_config(self) -> str:
        if self.config_path is None:
            raise ConfigError("the agent was started without a configuration file")
        self._config_mtime = self._config_file_mtime()
        settings = load_settings(self.config_path)
        if settings.node_id != self.node or settings.state_dir != self.settings.state_dir:
            raise ConfigError(f"{self.config_path}: node_id and state_dir change only with a restart")
        reconnect = (settings.server_addr, settings.tls, settings.tls_enabled, settings.keepalive) != (
            self.settings.server_addr,
            self.settings.tls,
            self.settings.tls_enabled,
            self.settings.keepalive,
        )
        self.settings = settings
        self.transport.settings = settings
        self._apply_runtime(runtime_from(settings, self.desired))
        self._publish_reported()
        if reconnect:
            self.transport.request_reconnect()
        log.info("%s: configuration reloaded from %s", self.node, self.config_path)
        return "configuration reloaded" + (", reconnecting" if reconnect else "")
