"""``fleet release serve``: answer agents' artifact requests over MQTT until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from certs import PkiPaths
from fleet.cli import client_identity, fail, parse_host_port
from fleet.controller.mqtt import FleetMqtt, TlsIdentity
from fleet.controller.release_service import ReleaseServer, ReleaseService
from fleet.protocol.errors import FleetError
from fleet.releases import ReleaseStore

log = logging.getLogger(__name__)


def controller_identity(certs: Path, identity: str | None) -> TlsIdentity:
    """The main controller identity, or ``certs/controllers/<identity>``; missing files are named."""
    pki = PkiPaths(certs)
    client = pki.default_controller if identity is None else pki.controller(identity)
    hint = "run `fleet certs init`" if identity is None else f"issue controller identity {identity!r}"
    return client_identity(pki, client, hint)


def serve(
    store: Annotated[Path, typer.Option("--store", help="The release store directory.", metavar="DIR")],
    certs: Annotated[Path, typer.Option("--certs", envvar="FLEET_CERTS", help="The PKI directory.", metavar="DIR")],
    broker: Annotated[
        str, typer.Option("--broker", envvar="FLEET_BROKER", help="The MQTT broker.", metavar="HOST:PORT")
    ],
    identity: Annotated[
        str | None,
        typer.Option("--identity", help="Controller identity under certs/controllers/ (default: controller.pem)."),
    ] = None,
    max_transfers: Annotated[int, typer.Option("--max-transfers", min=1, help="Requests served at once.")] = 8,
    rate_limit: Annotated[
        int | None,
        typer.Option(
            "--rate-limit", min=0, help="Bytes per second per device (default: 1 MiB/s; 0: no limit).", metavar="BYTES"
        ),
    ] = None,
) -> None:
    """Serve release artifacts to agents over MQTT (artifact/req -> artifact/chunk)."""
    host, port = parse_host_port("--broker", broker)
    if not store.is_dir():
        fail(f"{store}: no such release store directory")
    tls = controller_identity(certs, identity)
    try:
        mqtt = FleetMqtt(host, port, tls)
        mqtt.start()
    except FleetError as exc:
        fail(str(exc))
    service = ReleaseService(
        mqtt, ReleaseServer(ReleaseStore(store)), max_transfers=max_transfers, rate_limit=rate_limit
    )
    try:
        service.start()
        _wait_for_signal()
    finally:
        service.stop()
        mqtt.close()
        stats = service.stats()
        log.info(
            "release service stopped: %d requests, %d chunks, %d bytes sent, %d errors, %d dropped",
            stats.requests,
            stats.chunks_sent,
            stats.bytes_sent,
            stats.errors,
            stats.dropped,
        )


def _wait_for_signal() -> None:
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("release service: %s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
