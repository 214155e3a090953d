"""``fleet certs``: create the PKI, issue and revoke identities, list them."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

import certs
from certs import ClientPaths, IdentityInfo, PkiPaths
from fleet.cli import fail
from fleet.protocol.errors import FleetError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="PKI: CA, server, identities, CRL.")

T = TypeVar("T")

Dir = Annotated[Path, typer.Argument(help="The PKI directory.", metavar="DIR")]
Force = Annotated[bool, typer.Option("--force", help="Replace what already exists.")]
Days = Annotated[int, typer.Option("--days", min=1, help="Validity in days.")]


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


@app.command()
def init(
    directory: Dir,
    force: Force = False,
    san: Annotated[
        list[str] | None,
        typer.Option("--san", metavar="HOST", help="Extra server name or IP (repeatable)."),
    ] = None,
    days: Annotated[
        int | None,
        typer.Option(
            "--days", min=1, help=f"Validity of the root CA and the server in days (default {certs.DEFAULT_DAYS})."
        ),
    ] = None,
) -> None:
    """Create the root and issuing CAs, server, controller and operator certificates, the release key,
    the control key and empty CRLs. On an existing PKI: add the issuing CA or control key it lacks
    (nothing else changes)."""
    pki = PkiPaths(directory)
    if pki.ca_cert.exists() and not force:
        if san or days is not None:
            fail(f"{pki.ca_cert}: already exists; --san and --days apply to a new PKI (--force replaces it)")
        _report_upgrade(pki, _run(lambda: certs.upgrade_pki(pki)))
        return
    _run(lambda: certs.init_pki(directory, force=force, extra_sans=san or (), days=days or certs.DEFAULT_DAYS))
    _report_written(
        [
            pki.ca_cert,
            pki.ca_key,
            pki.issuing_cert,
            pki.issuing_key,
            pki.server_cert,
            pki.server_key,
            pki.controller_cert,
            pki.controller_key,
            pki.operator_cert,
            pki.operator_key,
            pki.release_key,
            pki.release_pub,
            pki.control_pub,
            pki.control_key,
            pki.crl,
        ]
    )


@app.command()
def device(
    directory: Dir,
    node_id: Annotated[str, typer.Argument(metavar="NODE_ID", help="The device's node id (its CN).")],
    force: Force = False,
    days: Days = certs.DEVICE_DAYS,
) -> None:
    """Issue a device certificate whose CN is the node id (signed by the issuing CA), with a copy of
    control.pub (the key its agent verifies desired state and commands with)."""
    pki = PkiPaths(directory)
    paths = _run(lambda: certs.issue_device(pki, node_id, force=force, days=days))
    _report_client(paths)
    if pki.device_control_pub(node_id).exists():
        _report_written([pki.device_control_pub(node_id)])


@app.command()
def operator(
    directory: Dir,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The operator's name (its CN).")],
    role: Annotated[
        certs.AccessRole,
        typer.Option(
            "--role",
            case_sensitive=False,
            help="What it may do on the controller's HTTP API: viewer (read), operator (+ commands, rollouts,"
            " labels), admin (+ tokens, identities, releases).",
        ),
    ] = certs.AccessRole.OPERATOR,
    force: Force = False,
    days: Days = certs.OPERATOR_DAYS,
) -> None:
    """Issue a personal operator certificate with its API role (the CN is the user the audit trail names)."""
    paths = _run(lambda: certs.issue_operator(PkiPaths(directory), name, force=force, days=days, access=role))
    _report_client(paths)


@app.command()
def controller(
    directory: Dir,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The controller instance's name (its CN).")],
    force: Force = False,
    days: Days = certs.CONTROLLER_DAYS,
) -> None:
    """Issue one more controller instance certificate."""
    paths = _run(lambda: certs.issue_controller(PkiPaths(directory), name, force=force, days=days))
    _report_client(paths)


@app.command("renew")
def renew_cmd(
    directory: Dir,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The identity to re-issue.")],
    days: Annotated[
        int | None,
        typer.Option(
            "--days",
            min=1,
            help=(
                f"Validity in days (default: device {certs.DEVICE_DAYS}, controller {certs.CONTROLLER_DAYS}, "
                f"operator {certs.OPERATOR_DAYS}, server {certs.DEFAULT_DAYS})."
            ),
        ),
    ] = None,
) -> None:
    """Re-issue an identity with a new key; key.pem and cert.pem are replaced crash-safely."""
    renewal = _run(lambda: certs.renew(PkiPaths(directory), name, days=days))
    if renewal.recovered is not None:
        typer.echo(renewal.recovered)
    _report_client(renewal.paths)
    typer.echo(
        f"renewed {name} ({renewal.role}, serial {_serial_hex(renewal.serial)}, issued by the {renewal.issuer} CA, "
        f"valid until {renewal.not_after:%Y-%m-%d})"
    )


@app.command("revoke")
def revoke_cmd(
    directory: Dir,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The identity to revoke.")],
) -> None:
    """Add an identity's current certificate to crl.pem (brokers must reload it)."""
    pki = PkiPaths(directory)
    serial = _run(lambda: certs.revoke(pki, name))
    typer.echo(f"revoked {name} (serial {_serial_hex(serial)}) in {pki.crl}")


