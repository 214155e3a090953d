"""``fleet sim``: N simulated devices in one process, then a JSON report on stdout."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from fleet.cli import fail, parse_host_port
from fleet.protocol.errors import ConfigError
from fleet.tools.sim import SimSettings, Simulator


async def _run(settings: SimSettings) -> dict[str, Any]:
    simulator = Simulator(settings)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, simulator.request_stop)
    loop.add_signal_handler(signal.SIGTERM, simulator.request_stop)
    try:
        return await simulator.run()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)


def sim(
    agents: Annotated[int, typer.Option("--agents", help="Number of simulated devices.", min=1)],
    broker: Annotated[
        str, typer.Option("--broker", envvar="FLEET_BROKER", help="The MQTT broker.", metavar="HOST:PORT")
    ],
    certs: Annotated[
        Path,
        typer.Option(
            "--certs", envvar="FLEET_CERTS", help="The PKI directory; missing device certs are issued.", metavar="DIR"
        ),
    ],
    duration: Annotated[float, typer.Option(help="Seconds to run (Ctrl-C ends early).")] = 60.0,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats (jittered).")] = 30.0,
    offline_fraction: Annotated[float, typer.Option(help="Fraction of devices that never connect.")] = 0.0,
    disconnect_rate: Annotated[float, typer.Option(help="Injected link drops per device per minute.")] = 0.0,
    fail_version: Annotated[
        str | None, typer.Option(help="Release version that fails health on --fail-fraction of devices.")
    ] = None,
    fail_fraction: Annotated[float, typer.Option(help="Fraction of devices failing on --fail-version.")] = 0.0,
    prefix: Annotated[str, typer.Option(help="Node id prefix: devices are PREFIX00000, PREFIX00001, ...")] = "sim-",
    connect_rate: Annotated[float, typer.Option(help="New TLS connections started per second.")] = 200.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (reproducible fault choices).")] = None,
) -> None:
    """Simulate a fleet over the real protocol (load generator and benchmark engine)."""
    host, port = parse_host_port("--broker", broker)
    try:
        settings = SimSettings(
            agents=agents,
            host=host,
            port=port,
            certs=certs,
            duration=duration,
            heartbeat=heartbeat,
            offline_fraction=offline_fraction,
            disconnect_rate=disconnect_rate,
            fail_version=fail_version,
            fail_fraction=fail_fraction,
            prefix=prefix,
            connect_rate=connect_rate,
            seed=seed,
        )
        report = asyncio.run(_run(settings))
    except ConfigError as exc:
        fail(str(exc))
    typer.echo(json.dumps(report, indent=2))
