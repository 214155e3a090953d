"""Controller settings: one typed tree, the only place their defaults are written.

Layers, each over the one before: the defaults here < a YAML file (``fleet controller --config``) <
environment variables < command-line flags. The variables are ``FLEET_CONTROLLER_<SECTION>__<FIELD>``
(``FLEET_CONTROLLER_TIMING__STALE_AFTER=2m``), read as YAML scalars like the agent's
``FLEET_AGENT_*`` (fleet.protocol.envvars); the CLI-wide ``FLEET_CERTS`` and ``FLEET_BROKER`` are
environment too, below the more specific ``FLEET_CONTROLLER_*``. Durations are seconds or strings
like ``500ms``, ``30s``, ``5m``, ``1h``. Unknown keys are an error, and every problem is one
``ConfigError`` line naming where the value came from (file, variable or flag) and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from certs import PkiPaths
from fleet.protocol.durations import PositiveDuration
from fleet.protocol.envvars import env_items
from fleet.protocol.errors import ConfigError
from fleet.protocol.ids import InvalidNodeId, validate_node_id

ENV_PREFIX = "FLEET_CONTROLLER_"
# MQTT shared-subscription group names: one topic level, kept to what every broker accepts (the
# same rule as fleet.controller.mqtt, which checks it again for callers without settings).
_SHARE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Section(BaseModel):
    # Numbers are accepted where text is meant: ``FLEET_CONTROLLER_BROKER__IDENTITY=7`` reads as YAML 7.
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class BrokerSettings(Section):
    """The MQTT broker and how this controller appears on it."""

    host: str = Field(min_length=1, description="broker host name or address")
    port: int = Field(default=8883, ge=1, le=65535, description="broker TLS port")
    certs: Path = Field(description="PKI directory from `fleet certs init`: ca.pem and the controller certificate")
    identity: str | None = Field(
        default=None,
        description="use the certificate controllers/<identity>/ from `fleet certs controller`;"
        " none: controller.pem (CN fleet-controller)",
    )
    share: str | None = Field(
        default=None,
        description="split ingest with the other controllers of this group ($share/<group>/...); they must use"
        " the same storage.db and each its own identity; the lease holder drives rollouts. None: alone",
    )

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return validate_node_id(value)
        except InvalidNodeId as exc:
            raise ValueError(exc.reason) from exc

    @field_validator("share")
    @classmethod
    def _share(cls, value: str | None) -> str | None:
        if value is not None and not _SHARE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a share group name: 1-64 letters, digits, '-' or '_'")
        return value


class StorageSettings(Section):
    """Where the controller keeps its state."""

    db: Path = Field(
        default=Path("fleet.db"),
        description="the SQLite file: registry, commands and acks, desired states, rollouts, the lease",
    )


class ReleaseSettings(Section):
    """The release store and how artifacts are served from it."""

    store: Path = Field(default=Path("releases"), description="release store directory")
    max_transfers: int = Field(default=8, ge=1, le=1024, description="artifact requests served at once")
    rate_limit: int | None = Field(
        default=None,
        ge=0,
        description="artifact bytes per second per device (token bucket); none: the release service's default"
        " (1 MiB/s); 0: no limit",
    )


class TimingSettings(Section):
    """Periods and timeouts."""

    tick_interval: PositiveDuration = Field(
        default=0.5, description="period of the loop that flushes telemetry, resends commands and drives rollouts"
    )
    stale_after: PositiveDuration = Field(default=90.0, description="without a heartbeat this long a node is stale")
    offline_after: PositiveDuration = Field(
        default=300.0, description="without any message this long a node is offline (at least stale_after)"
    )
    lease_ttl: PositiveDuration = Field(
        default=10.0, description="with broker.share: a leader silent this long is replaced"
    )
    clock_skew_warn: PositiveDuration = Field(
        default=300.0,
        description="a node whose clock is off the controller's by more than this is logged as a warning and"
        " counted in fleet_device_clock_skewed_nodes",
    )

    @model_validator(mode="after")
    def _offline_not_before_stale(self) -> TimingSettings:
        if self.offline_after < self.stale_after:
            raise ValueError(
                f"offline_after ({self.offline_after:g}s) is shorter than stale_after ({self.stale_after:g}s)"
            )
        return self


class HttpSettings(Section):
    """The HTTP API: HTTPS with the PKI's server certificate; every request needs an operator client
    certificate or an API token."""

    host: str = Field(default="127.0.0.1", min_length=1, description="address the HTTP API listens on")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP API port; 0: any free port (logged)")
    cert: Path | None = Field(
        default=None,
        description="the API's TLS certificate (PEM); none: the PKI's server.pem (the broker's, SANs from"
        " `fleet certs init --san`)",
    )
    key: Path | None = Field(default=None, description="the key of http.cert; none: the PKI's server.key")
    insecure: bool = Field(
        default=False,
        description="plain HTTP instead of HTTPS, for development only: allowed on a loopback address only, and"
        " only API tokens are accepted (there is no client certificate without TLS)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header values the API answers besides the names in its certificate (and the"
        " loopback names on a loopback address): a defence against DNS rebinding",
    )

    @model_validator(mode="after")
    def _insecure_on_loopback_only(self) -> HttpSettings:
        if self.insecure and not _is_loopback(self.host):
            raise ValueError(f"insecure (plain HTTP) is allowed on a loopback address only, not {self.host}")
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: give both or neither")
        return self


class MetricsSettings(Section):
    """An extra listener serving only GET /metrics and GET /healthz, without credentials (for Prometheus)."""

    host: str | None = Field(
        default=None, description="address of the metrics listener; none: no listener (the API serves /metrics)"
    )
    port: int = Field(default=9464, ge=0, le=65535, description="metrics listener port; 0: any free port (logged)")


class LogSettings(Section):
    """The controller's own log lines (stderr)."""

    format: Literal["text", "json"] = Field(
        default="text", description="text, or json: one object per line (ts, level, logger, msg) like fleet-agent"
    )
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="lowest level logged")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ControllerSettings(Section):
    """Everything ``fleet controller`` and ``fleet.controller.service.Controller`` are configured with."""

    broker: BrokerSettings = Field(description="the MQTT broker")
    storage: StorageSettings = Field(default=StorageSettings(), description="state on disk")
    releases: ReleaseSettings = Field(default=ReleaseSettings(), description="release serving")
    timing: TimingSettings = Field(default=TimingSettings(), description="periods and timeouts")
    http: HttpSettings = Field(default=HttpSettings(), description="the HTTP API")
    metrics: MetricsSettings = Field(default=MetricsSettings(), description="the unauthenticated metrics listener")
    log: LogSettings = Field(default=LogSettings(), description="log lines")

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths(self.broker.certs)


