"""Commands: at-least-once on the wire, exactly-once in effect.

A command is stored (``received``) before the broker is told it arrived and marked ``executing``
before it runs, so after a crash one that never started runs and one that had started is never
repeated (it is reported failed instead). Every outcome is acked through the durable outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent import core, failpoints
from agent.config import AgentSettings
from agent.outbox import Outbox
from agent.store import CommandStatus, OutboxKind, Store
from agent.transport import Inbound, Transport
from agent.trust import ControllerKey
from agent.update.releases import UpdateFailed
from agent.updater import Updater
from agent.workload_host import WorkloadHost
from fleet.protocol.codec import decode_raw, validate
from fleet.protocol.errors import ConfigError, FleetError, InvalidMessage, Rejected
from fleet.protocol.messages import AckStatus, Command
from fleet.protocol.topics import Channel

log = logging.getLogger(__name__)

Action = Callable[[Command], Awaitable[str | None]]


class CommandFailed(FleetError):
    """A command ran and did not achieve its effect; the detail goes into the `failed` ack."""


# ---- the action table ----------------------------------------------------------------------


def action_table(
    *, report: Callable[[], None], workload: WorkloadHost, reload_config: Callable[[], str], updater: Updater
) -> dict[str, Action]:
    async def ping(_command: Command) -> str:
        return "pong"

    async def report_now(_command: Command) -> str:
        report()
        return "reported"

    async def restart(_command: Command) -> str:
        return await restart_workload(workload)

    async def reload(_command: Command) -> str:
        return reload_config()

    async def rollback(command: Command) -> str:
        return await roll_back(updater, command)

    return {"ping": ping, "report": report_now, "restart": restart, "reload": reload, "rollback": rollback}


async def restart_workload(workload: WorkloadHost) -> str:
    if not workload.configured:
        raise CommandFailed("no workload configured")
    pid = await workload.restart()
    return f"workload restarted (pid {pid})"


async def roll_back(updater: Updater, command: Command) -> str:
    """Back to the previous release, as ``core.decide_rollback`` says (a rollout's ``from``/``to``
    leave a node that is not on ``from`` alone: a rollback never pushes it below its baseline)."""
    current, previous = updater.current(), updater.previous()
    decision = core.decide_rollback(
        current.version if current is not None else None,
        previous.version if previous is not None else None,
        command.args,
    )
    if decision.verdict is core.RollbackVerdict.NOOP:
        return decision.detail or ""
    if decision.verdict is core.RollbackVerdict.FAIL:
        raise CommandFailed(decision.detail or core.NO_PREVIOUS_RELEASE)
    result = await updater.rollback(core.ROLLBACK_REASON)
    if current is not None:
        updater.mark_left_behind(current.digest)
    return result


# ---- intake, execution, recovery -----------------------------------------------------------


class Commands:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        store: Store,
        outbox: Outbox,
        transport: Transport,
        key: ControllerKey,
        refuse: Callable[[Inbound, str], None],
        actions: Mapping[str, Action],
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.store = store
        self.outbox = outbox
        self.transport = transport
        self.key = key
        self._refuse = refuse
        self.actions = actions
        self._queue: asyncio.Queue[Command] = asyncio.Queue()

    def intake(self, inbound: Inbound) -> None:
        """Store a valid new command, then ack it to the broker and queue it; refuse the rest."""
        try:
            raw = decode_raw(inbound.topic, inbound.payload)
        except InvalidMessage as exc:
            self._refuse(inbound, str(exc))
            return
        command_id = core.refusable_id(raw)
        try:
            self._check_signature(raw)
            command = validate(inbound.topic, raw, Command)
        except InvalidMessage as exc:
            self._refuse(inbound, str(exc))
            if command_id is not None:
                self._refuse_command(command_id, str(raw.get("action", "?")), AckStatus.REJECTED, exc.reason)
            return
        existing = self.store.record_command(command.id, command.action, inbound.payload, command.expires_at)
        intake = core.command_intake(
            command,
            earlier=existing.status if existing is not None else None,
            now=self.key.controller_now(),  # expiry is the controller's: judged on its clock (agent.trust)
            actions=self.actions,
        )
        if intake.outcome is core.Intake.DUPLICATE:
            self._ack(command.id, intake.ack, intake.detail)
            self.transport.ack(inbound)
            return
        if intake.remember:
            self.store.set_command_status(command.id, CommandStatus(intake.ack.value), intake.detail)
            self._ack(command.id, intake.ack, intake.detail)
            self.transport.ack(inbound)
            return
        failpoints.hit("command.received")  # durable, not yet acknowledged to the broker
        self.transport.ack(inbound)
        self._ack(command.id, AckStatus.ACCEPTED, None)
        self._queue.put_nowait(command)

    def _check_signature(self, raw: dict[str, Any]) -> None:
        # Signed for this node as a command (agent.trust), or unsigned with an allowed action.
        self.key.check_command(raw, self.settings.allowed_unsigned)

    def _refuse_command(self, command_id: str, action: str, status: AckStatus, reason: str) -> None:
        self.store.record_refused(command_id, action[:64], CommandStatus(status.value), reason)
        self._ack(command_id, status, reason)

    def recover(self) -> None:
        """After a crash: run what was stored but never started; never repeat what had started."""
        for record in self.store.commands_in(CommandStatus.EXECUTING):
            self.store.set_command_status(record.id, CommandStatus.FAILED, core.INTERRUPTED)
            self._ack(record.id, AckStatus.FAILED, core.INTERRUPTED)
        for record in self.store.commands_in(CommandStatus.RECEIVED):
            if record.payload is None:
                continue
            try:
                command = validate("stored", decode_raw("stored", record.payload), Command)
            except InvalidMessage as exc:
                self.store.set_command_status(record.id, CommandStatus.FAILED, str(exc))
                continue
            self._queue.put_nowait(command)

    async def execute_forever(self) -> None:
        while True:
            command = await self._queue.get()
            await self._execute(command)

    async def _execute(self, command: Command) -> None:
        self.store.set_command_status(command.id, CommandStatus.EXECUTING)
        failpoints.hit("command.executing")
        log.info("%s: executing command %s (%s)", self.node, command.id, command.action)
        try:
            detail = await self.actions[command.action](command)
        except (Rejected, CommandFailed, ConfigError, UpdateFailed) as exc:
            status, outcome = core.result(error=str(exc))
        else:
            status, outcome = core.result(detail)
        self.store.set_command_status(command.id, CommandStatus(status.value), outcome)
        self._ack(command.id, status, outcome)

    def _ack(self, command_id: str, status: AckStatus, detail: str | None) -> None:
        self.outbox.enqueue(Channel.ACK, core.ack(command_id, status, detail, time.time()), OutboxKind.ACK)
