"""Agent settings: a typed tree read from one YAML file, overridable by FLEET_AGENT_* variables.

Nested fields use ``__`` in variable names (``FLEET_AGENT_TLS__CA=/etc/ca.pem``). Durations are
seconds or strings like ``500ms``, ``30s``, ``5m``, ``1h``. Every problem becomes one
``ConfigError`` line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.backoff import BackoffPolicy
from fleet.protocol.durations import Duration, PositiveDuration
from fleet.protocol.durations import parse_duration as parse_duration  # noqa: PLC0414 - re-exported for agent.daemon
from fleet.protocol.envvars import env_overrides as _env_overrides
from fleet.protocol.envvars import merge as _merge
from fleet.protocol.errors import ConfigError
from fleet.protocol.ids import InvalidNodeId, is_safe_release_name, validate_node_id
from fleet.protocol.messages import ProbeSpec


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsFiles(Section):
    ca: Path
    cert: Path
    key: Path


class BackoffSettings(Section):
    initial: PositiveDuration = 1.0
    maximum: PositiveDuration = 60.0
    jitter: Duration = 1.0

    @model_validator(mode="after")
    def _maximum_not_below_initial(self) -> BackoffSettings:
        if self.maximum < self.initial:
            raise ValueError("maximum must not be smaller than initial")
        return self

    def policy(self) -> BackoffPolicy:
        return BackoffPolicy(self.initial, self.maximum, self.jitter)


class HealthSettings(Section):
    """Kubernetes-style liveness probe: exactly one of http, tcp, exec."""

    http: str | None = None
    tcp: str | None = None
    exec: str | None = None
    initial_delay: Duration = 0.0
    period: PositiveDuration = 10.0
    timeout: PositiveDuration = 1.0
    failure_threshold: int = Field(default=3, ge=1, le=1000)

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> HealthSettings:
        if sum(kind is not None for kind in (self.http, self.tcp, self.exec)) != 1:
            raise ValueError("set exactly one of http, tcp, exec")
        return self

    def spec(self) -> ProbeSpec:
        kind, target = next((k, t) for k, t in (("http", self.http), ("tcp", self.tcp), ("exec", self.exec)) if t)
        return ProbeSpec(
            kind=kind,  # type: ignore[arg-type]
            target=target,
            initial_delay=self.initial_delay,
            period=self.period,
            timeout=self.timeout,
            failure_threshold=self.failure_threshold,
        )


class WorkloadSettings(Section):
    command: list[str] = Field(min_length=1)
    cwd: Path | None = None
    env: dict[str, str] = Field(default_factory=dict)
    restart_backoff: BackoffSettings = BackoffSettings(initial=1.0, maximum=300.0, jitter=0.5)
    healthy_after: PositiveDuration = 30.0
    health: HealthSettings | None = None
    user: str | None = Field(
        default=None,
        description="run the workload (and exec probes) as this user, its primary group, no other groups;"
        " the agent must be root for it (the shipped unit keeps just the capabilities it needs)",
    )
    release: str | None = Field(
        default=None,
        description="the name of the release this node runs: a desired release of another name is refused",
    )

    @field_validator("user")
    @classmethod
    def _known_user(cls, value: str | None) -> str | None:
        if value is not None:
            import pwd

            try:
                pwd.getpwnam(value)
            except KeyError:
                raise ValueError(f"no user {value!r} on this system") from None
        return value

    @field_validator("release")
    @classmethod
    def _release_name(cls, value: str | None) -> str | None:
        if value is not None and not is_safe_release_name(value):
            raise ValueError(f"{value!r} is not a release name: 1-128 characters of A-Z a-z 0-9 . _ + -")
        return value


class UpdateSettings(Section):
    # The release service serves at most 32 chunks per request (fleet.controller.release_service.MAX_WINDOW):
    # a larger window would wait a whole request timeout for chunks that never come.
    window: int = Field(default=8, ge=1, le=32, description="chunks requested at once (flow control)")
    request_timeout: PositiveDuration = 15.0
    max_failures: int = Field(default=5, ge=1, description="failed downloads of one release before giving up")
    no_probe_window: PositiveDuration = 10.0  # without a health probe, the workload must stay up this long
    health_grace: Duration = 2.0  # added to initial_delay + failure_threshold * period


ENV_PREFIX = "FLEET_AGENT_"


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    node_id: str
    server_addr: str = Field(description="broker HOST:PORT ([v6]:PORT for IPv6)")
    tls_enabled: bool = True
    tls: TlsFiles | None = None
    state_dir: Path
    labels: dict[str, str] = Field(default_factory=dict)
    heartbeat_interval: PositiveDuration = 30.0
    keepalive: PositiveDuration = 30.0
    connect_timeout: PositiveDuration = 10.0
    reconnect: BackoffSettings = BackoffSettings()
    workload: WorkloadSettings | None = None
    controller_public_key: Path | None = Field(
        default=None,
        description="the controller's control.pub: desired state and commands must be signed with it;"
        " none: control.pub next to tls.ca (the agent does not start without one)",
    )
    release_public_key: Path | None = Field(default=None, description="releases must be signed by this key")
    update: UpdateSettings = UpdateSettings()
    require_signed_commands: bool = Field(
        default=False, description="no unsigned command at all (unsigned_actions: [])"
    )
    unsigned_actions: list[str] = Field(
        default_factory=lambda: ["ping", "report"],
        description="actions an unsigned command may have (mosquitto_pub); every other one must be signed",
    )
    insecure_unsigned_control: bool = Field(
        default=False, description="without a controller key, accept unsigned desired state and commands"
    )
    outbox_limit: int = Field(default=10_000, ge=10)
    command_retention: PositiveDuration = 7 * 86400.0
    command_history_limit: int = Field(default=10_000, ge=100)
    config_poll_interval: PositiveDuration = 2.0

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        try:
            return validate_node_id(value)
        except InvalidNodeId as exc:
            raise ValueError(exc.reason) from exc

    @field_validator("server_addr")
    @classmethod
    def _server_addr(cls, value: str) -> str:
        split_host_port(value)
        return value

    @model_validator(mode="after")
    def _tls_files_when_enabled(self) -> AgentSettings:
        if self.tls_enabled and self.tls is None:
            raise ValueError("tls_enabled is true but tls: {ca, cert, key} is missing")
        if self.require_signed_commands and self.insecure_unsigned_control:
            raise ValueError("require_signed_commands contradicts insecure_unsigned_control")
        return self

    @property
    def allowed_unsigned(self) -> frozenset[str]:
        """The actions an unsigned command may have (none with ``require_signed_commands``)."""
        return frozenset() if self.require_signed_commands else frozenset(self.unsigned_actions)

    @property
    def host(self) -> str:
        return split_host_port(self.server_addr)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.server_addr)[1]

    def digest(self) -> str:
        """Digest of the effective settings, reported so operators can tell configurations apart."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def load_settings(path: Path) -> AgentSettings:
    """Read and validate the agent configuration; ConfigError names the file and the field."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not path.exists():
        raise ConfigError(f"{path}: not found")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    raw = _merge(raw, env_overrides(os.environ))
    try:
        return AgentSettings(**raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_problem(exc)}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``FLEET_AGENT_TLS__CA=/x`` -> ``{"tls": {"ca": "/x"}}``; values are read as YAML scalars or
    flow collections, so ``true``, ``30s`` and ``{site: plant-3}`` mean what they do in the file
    (fleet.protocol.envvars, shared with the controller)."""
    return _env_overrides(environ, ENV_PREFIX)


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}"
