"""Desired state: what the controller wants this node to run, as this node accepted it.

The newest generation wins and is stored before the broker is told it arrived, so a restart
converges to the same state. Desired config overlays the local settings into the ``Runtime`` the
agent applies without restarting (heartbeat interval, labels, health probe) and is written to
``config.json`` for the workload; what the node then runs is published as ``reported``.

A document is checked completely before it is stored (:func:`check_desired`): one the agent
cannot or will not apply is refused (event ``desired_rejected``, ``reported`` unchanged) and the
last good one stays in force. What a desired state cannot do:

- run a command: its health probe may be ``http`` or ``tcp``, never ``exec`` (that comes only
  from the signed release manifest or the local config file), and its target is taken literally;
- switch the node to another workload: a release whose name is not the one this node runs (the
  local ``workload.release``, else the installed release's name) is refused, unless the desired
  config says ``allow_release_change: true`` and the local config names no release;
- name a release or version that is not a safe path component;
- stop the agent with config it cannot parse (``heartbeat_interval``, ``labels``, non-JSON values).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
from agent.probes import HealthMonitor, target_problem
from agent.runas import needs_rewrite, owner
from agent.store import OutboxKind, Store
from agent.telemetry import Telemetry
from agent.transport import Inbound, Transport
from agent.trust import ControllerKey
from agent.update.releases import Release, Releases, UpdateFailed, check_release_ref
from fleet.protocol.codec import decode_raw, encode_document, validate
from fleet.protocol.errors import FleetError, InvalidMessage
from fleet.protocol.messages import DesiredState, ProbeSpec, ReleaseRef, Reported, UpdateState
from fleet.protocol.topics import Channel

log = logging.getLogger(__name__)

DESIRED_KEY = "desired"
ALLOW_RELEASE_CHANGE = "allow_release_change"
"""Desired config: ``true`` lets a release of another name replace the installed one."""
MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE = 64, 128, 256  # what the controller takes in ``reported``
CONFIG_JSON_MODE = 0o600


class DesiredRefused(FleetError):
    """A valid desired-state document this agent will not apply; the message says why."""


@dataclass
class Runtime:
    """Settings the agent applies without restarting: local file overlaid by desired-state config."""

    heartbeat_interval: float
    labels: dict[str, str]
    probe: ProbeSpec | None
    config: dict[str, Any] = field(default_factory=dict)
    probe_template: str | None = None  # the release probe's target before ${VAR}: what is logged

    def digest(self) -> str:
        text = json.dumps([self.heartbeat_interval, self.labels, self.config], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_probe(settings: AgentSettings) -> ProbeSpec | None:
    """The local config file's probe (``workload.health``)."""
    return settings.workload.health.spec() if settings.workload and settings.workload.health else None


def runtime_from(settings: AgentSettings, desired: DesiredState | None) -> Runtime:
    """The local settings overlaid by ``desired``'s config and probe; ``desired`` passed
    :func:`check_document` (else ValueError for a duration it cannot parse)."""
    runtime = Runtime(settings.heartbeat_interval, dict(settings.labels), local_probe(settings))
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
    """The stored desired state; None (logged) when there is none or it is unreadable or unusable:
    the agent then starts without it and converges from the retained topic."""
    stored = store.get(DESIRED_KEY)
    if stored is None:
        return None
    try:
        desired = validate(DESIRED_KEY, decode_raw(DESIRED_KEY, stored), DesiredState)
        check_document(desired)
    except (InvalidMessage, DesiredRefused) as exc:
        log.error("%s: stored desired state unusable, starting without it: %s", node, exc)
        return None
    return desired


# ---- what a desired state may ask for --------------------------------------------------------