@app.command("ls")
def ls_cmd(
    directory: Dir,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", help="table or json.")] = OutputFormat.TABLE,
) -> None:
    """List identities: name, role (an operator's with its API role), issuing CA, serial, expiry, revoked."""
    infos = _run(lambda: certs.list_identities(PkiPaths(directory)))
    if output is OutputFormat.JSON:
        typer.echo(json.dumps([_as_json(info) for info in infos], indent=2))
    else:
        Console().print(_as_table(infos))


def _run(action: Callable[[], T]) -> T:
    try:
        return action()
    except FleetError as exc:
        fail(str(exc))


def _report_written(paths: Iterable[Path]) -> None:
    for path in paths:
        typer.echo(f"wrote {path}")


def _report_client(paths: ClientPaths) -> None:
    _report_written([paths.cert, paths.key])


def _report_upgrade(pki: PkiPaths, upgrade: certs.PkiUpgrade) -> None:
    typer.echo(f"{pki.ca_cert}: the PKI exists; adding what it lacks")
    if upgrade.root_recertified:
        typer.echo(
            f"re-signed {pki.ca_cert}: same key, name and validity, path length 0 -> 1 so that a CA may sign "
            "below it; restart every broker so it loads the new ca.pem before devices of the issuing CA connect"
        )
    _report_written(upgrade.written)
    if upgrade.issuing_added:
        typer.echo(
            f"added the issuing CA {pki.issuing_cert}: new devices are issued by it; existing certificates are "
            "unchanged (`fleet certs renew` moves a device to it)"
        )
    if upgrade.control_key_added:
        typer.echo(
            f"added the control key {pki.control_key}: the controller signs desired state and commands with it;"
            f" give every gateway {pki.control_pub} next to its ca.pem (new devices get a copy in devices/<id>/)"
        )


def _issuer_label(info: IdentityInfo) -> str:
    return info.issuer.value if info.issuer is not None else "unknown"


def _serial_hex(serial: int) -> str:
    # The spelling `openssl x509 -serial` and `openssl crl -text` use, so the two can be compared.
    digits = f"{serial:X}"
    return digits if len(digits) % 2 == 0 else f"0{digits}"


def _as_json(info: IdentityInfo) -> dict[str, object]:
    return {
        "name": info.name,
        "role": info.role.value,
        "access": info.access.value if info.access is not None else None,
        "issuer": _issuer_label(info),
        # A string: 160-bit serials do not survive a JSON number in most consumers.
        "serial": _serial_hex(info.serial),
        "not_after": info.not_after.isoformat(),
        "revoked": info.revoked,
        "cert": str(info.cert),
    }


def _as_table(infos: Iterable[IdentityInfo]) -> Table:
    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("role", min_width=len("controller"))
    table.add_column("issuer", min_width=len("issuing"))
    table.add_column("serial", overflow="fold")
    table.add_column("not after", no_wrap=True, min_width=len("YYYY-MM-DD"))
    table.add_column("revoked", min_width=len("revoked"))
    for info in infos:
        table.add_row(
            info.name,
            info.role.value if info.access is None else f"{info.role.value} ({info.access.value})",
            _issuer_label(info),
            _serial_hex(info.serial),
            info.not_after.strftime("%Y-%m-%d"),
            "[red]yes[/red]" if info.revoked else "no",
        )
    return table