@dataclass(frozen=True)
class Setting:
    """One value from outside the file: ``Setting("timing.stale_after", "5m", "--stale-after")``."""

    field: str  # dotted path in the tree
    value: object
    source: str  # what set it, named in errors: a flag or an environment variable


def load_settings(
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    cli_env: Iterable[Setting] = (),
    flags: Iterable[Setting] = (),
    hints: Mapping[str, str] | None = None,
) -> ControllerSettings:
    """The validated settings from the defaults, ``config`` (YAML), then ``cli_env`` (flags that took
    their value from their own variable: FLEET_CERTS, FLEET_BROKER), the ``FLEET_CONTROLLER_*``
    variables of ``environ``, then ``flags``. ConfigError is one line naming source and field; a
    required field that nothing set is named with its flag from ``hints`` (field -> flag)."""
    layers = _Layers(hints or {})
    if config is not None:
        layers.set((), _read_file(config), str(config))
    for setting in cli_env:
        layers.set(_path(setting.field), setting.value, setting.source)
    for name, path, value in sorted(env_items(environ or {}, ENV_PREFIX), key=lambda item: item[0]):
        layers.set(path, value, name)
    for setting in flags:
        layers.set(_path(setting.field), setting.value, setting.source)
    try:
        return ControllerSettings.model_validate(layers.raw)
    except ValidationError as exc:
        raise ConfigError(layers.explain(exc)) from exc


def env_name(field: str) -> str:
    """The variable for a dotted field: ``timing.stale_after`` -> ``FLEET_CONTROLLER_TIMING__STALE_AFTER``."""
    return ENV_PREFIX + "__".join(_path(field)).upper()


def _path(field: str) -> tuple[str, ...]:
    return tuple(field.split("."))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid YAML: not UTF-8 text") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return raw


class _Layers:
    """The raw settings tree being layered, and which source set each value in it."""

    def __init__(self, hints: Mapping[str, str]) -> None:
        self._hints = hints
        # An empty broker section, so that nothing given names broker.host, not the whole section.
        self.raw: dict[str, Any] = {"broker": {}}
        self._sources: dict[tuple[str, ...], str] = {}  # in the order set: the last one wins

    def set(self, path: tuple[str, ...], value: object, source: str) -> None:
        """``value`` at ``path`` over what is there: mappings merge key by key, anything else replaces
        (the rule of fleet.protocol.envvars.merge)."""
        if path:
            parent = self.raw
            for depth, key in enumerate(path[:-1], start=1):
                if not isinstance(parent.get(key), dict):
                    self._forget(path[:depth])
                    parent[key] = {}
                    self._sources[path[:depth]] = source
                parent = parent[key]
            key = str(path[-1])
            if not (isinstance(value, dict) and isinstance(parent.get(key), dict)):
                self._forget(path)
                parent[key] = {} if isinstance(value, dict) else value
                self._sources[path] = source
        if isinstance(value, dict):
            for child, child_value in value.items():
                self.set((*path, str(child)), child_value, source)

    def _forget(self, path: tuple[str, ...]) -> None:
        for recorded in [p for p in self._sources if p[: len(path)] == path]:
            del self._sources[recorded]

    def source_of(self, loc: Sequence[str | int]) -> str | None:
        """Who set the value at ``loc``: for a problem with a whole section, the last source that set
        anything in it; for a value inside one set whole (``FLEET_CONTROLLER_TIMING='{...}'``), its setter."""
        path = tuple(str(part) for part in loc)
        inside = [source for recorded, source in self._sources.items() if recorded[: len(path)] == path]
        if inside:
            return inside[-1]
        for depth in range(len(path) - 1, 0, -1):
            if path[:depth] in self._sources:
                return self._sources[path[:depth]]
        return None

    def explain(self, exc: ValidationError) -> str:
        error = exc.errors()[0]
        loc = error["loc"]
        where = ".".join(str(part) for part in loc) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if error["type"] == "missing":
            flag = f"{self._hints[where]}, " if where in self._hints else ""
            return f"{where}: required: set {flag}{env_name(where)} or {where} in the --config file{more}"
        if error["type"] == "extra_forbidden":
            message = f"unknown setting (known here: {', '.join(_known_fields(loc[:-1]))})"
        else:
            message = error["msg"].removeprefix("Value error, ")
        source = self.source_of(loc)
        return f"{source + ': ' if source else ''}{where}: {message}{more}"


def _known_fields(loc: Sequence[str | int]) -> list[str]:
    model: type[BaseModel] = ControllerSettings
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = None if info is None else info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)
