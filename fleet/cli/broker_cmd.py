"""``fleet broker``: run the embedded broker, or render the same policy for Mosquitto / EMQX."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from broker.embedded import BrokerSettings, FleetBroker, parse_listen
from broker.render import RenderOptions, default_options, render
from certs import PkiPaths
from fleet.cli import fail
from fleet.protocol.errors import FleetError

log = logging.getLogger(__name__)

# Where docker-compose.yml mounts the certificates, this directory and the broker's data.
CONTAINER_OPTIONS = RenderOptions(
    pki_dir=Path("/mosquitto/pki"),
    config_dir=Path("/mosquitto/config"),
    data_dir=Path("/mosquitto/data"),
    user="mosquitto",
)


class RenderKind(StrEnum):
    MOSQUITTO = "mosquitto"
    EMQX = "emqx"


def broker(
    certs: Annotated[
        Path, typer.Option("--certs", envvar="FLEET_CERTS", help="certificate directory (fleet certs init)")
    ],
    listen: Annotated[list[str], typer.Option("--listen", help="HOST:PORT, repeatable; port 0 picks a free one")],
    render_kind: Annotated[RenderKind | None, typer.Option("--render", help="write config for another broker")] = None,
    out: Annotated[Path | None, typer.Argument(help="output directory for --render")] = None,
    user: Annotated[str | None, typer.Option(help="--render mosquitto: user the broker drops privileges to")] = None,
    max_queued: Annotated[int, typer.Option(help="messages queued per offline session")] = 100_000,
    container: Annotated[
        bool, typer.Option("--container", help="--render with the paths of docker-compose.yml's broker container")
    ] = False,
) -> None:
    """Run the embedded mutual-TLS broker, or render its policy for Mosquitto or EMQX."""
    try:
        settings = BrokerSettings(
            pki=PkiPaths(certs),
            listeners=tuple(parse_listen(value) for value in listen),
            max_queued_messages=max_queued,
        )
        if render_kind is not None:
            if out is None:
                fail("--render needs an output directory, e.g. `--render mosquitto ./out`")
            options = CONTAINER_OPTIONS if container else default_options(settings, out, user)
            for path in render(render_kind.value, settings, out, options):
                typer.echo(f"wrote {path}")
            return
        asyncio.run(_serve(settings))
    except FleetError as exc:
        fail(str(exc))


async def _serve(settings: BrokerSettings) -> None:
    broker = FleetBroker(settings)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("Broker stopping")
        with contextlib.suppress(asyncio.CancelledError):
            await broker.shutdown()