def check_document(desired: DesiredState) -> None:
    """DesiredRefused unless everything in ``desired`` can be applied, whatever the local settings:
    the probe (never ``exec``), the config's ``heartbeat_interval``, ``labels`` and
    ``allow_release_change``, JSON-only config values, the release's name and version."""
    probe = desired.health
    if probe is not None:
        if probe.kind == "exec":
            raise DesiredRefused(
                "health: an exec probe runs a command on the device; it may come only from a signed"
                " release manifest or the local config file, never from desired state"
            )
        problem = target_problem(probe)
        if problem is not None:
            raise DesiredRefused(f"health: {problem}")
    config = desired.config
    if "heartbeat_interval" in config:
        try:
            seconds = parse_duration(config["heartbeat_interval"])
        except ValueError as exc:
            raise DesiredRefused(f"config.heartbeat_interval: {exc}") from exc
        if not math.isfinite(seconds):
            raise DesiredRefused("config.heartbeat_interval: must be a finite duration")
    if "labels" in config:
        _check_labels(config["labels"])
    if not isinstance(config.get(ALLOW_RELEASE_CHANGE, False), bool):
        raise DesiredRefused(f"config.{ALLOW_RELEASE_CHANGE}: must be true or false")
    try:
        json.dumps(config, sort_keys=True, allow_nan=False)  # as config.json is written
    except (TypeError, ValueError) as exc:
        raise DesiredRefused(f"config: not a JSON object with string keys: {exc}") from exc
    if desired.release is not None:
        try:
            check_release_ref(desired.release)
        except UpdateFailed as exc:
            raise DesiredRefused(str(exc)) from exc


def _check_labels(labels: object) -> None:
    if not isinstance(labels, dict):
        raise DesiredRefused("config.labels: must be a mapping of label names to values")
    if len(labels) > MAX_LABELS:
        raise DesiredRefused(f"config.labels: {len(labels)} labels, more than {MAX_LABELS}")
    for key, value in labels.items():
        if not isinstance(key, str) or not key or len(key) > MAX_LABEL_KEY:
            raise DesiredRefused(f"config.labels: a label name must be 1-{MAX_LABEL_KEY} characters")
        if isinstance(value, dict | list) or value is None or len(str(value)) > MAX_LABEL_VALUE:
            raise DesiredRefused(
                f"config.labels.{key}: a value must be a string or number of at most {MAX_LABEL_VALUE} characters"
            )


def check_desired(settings: AgentSettings, desired: DesiredState, installed: str | None) -> Runtime:
    """The ``Runtime`` ``desired`` yields on this node; DesiredRefused when it cannot or must not be
    applied (:func:`check_document`, and the release name rule). ``installed``: the name of the
    release this node runs (else of its previous one; None: none yet).

    The release name rule: the local ``workload.release`` names the release this node runs, and
    nothing the network says changes it; without it, the installed release's name does, unless
    the desired config says ``allow_release_change: true``; a node with neither takes its first
    release by any name."""
    check_document(desired)
    release = desired.release
    pinned = settings.workload.release if settings.workload is not None else None
    if release is not None and pinned is not None and release.name != pinned:
        raise DesiredRefused(
            f"release {release.name!r} refused: this node runs {pinned!r} (workload.release in its local config)"
        )
    if (
        release is not None
        and pinned is None
        and installed is not None
        and release.name != installed
        and desired.config.get(ALLOW_RELEASE_CHANGE) is not True
    ):
        raise DesiredRefused(
            f"release {release.name!r} refused: this node runs {installed!r};"
            f" set {ALLOW_RELEASE_CHANGE}: true in the desired config to switch it to another workload"
        )
    try:
        runtime = runtime_from(settings, desired)
    except ValueError as exc:  # check_document parsed it already; never stop the agent over it
        raise DesiredRefused(f"config: {exc}") from exc
    if len(runtime.labels) > MAX_LABELS:
        raise DesiredRefused(f"config.labels: {len(runtime.labels)} labels with the local ones, more than {MAX_LABELS}")
    return runtime


