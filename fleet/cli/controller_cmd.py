"""``fleet controller``: the controller service (registry, commands, rollouts, release serving, HTTP API)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from certs import PkiPaths
from fleet.cli import fail, parse_host_port
from fleet.protocol.errors import FleetError

log = logging.getLogger(__name__)


def controller(
    certs: Annotated[Path, typer.Option("--certs", envvar="FLEET_CERTS", help="PKI directory")],
    broker: Annotated[str, typer.Option("--broker", envvar="FLEET_BROKER", help="broker HOST:PORT")],
    db: Annotated[Path, typer.Option("--db", help="SQLite database file")] = Path("fleet.db"),
    store: Annotated[Path, typer.Option("--store", help="release store directory")] = Path("releases"),
    http: Annotated[str, typer.Option("--http", help="HTTP API HOST:PORT")] = "127.0.0.1:8080",
    identity: Annotated[str | None, typer.Option(help="controller identity under certs/controllers/")] = None,
    stale_after: Annotated[float, typer.Option(help="seconds without heartbeat before a node is stale")] = 90.0,
    offline_after: Annotated[float, typer.Option(help="seconds without any message before offline")] = 300.0,
    max_transfers: Annotated[int, typer.Option(help="artifact requests served at once")] = 8,
    rate_limit: Annotated[int | None, typer.Option(help="artifact bytes per second per device")] = None,
    share: Annotated[
        str | None,
        typer.Option(
            help="split ingest with the other controllers of this group ($share/GROUP/...; they must use the same"
            " --db file and each its own --identity); the lease holder drives rollouts"
        ),
    ] = None,
    lease_ttl: Annotated[float, typer.Option(help="with --share: seconds before a silent leader is replaced")] = 10.0,
) -> None:
    """Run the fleet controller until SIGINT/SIGTERM."""
    from fleet.controller.api import create_app, serve_in_thread
    from fleet.controller.service import Controller, ControllerSettings

    broker_host, broker_port = parse_host_port("--broker", broker, port_zero=True)
    http_host, http_port = parse_host_port("--http", http, port_zero=True)
    settings = ControllerSettings(
        pki=PkiPaths(certs),
        broker_host=broker_host,
        broker_port=broker_port,
        db=db,
        store=store,
        identity=identity,
        stale_after=stale_after,
        offline_after=offline_after,
        max_transfers=max_transfers,
        rate_limit=rate_limit,
        share=share,
        lease_ttl=lease_ttl,
    )
    try:
        service = Controller(settings)
        api = serve_in_thread(create_app(service), http_host, http_port)
        service.start()
    except FleetError as exc:
        fail(str(exc))
    log.info("controller API on %s", api.url)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("controller stopping")
    api.stop()
    service.stop()
