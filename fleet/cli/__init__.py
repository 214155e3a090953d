"""The operator CLI ``fleet``: one Typer app, one sub-app per concern.

Exit codes, the same for every command (``fleet --help`` lists them): 0 success; 1 the operation
failed (a command failed, a rollout aborted, a wait timed out, the controller refused a change that
conflicts with its state); 2 usage error (a bad option, argument or input, an unknown node or
rollout); 3 the controller cannot be reached or does not accept the credentials.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Collection
from typing import TYPE_CHECKING, NoReturn

from fleet.protocol.errors import FleetError

if TYPE_CHECKING:
    from certs import ClientPaths, PkiPaths
    from fleet.controller.mqtt import TlsIdentity

SERVER_EXTRA_MISSING = "fleet: error: the operator CLI needs the server extra: pip install 'fleet-mqtt[server]'"
# Installed by pyproject's [server] extra only (the agent install lacks them); an ImportError naming
# one of these while the CLI starts is reported as SERVER_EXTRA_MISSING instead of a traceback.
SERVER_ONLY_MODULES = frozenset(
    {"typer", "click", "rich", "amqtt", "fastapi", "starlette", "uvicorn", "prometheus_client", "httpx"}
)

try:
    import typer
except ImportError as exc:  # the agent-only install: `main` says what is missing, nothing else here runs
    if exc.name not in SERVER_ONLY_MODULES:
        raise
    _server_extra_installed = False
else:
    _server_extra_installed = True

EXIT_OK = 0
EXIT_FAILED = 1  # the operation failed: command failed, rollout aborted, timed out, conflict
EXIT_USAGE = 2  # bad options, arguments or input; an unknown node, command or rollout
EXIT_UNREACHABLE = 3  # the controller cannot be reached, or refuses the credentials (401, 403)
EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 the operation failed (command failed, rollout aborted or timed out,"
    " conflict); 2 usage error (bad option or input, unknown node or rollout); 3 controller unreachable"
    " or credentials refused."
)

if _server_extra_installed:
    app = typer.Typer(
        no_args_is_help=True,
        add_completion=True,
        help="Fleet messaging and updates over MQTT.",
        epilog=EXIT_CODES_HELP,
    )


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one line naming what is wrong and exit ``code`` (2, usage error, unless said otherwise)."""
    typer.echo(f"fleet: error: {message}", err=True)
    raise typer.Exit(code=code)


def version_text() -> str:
    from importlib import metadata

    try:
        return f"fleet {metadata.version('fleet-mqtt')}"
    except metadata.PackageNotFoundError:  # a source tree that was not installed
        return "fleet 0.0.0"


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


