"""``fleet token``, ``fleet audit`` and ``fleet whoami``: API access, and who did what through it.

Tokens are for scripts and CI: ``fleet token create NAME --role ROLE [--expires 30d]`` prints the
token once (the controller keeps only a salted hash); scripts send it through ``FLEET_TOKEN``.
Managing tokens needs the admin role (the operator certificate from ``fleet certs init`` has it).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fleet.cli import fail
from fleet.cli.client import (
    DEFAULT_CONTROLLER,
    CertsOption,
    ControllerOption,
    IdentityOption,
    Output,
    OutputOption,
    controller_client,
    print_data,
    target,
)
from fleet.cli.ops_cmd import console, parse_duration, segment, show, when
from fleet.controller.facade import AccessRoleName, AuditEntry, TokenCreated, TokenView

app = typer.Typer(no_args_is_help=True, help="API tokens for scripts and CI: create (shown once), ls, revoke.")


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The token's name: the actor the audit trail records.")],
    role: Annotated[
        AccessRoleName,
        typer.Option("--role", case_sensitive=False, help="viewer (read), operator (+ changes), admin (+ tokens)."),
    ],
    expires: Annotated[
        str | None, typer.Option("--expires", help="Lifetime, e.g. 30d, 12h (default: never expires).")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Create an API token and print it once: the controller keeps only a salted hash."""
    body: dict[str, object] = {"name": name, "role": role.value}
    if expires is not None:
        body["expires_in"] = parse_duration("--expires", expires)
        if not body["expires_in"]:
            fail("--expires must be longer than 0")
    with controller_client(target(controller, certs, identity)) as client:
        created: TokenCreated = client.post("/v1/tokens", TokenCreated, body)
    if output in (Output.JSON, Output.YAML):
        print_data(output, created)
        return
    expiry = "never expires" if created.info.expires_at is None else f"expires {when(created.info.expires_at)}"
    typer.echo(f"token {created.info.name} ({created.info.role.value}, {expiry}); shown this once:", err=True)
    typer.echo(created.token)
    typer.echo("use it with: export FLEET_TOKEN=<the token above>", err=True)


def _tokens_table(tokens: list[TokenView]) -> Table:
    table = Table("NAME", "ROLE", "CREATED", "BY", "EXPIRES", "STATE", box=None, title=f"{len(tokens)} tokens")
    now = time.time()
    for token in tokens:
        if token.revoked_at is not None:
            state = Text("revoked", style="red")
        elif token.expires_at is not None and token.expires_at <= now:
            state = Text("expired", style="yellow")
        else:
            state = Text("active", style="green")
        expires = "never" if token.expires_at is None else when(token.expires_at)
        table.add_row(token.name, token.role.value, when(token.created), token.created_by, expires, state)
    return table


@app.command("ls")
def ls(
    revoked: Annotated[bool, typer.Option("--all", help="Include revoked tokens.")] = False,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """API tokens: name, role, who created them, expiry (never the secret)."""
    with controller_client(target(controller, certs, identity)) as client:
        tokens: list[TokenView] = client.get("/v1/tokens", list[TokenView], {"revoked": str(revoked).lower()})
    show(output, tokens, lambda _wide: _tokens_table(tokens))


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The token to revoke.")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Revoke an API token at once."""
    with controller_client(target(controller, certs, identity)) as client:
        token: TokenView = client.delete(f"/v1/tokens/{segment(name)}", TokenView)
    show(output, token, lambda _wide: _tokens_table([token]))


def parse_since(value: str) -> float:
    """``1h`` (ago), an ISO-8601 time, or unix seconds."""
    text = value.strip()
    if text and text[-1] in "smhd" and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - parse_duration("--since", text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        fail(f"--since {value!r}: expected a duration ago (1h, 30m, 7d), an ISO-8601 time or unix seconds")
    return moment.timestamp()


def _audit_table(entries: list[AuditEntry], *, wide: bool = False) -> Table:
    columns = ["TIME", "ACTOR", "VIA", "ROLE", "ACTION", "TARGET", "OUTCOME", "STATUS"]
    columns += ["REQUEST", "DETAIL"] if wide else ["DETAIL"]
    table = Table(*columns, box=None, title=f"{len(entries)} audit entries")
    styles = {"ok": "green", "failed": "yellow", "denied": "red"}
    for entry in entries:
        row: list[str | Text] = [
            when(entry.ts),
            entry.actor,
            entry.via,
            entry.role,
            entry.action,
            entry.target or "-",
            Text(entry.outcome, style=styles.get(entry.outcome, "")),
            str(entry.status),
        ]
        row += [entry.request_id, entry.detail or ""] if wide else [entry.detail or ""]
        table.add_row(*row)
    return table


def audit(
    since: Annotated[
        str | None, typer.Option("--since", help="Only entries since: 1h (ago), an ISO-8601 time or unix seconds.")
    ] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="Certificate CN or token name.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="An operation, e.g. start_rollout.")] = None,
    target_id: Annotated[str | None, typer.Option("--target", help="A node, command, rollout or token.")] = None,
    outcome: Annotated[str | None, typer.Option("--outcome", help="ok, failed or denied.")] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """The audit trail: who changed what through the API, when, with what outcome (oldest first)."""
    params: dict[str, object] = {
        key: value
        for key, value in (("actor", actor), ("action", action), ("target", target_id), ("outcome", outcome))
        if value is not None
    }
    if since is not None:
        params["since"] = parse_since(since)
    with controller_client(target(controller, certs, identity)) as client:
        entries = client.all_pages("/v1/audit", AuditEntry, params)
    show(output, entries, lambda wide: _audit_table(entries, wide=wide))


def whoami(
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Who the controller takes you for: name, certificate or token, role."""
    from pydantic import BaseModel

    class WhoAmI(BaseModel):
        name: str
        via: str
        role: str

    with controller_client(target(controller, certs, identity)) as client:
        me: WhoAmI = client.get("/v1/whoami", WhoAmI)
    if output in (Output.JSON, Output.YAML):
        print_data(output, me)
    else:
        console().print(f"{me.name} ({me.via}, role {me.role})")
