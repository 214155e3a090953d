"""The operator CLI ``fleet``: one Typer app, one sub-app per concern."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, NoReturn

import typer

from fleet.protocol.errors import FleetError

if TYPE_CHECKING:
    from certs import ClientPaths, PkiPaths
    from fleet.controller.mqtt import TlsIdentity

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fleet messaging and updates over MQTT.")


def fail(message: str) -> NoReturn:
    """Print one line naming what is wrong and exit 2 (the contract for every bad input)."""
    typer.echo(f"fleet: error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_host_port(option: str, value: str, *, port_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (port 0 only with ``port_zero``); anything else is a one-line
    error naming the option and the value."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    lowest = 0 if port_zero else 1
    if not sep or not host or not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        fail(f"{option} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8883")
    return host, int(port_text)


def client_identity(pki: PkiPaths, client: ClientPaths, hint: str) -> TlsIdentity:
    """The CA and one client certificate of the PKI as a TLS identity; a missing file is named with ``hint``."""
    from fleet.controller.mqtt import TlsIdentity  # paho and cryptography load only for commands that connect

    identity = TlsIdentity(pki.ca_cert, client.cert, client.key)
    for path in (identity.ca, identity.cert, identity.key):
        if not path.is_file():
            fail(f"{path}: no such file ({hint})")
    return identity


_registered = False


def _register_subcommands() -> None:
    """Mount the sub-apps once; imported lazily so `fleet --help` stays fast."""
    global _registered  # noqa: PLW0603 - one-time registration on the module-level app
    if _registered:
        return
    _registered = True
    from fleet.cli import (
        broker_cmd,
        certs_cmd,
        controller_cmd,
        demo_cmd,
        ops_cmd,
        release_cmd,
        serve_cmd,
        sim_cmd,
        watch_cmd,
    )

    app.add_typer(certs_cmd.app, name="certs")
    app.command("broker")(broker_cmd.broker)
    release_cmd.app.command("serve")(serve_cmd.serve)
    app.add_typer(release_cmd.app, name="release")
    app.command("controller")(controller_cmd.controller)
    app.command("nodes")(ops_cmd.nodes)
    app.command("node")(ops_cmd.node)
    app.command("send")(ops_cmd.send)
    app.add_typer(ops_cmd.rollout_app, name="rollout")
    app.command("watch")(watch_cmd.watch)
    app.command("demo")(demo_cmd.demo)
    app.command("sim")(sim_cmd.sim)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs every connection and plugin load at INFO; the fleet's own lines say what matters.
    for chatty in ("amqtt", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    _register_subcommands()
    try:
        app()
    except FleetError as exc:  # anything not already turned into a one-line error
        typer.echo(f"fleet: error: {exc}", err=True)
        sys.exit(2)