# Every sub-command: name -> (module in fleet.cli, attribute, the one-line help `fleet --help` lists).
# A Typer attribute is mounted as a sub-app, a function as a command; the order is the listing's.
# `main` imports only the module of the command being run; the others are listed through a
# placeholder carrying their help line, so `fleet --help` imports neither the broker (amqtt) nor the
# controller (fastapi, uvicorn). tests/fleet/test_cli_lazy.py checks these lines against the modules.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "certs": ("certs_cmd", "app", "PKI: CA, server, identities, CRL."),
    "broker": (
        "broker_cmd",
        "broker",
        "Run the embedded mutual-TLS broker, or render its policy for Mosquitto or EMQX.",
    ),
    "release": ("release_cmd", "app", "Releases: build, list, delta, verify."),
    "controller": ("controller_cmd", "controller", "Run the fleet controller until SIGINT/SIGTERM."),
    "nodes": ("ops_cmd", "nodes", "List nodes: id, status, version, health, last seen, labels."),
    "node": ("ops_cmd", "node", "One node: reported state, health history, recent commands and acks."),
    "send": (
        "ops_cmd",
        "send",
        "Send a command to a node (or to every node --selector matches, after a confirmation); with --wait,"
        " follow the ack trail (exit 1 if it fails or times out).",
    ),
    "label": (
        "ops_cmd",
        "label",
        "Set or remove a node's operator labels (KEY=VALUE, KEY-); they win over the labels it reports.",
    ),
    "cancel": (
        "ops_cmd",
        "cancel",
        "Cancel a pending command: the controller stops resending it (exit 1 once it was acknowledged).",
    ),
    "sign": (
        "sign_cmd",
        "sign",
        "Print one signed command as a JSON line, for mosquitto_pub -m (needs the PKI's control.key).",
    ),
    "rollout": ("ops_cmd", "rollout_app", "Staged, health-gated rollouts."),
    "token": ("token_cmd", "app", "API tokens for scripts and CI: create (shown once), ls, revoke."),
    "audit": (
        "token_cmd",
        "audit",
        "The audit trail: who changed what through the API, when, with what outcome (oldest first).",
    ),
    "whoami": ("token_cmd", "whoami", "Who the controller takes you for: name, certificate or token, role."),
    "watch": (
        "watch_cmd",
        "watch",
        "Print the messages on FILTER as JSON lines (msgpack decoded) until --count or Ctrl-C.",
    ),
    "demo": (
        "demo_cmd",
        "demo",
        "Run the whole system on this machine: three staged rollouts, the last one a bad release.",
    ),
    "sim": ("sim_cmd", "sim", "Simulate a fleet over the real protocol (load generator and benchmark engine)."),
}
_SUB_APPS = frozenset({"certs", "release", "rollout", "token"})

_registered = False


def _register_subcommands(load: Collection[str] | None = None) -> None:
    """Mount the sub-commands once: those named in ``load`` (all when None) from their modules, the
    others as placeholders that only carry their help line."""
    global _registered  # noqa: PLW0603 - one-time registration on the module-level app
    if _registered:
        return
    _registered = True
    for name, (module_name, attribute, help_line) in SUBCOMMANDS.items():
        if load is not None and name not in load:
            if name in _SUB_APPS:
                app.add_typer(typer.Typer(), name=name, help=help_line)
            else:
                app.command(name, help=help_line)(_placeholder)
            continue
        target = getattr(importlib.import_module(f"fleet.cli.{module_name}"), attribute)
        if name == "release":
            from fleet.cli import serve_cmd

            target.command("serve")(serve_cmd.serve)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)


def _placeholder() -> None:
    """Stands in for a command that was not loaded: `main` loads the one it runs."""
    fail("internal: this command was not loaded")


def _command_on(argv: list[str]) -> str | None:
    """The sub-command ``fleet`` is asked to run: its first argument that is not an option (the
    top-level takes no option with a value). While the shell asks for completions, the words typed
    so far (bash: COMP_WORDS; zsh, fish, PowerShell: _TYPER_COMPLETE_ARGS) name it."""
    if os.environ.get("_FLEET_COMPLETE"):
        typed = os.environ.get("COMP_WORDS") or os.environ.get("_TYPER_COMPLETE_ARGS") or ""
        words = typed.split()[1:]
        known = [word for word in words if word in SUBCOMMANDS]
        return known[0] if known else None
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit(code=EXIT_OK)


if _server_extra_installed:

    @app.callback(epilog=EXIT_CODES_HELP)
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """Fleet messaging and updates over MQTT."""


def main() -> None:
    if not _server_extra_installed:
        print(SERVER_EXTRA_MISSING, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs every connection and plugin load at INFO; the fleet's own lines say what matters.
    for chatty in ("amqtt", "httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    command = _command_on(sys.argv[1:])
    try:
        _register_subcommands(load=() if command is None else (command,))
    except ImportError as exc:  # a server library is missing while typer is not (a partial install)
        if (exc.name or "").partition(".")[0] not in SERVER_ONLY_MODULES:
            raise
        print(SERVER_EXTRA_MISSING, file=sys.stderr)
        sys.exit(2)
    try:
        app()
    except FleetError as exc:  # anything not already turned into a one-line error
        typer.echo(f"fleet: error: {exc}", err=True)
        sys.exit(2)
