"""``fleet controller``: the controller service (registry, commands, rollouts, release serving, HTTPS API).

The settings, their defaults and their validation are fleet.controller.settings; this module only
maps flags (and the CLI-wide FLEET_CERTS / FLEET_BROKER) onto fields of that tree.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from fleet.cli import fail, parse_host_port
from fleet.controller.settings import ControllerSettings, Setting, load_settings
from fleet.protocol.errors import FleetError

log = logging.getLogger(__name__)

# Flag (parameter name) -> the field it sets; --broker and --http set host and port (see _settings_of).
FIELDS = {
    "certs": "broker.certs",
    "identity": "broker.identity",
    "share": "broker.share",
    "db": "storage.db",
    "store": "releases.store",
    "max_transfers": "releases.max_transfers",
    "rate_limit": "releases.rate_limit",
    "tick_interval": "timing.tick_interval",
    "stale_after": "timing.stale_after",
    "offline_after": "timing.offline_after",
    "lease_ttl": "timing.lease_ttl",
    "http_cert": "http.cert",
    "http_key": "http.key",
    "insecure_http": "http.insecure",
    "log_format": "log.format",
    "log_level": "log.level",
}
# HOST:PORT flags -> the section holding host and port
ADDRESSES = {"broker": "broker", "http": "http", "metrics": "metrics"}


def _about(field: str) -> str:
    """Help text from the settings tree: the field's description, its name there and its default."""
    model: type[BaseModel] = ControllerSettings
    *sections, name = field.split(".")
    for section in sections:
        annotation = model.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    info = model.model_fields[name]
    default = "required" if info.is_required() else f"default {_show(info.default)}"
    return f"{info.description} (setting {field}; {default})"  # not [...]: rich markup


def _about_address(section: str) -> str:
    host, port = _about(f"{section}.host"), _about(f"{section}.port")
    return f"HOST:PORT: {host}; {port}"


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}s"  # every float setting is a duration
    return str(value)


def controller(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML settings file (sections broker, storage, releases, timing, http, metrics, log;"
            " docs/operations.md);"
            " FLEET_CONTROLLER_<SECTION>__<FIELD> variables override it, flags override both",
            metavar="FILE",
        ),
    ] = None,
    certs: Annotated[
        Path | None, typer.Option("--certs", envvar="FLEET_CERTS", help=_about("broker.certs"), metavar="DIR")
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker",
            envvar="FLEET_BROKER",
            help=_about_address("broker"),
            metavar="HOST:PORT",
        ),
    ] = None,
    db: Annotated[Path | None, typer.Option("--db", help=_about("storage.db"), metavar="FILE")] = None,
    store: Annotated[Path | None, typer.Option("--store", help=_about("releases.store"), metavar="DIR")] = None,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            help=_about_address("http"),
            metavar="HOST:PORT",
        ),
    ] = None,
    identity: Annotated[str | None, typer.Option(help=_about("broker.identity"), metavar="NAME")] = None,
    stale_after: Annotated[str | None, typer.Option(help=_about("timing.stale_after"), metavar="DURATION")] = None,
    offline_after: Annotated[str | None, typer.Option(help=_about("timing.offline_after"), metavar="DURATION")] = None,
    tick_interval: Annotated[str | None, typer.Option(help=_about("timing.tick_interval"), metavar="DURATION")] = None,
    max_transfers: Annotated[str | None, typer.Option(help=_about("releases.max_transfers"), metavar="N")] = None,
    rate_limit: Annotated[str | None, typer.Option(help=_about("releases.rate_limit"), metavar="BYTES")] = None,
    share: Annotated[str | None, typer.Option(help=_about("broker.share"), metavar="GROUP")] = None,
    lease_ttl: Annotated[str | None, typer.Option(help=_about("timing.lease_ttl"), metavar="DURATION")] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="HOST:PORT of a listener serving only GET /metrics and /healthz without credentials (for"
            " Prometheus); setting metrics.host, metrics.port (default none: the API alone serves /metrics)",
            metavar="HOST:PORT",
        ),
    ] = None,
    insecure_http: Annotated[
        bool | None,
        typer.Option("--insecure-http", help=_about("http.insecure"), show_default=False),
    ] = None,
    http_cert: Annotated[Path | None, typer.Option(help=_about("http.cert"), metavar="FILE")] = None,
    http_key: Annotated[Path | None, typer.Option(help=_about("http.key"), metavar="FILE")] = None,
    log_format: Annotated[str | None, typer.Option(help=_about("log.format"), metavar="text|json")] = None,
    log_level: Annotated[str | None, typer.Option(help=_about("log.level"), metavar="LEVEL")] = None,
) -> None:
    """Run the fleet controller until SIGINT/SIGTERM.

    Settings: defaults < --config FILE < environment (FLEET_CERTS, FLEET_BROKER, then FLEET_CONTROLLER_*) < flags.

    Durations are seconds or 500ms, 30s, 5m, 1h.
    """
    from fleet.controller import logs
    from fleet.controller.service import Controller, serve_http

    # The values arrive as ctx.params too, which also says whether each came from the command
    # line or from the option's own environment variable.
    settings = _load(ctx, config)
    restore_logging = logs.configure(settings.log.format, settings.log.level)
    for chatty in ("amqtt", "httpx", "httpcore", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        service = Controller(settings)
        servers = serve_http(service)
        service.start()
    except FleetError as exc:
        restore_logging()  # a controller that does not start leaves the process's logging as it was
        fail(str(exc))
    except BaseException:
        restore_logging()
        raise
    api = servers[0]
    log.info("controller API on %s", api.url)
    if settings.http.insecure:
        log.warning("the API is plain HTTP (--insecure-http): for development only; API tokens only")
    for extra in servers[1:]:
        log.info("controller metrics on %s/metrics", extra.url)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("controller stopping")
    for server in servers:
        server.stop()
    service.stop()


def _load(ctx: typer.Context, config: Path | None) -> ControllerSettings:
    options = {param.name: param for param in ctx.command.params}
    cli_env: list[Setting] = []
    flags: list[Setting] = []
    for name, value in ctx.params.items():
        if value is None or value is False or name == "config":
            continue
        option = options[name]
        origin = ctx.get_parameter_source(name)  # click's ParameterSource (typer vendors its own click)
        from_env = origin is not None and origin.name == "ENVIRONMENT"
        source = str(option.envvar) if from_env else option.opts[0]
        (cli_env if from_env else flags).extend(_settings_of(name, value, source))
    hints = {field: f"--{name.replace('_', '-')}" for name, field in FIELDS.items()}
    hints |= {"broker.host": "--broker", "broker.port": "--broker", "metrics.host": "--metrics"}
    try:
        return load_settings(config, os.environ, cli_env=cli_env, flags=flags, hints=hints)
    except FleetError as exc:
        fail(str(exc))


def _settings_of(name: str, value: Any, source: str) -> list[Setting]:
    if name in ADDRESSES:
        host, port = parse_host_port(source, str(value), port_zero=True)
        section = ADDRESSES[name]
        return [Setting(f"{section}.host", host, source), Setting(f"{section}.port", port, source)]
    return [Setting(FIELDS[name], value, source)]