def release_probe(
    desired: DesiredState | None, release: Release | None, fallback: ProbeSpec | None, env: dict[str, str]
) -> ProbeSpec | None:
    """Probe precedence: desired state's health spec, then the release's, then ``fallback`` (the
    local file's). Only the release's is expanded: ``${VAR}`` in its target comes from the
    workload's environment for the variables the signed manifest declares (``health.env``); the
    others are taken literally."""
    if desired is not None and desired.health is not None:
        return desired.health
    if release is None or release.health is None:
        return fallback
    probe = release.health
    allowed = {name: value for name, value in env.items() if name in release.health_env}
    if allowed and "$" in probe.target:
        # One release serves many devices: ${APP_PORT} etc. come from this device's workload env.
        probe = probe.model_copy(update={"target": string.Template(probe.target).safe_substitute(allowed)})
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
        self._release: Release | None = None  # what runs (None: the configured workload), for its probe
        self._env: dict[str, str] = {}  # the workload's environment, for the release probe's ${VAR}
        self._fix_config_json()

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
        try:  # all of it, before it is stored: a bad document never replaces the last good one
            check_desired(self.settings, desired, Releases(self.settings.state_dir, self.store).installed_name())
        except DesiredRefused as exc:
            self._reject(inbound, desired.generation, str(exc))
            return
        self.store.put(DESIRED_KEY, encode_document(raw))
        self.transport.ack(inbound)
        self.state = desired
        log.info("%s: applying desired generation %d", self.node, desired.generation)
        self._apply_runtime(self._runtime(desired))
        self.report()
        self._converge(desired.release, desired.generation)

    # ---- runtime settings ------------------------------------------------------------------

    def _reject(self, inbound: Inbound, generation: int, reason: str) -> None:
        """A valid document this agent will not apply: say why; the last good one stays."""
        log.warning("%s: refused desired generation %d: %s", self.node, generation, reason)
        self.counters["desired_rejected"] += 1
        self.telemetry.event("desired_rejected", reason, {"generation": generation})
        self.transport.ack(inbound)

    # ---- runtime settings ------------------------------------------------------------------

    def apply_settings(self, settings: AgentSettings) -> None:
        """The local configuration file changed: overlay the desired config on it again."""
        self.settings = settings
        self._apply_runtime(self._runtime(self.state))
        self.report()

    def apply_release_probe(self, release: Release | None, env: dict[str, str]) -> None:
        """Watch ``release`` (None: the configured workload) with the probe that applies to it."""
        self._release, self._env = release, env
        runtime = self._runtime(self.state)
        self.runtime.probe, self.runtime.probe_template = runtime.probe, runtime.probe_template
        self.health.set_spec(runtime.probe, shown=runtime.probe_template)
        self.health.reset()

    def _runtime(self, state: DesiredState | None) -> Runtime:
        """``runtime_from`` with the probe that applies to what runs (``release_probe``)."""
        runtime = runtime_from(self.settings, state)
        fallback = local_probe(self.settings)
        runtime.probe = release_probe(state, self._release, fallback, self._env)
        template = release_probe(state, self._release, fallback, {})
        if runtime.probe is not None and template is not None and template.target != runtime.probe.target:
            runtime.probe_template = template.target
        return runtime

    def _apply_runtime(self, runtime: Runtime) -> None:
        old = self.runtime
        self.runtime = runtime
        if runtime.heartbeat_interval != old.heartbeat_interval:
            self.telemetry.heartbeat_interval_changed()
        if runtime.probe != old.probe:
            self.health.set_spec(runtime.probe, shown=runtime.probe_template)
        path = config_json_path(self.settings.state_dir)
        if runtime.config != old.config or needs_rewrite(path, CONFIG_JSON_MODE, owner(self.settings)):
            self._write_config_json()

    def _write_config_json(self) -> None:
        """``config.json``: 0600, the workload user's when it has one (it must read it)."""
        path = config_json_path(self.settings.state_dir)
        data = json.dumps(self.runtime.config, sort_keys=True).encode()
        write_atomically(path, data, CONFIG_JSON_MODE, owner(self.settings))

    def _fix_config_json(self) -> None:
        """At start: an older agent's (or another user's) ``config.json`` gets its mode and owner."""
        path = config_json_path(self.settings.state_dir)
        if path.exists() and needs_rewrite(path, CONFIG_JSON_MODE, owner(self.settings)):
            try:
                config = json.loads(path.read_bytes())
            except ValueError:
                config = self.runtime.config
            write_atomically(path, json.dumps(config, sort_keys=True).encode(), CONFIG_JSON_MODE, owner(self.settings))

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
