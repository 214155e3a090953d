"""Desired state: what the controller wants this node to run, as this node accepted it.

The newest generation wins and is stored before the broker is told it arrived, so a restart
converges to the same state. Desired config overlays the local settings into the ``Runtime`` the
agent applies without restarting (heartbeat interval, labels, health probe) and is written to
``config.json`` for the workload; what the node then runs is published as ``reported``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import core
from agent.config import AgentSettings, parse_duration
from agent.files import write_atomically
from agent.outbox import Outbox
from agent.probes import HealthMonitor
from agent.store import OutboxKind, Store
from agent.telemetry import Telemetry
from agent.transport import Inbound, Transport
from agent.trust import ControllerKey
from agent.update.releases import Release
from fleet.protocol.codec import decode_raw, encode_document, validate
from fleet.protocol.errors import InvalidMessage
from fleet.protocol.messages import DesiredState, ProbeSpec, ReleaseRef, Reported, UpdateState
from fleet.protocol.topics import Channel

log = logging.getLogger(__name__)

DESIRED_KEY = "desired"


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


def config_json_path(state_dir: Path) -> Path:
    """The desired config as the workload reads it (its ``FLEET_CONFIG``)."""
    return state_dir / "config.json"


def load_desired(store: Store, node: str) -> DesiredState | None:
    stored = store.get(DESIRED_KEY)
    if stored is None:
        return None
    try:
        return validate(DESIRED_KEY, decode_raw(DESIRED_KEY, stored), DesiredState)
    except InvalidMessage as exc:
        log.error("%s: stored desired state unreadable, starting without it: %s", node, exc)
        return None


def release_probe(
    desired: DesiredState | None, release: Release | None, fallback: ProbeSpec | None, env: dict[str, str]
) -> ProbeSpec | None:
    """Probe precedence: desired state's health spec, then the release's, then ``fallback`` (the
    local file's); ``${VAR}`` in its target comes from the workload's environment."""
    desired_probe = desired.health if desired is not None else None
    probe = desired_probe or (release.health if release is not None else None) or fallback
    if probe is not None and "$" in probe.target:
        # One release serves many devices: ${APP_PORT} etc. come from this device's workload env.
        target = string.Template(probe.target).safe_substitute(env)
        probe = probe.model_copy(update={"target": target})
    return probe


class Desired:
    """The applied desired state, the ``Runtime`` it yields, and the ``reported`` answer to it."""

    def __init__(
        self,
        settings: AgentSettings,
        state: DesiredState | None,
        *,
        store: Store,
        outbox: Outbox,
        transport: Transport,
        key: ControllerKey,
        health: HealthMonitor,
        telemetry: Telemetry,
        refuse: Callable[[Inbound, str], None],
        converge: Callable[[ReleaseRef | None, int], None],
        counters: Counter[str],
    ) -> None:
        self.settings = settings
        self.node = settings.node_id
        self.state = state
        self.runtime = runtime_from(settings, state)
        self.store = store
        self.outbox = outbox
        self.transport = transport
        self.key = key
        self.health = health
        self.telemetry = telemetry
        self._refuse = refuse
        self._converge = converge
        self.counters = counters
        self._update_state = UpdateState.IDLE

    @property
    def generation(self) -> int:
        return self.state.generation if self.state is not None else 0

    def converge(self) -> None:
        """Hand the stored desired release to the updater (at start: resume what it asked for)."""
        if self.state is not None:
            self._converge(self.state.release, self.state.generation)

    # ---- intake ----------------------------------------------------------------------------

    def intake(self, inbound: Inbound) -> None:
        if not inbound.payload:
            self.transport.ack(inbound)  # a cleared retained topic: nothing to converge to
            return
        try:
            raw = decode_raw(inbound.topic, inbound.payload)
            self.key.check_desired(raw)  # signed by the controller for this node (agent.trust)
            desired = validate(inbound.topic, raw, DesiredState)
        except InvalidMessage as exc:
            self._refuse(inbound, str(exc))
            self.telemetry.event("desired_rejected", str(exc))
            return
        decision = core.accept_desired(self.state.generation if self.state is not None else None, desired.generation)
        if not decision.apply:
            if decision.counter is not None:
                self.counters[decision.counter] += 1
            if decision.reason is not None:
                log.warning("%s: %s", self.node, decision.reason)
            self.transport.ack(inbound)
            return
        self.store.put(DESIRED_KEY, encode_document(raw))
        self.transport.ack(inbound)
        self.state = desired
        log.info("%s: applying desired generation %d", self.node, desired.generation)
        self._apply_runtime(runtime_from(self.settings, desired))
        self.report()
        self._converge(desired.release, desired.generation)

    # ---- runtime settings ------------------------------------------------------------------

    def apply_settings(self, settings: AgentSettings) -> None:
        """The local configuration file changed: overlay the desired config on it again."""
        self.settings = settings
        self._apply_runtime(runtime_from(settings, self.state))
        self.report()

    def apply_release_probe(self, release: Release | None, env: dict[str, str]) -> None:
        """Watch ``release`` (None: the configured workload) with the probe that applies to it."""
        probe = release_probe(self.state, release, self.runtime.probe, env)
        self.runtime.probe = probe
        self.health.set_spec(probe)
        self.health.reset()

    def _apply_runtime(self, runtime: Runtime) -> None:
        old = self.runtime
        self.runtime = runtime
        if runtime.heartbeat_interval != old.heartbeat_interval:
            self.telemetry.heartbeat_interval_changed()
        if runtime.probe != old.probe:
            self.health.set_spec(runtime.probe)
        path = config_json_path(self.settings.state_dir)
        if runtime.config != old.config or not path.exists():
            write_atomically(path, json.dumps(runtime.config, sort_keys=True).encode())

    # ---- reported --------------------------------------------------------------------------

    def report(
        self, state: UpdateState | None = None, detail: str | None = None, progress: float | None = None
    ) -> None:
        """Publish what this node runs for the applied generation; ``state`` None repeats the last."""
        if state is None:
            state = self._update_state
        self._update_state = state
        reported = Reported(
            generation=self.generation,
            version=self.store.get_text("version"),
            previous_version=self.store.get_text("previous_version"),
            state=state,
            config_digest=self.runtime.digest(),
            detail=detail,
            progress=progress,
            labels=self.runtime.labels,
            ts=time.time(),
        )
        self.outbox.enqueue(Channel.REPORTED, reported, OutboxKind.STATE)
