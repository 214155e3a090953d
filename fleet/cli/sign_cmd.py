"""``fleet sign``: one signed command as a JSON line, for ``mosquitto_pub -m``.

Agents run unsigned commands only for the harmless actions of their ``unsigned_actions`` (default
``ping``, ``report``); anything else must be signed with the PKI's control key and bound to the node
(fleet.protocol.signing). ``fleet send`` goes through the controller, which signs; this is for an
operator who publishes directly to the broker and holds ``control.key`` (as powerful as the
controller: keep it where the controller's is).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from fleet.cli import fail
from fleet.protocol.durations import parse_duration
from fleet.protocol.ids import InvalidNodeId, validate_node_id

DEFAULT_EXPIRES_IN = "10m"


def sign(
    node: Annotated[
        str, typer.Argument(metavar="NODE", help="The node the command is for (signed: no other takes it).")
    ],
    action: Annotated[str, typer.Argument(metavar="ACTION", help="ping, report, restart, reload, rollback.")],
    certs: Annotated[
        Path,
        typer.Option(
            "--certs", envvar="FLEET_CERTS", metavar="DIR", help="PKI directory holding control.key (the signing key)."
        ),
    ],
    args: Annotated[
        list[str] | None,
        typer.Option("--arg", metavar="KEY=VALUE", help="KEY=VALUE (string) or KEY:=JSON; repeatable."),
    ] = None,
    expires_in: Annotated[
        str, typer.Option("--expires-in", metavar="DURATION", help="The agent answers expired after this long.")
    ] = DEFAULT_EXPIRES_IN,
    command_id: Annotated[
        str | None, typer.Option("--id", metavar="ID", help="The command id (default: op-<random>); unique per node.")
    ] = None,
) -> None:
    """Print one signed command as a JSON line, for mosquitto_pub -m (needs the PKI's control.key).

    Agents refuse unsigned commands beyond their unsigned_actions (default: ping, report)."""
    import certs as pki_files
    from certs import PkiPaths
    from fleet.protocol.messages import Command
    from fleet.protocol.signing import sign_control

    try:
        validate_node_id(node)
    except InvalidNodeId as exc:
        fail(f"NODE {exc.reason}")
    try:
        lifetime = parse_duration(expires_in)
    except ValueError as exc:
        fail(f"--expires-in: {exc}")
    if lifetime <= 0:
        fail(f"--expires-in {expires_in!r}: must be positive")
    try:
        key = pki_files.load_control_key(PkiPaths(certs))
    except pki_files.PkiError as exc:
        fail(str(exc))
    now = time.time()
    try:
        command = Command(
            id=command_id or f"op-{secrets.token_hex(8)}", action=action, args=_args(args), expires_at=now + lifetime
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        fail(f"invalid command: {'.'.join(str(part) for part in error['loc'])}: {error['msg']}")
    signed = sign_control(command, node, key, issued_at=now)
    typer.echo(json.dumps(signed.model_dump(mode="json", exclude_none=True), separators=(",", ":")))


def _args(values: list[str] | None) -> dict[str, Any]:
    """Repeated ``--arg k=v`` (a string) or ``--arg k:=JSON`` (a number, bool, list..., as ``fleet send``)."""
    parsed: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.rstrip(":"):
            fail(f"--arg {item!r}: expected KEY=VALUE or KEY:=JSON")
        if key.endswith(":"):
            try:
                parsed[key[:-1]] = json.loads(raw)
            except json.JSONDecodeError as exc:
                fail(f"--arg {item!r}: value is not JSON: {exc.msg}")
        else:
            parsed[key] = raw
    return parsed
