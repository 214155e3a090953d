"""Operator commands on the controller's HTTPS API: nodes, node, label, send, cancel and ``rollout ...``.

Each command is one or a few requests (fleet.cli.client: credentials, retries, exit codes) whose
JSON answers are parsed back into the facade's view models, then shown as rich tables for people
(``-o table``, ``-o wide``) or as JSON / YAML with ISO-8601 times for scripts. Exit codes: 0 done,
1 the operation failed (command failed, rollout aborted, timed out), 2 bad input, 3 controller
unreachable or credentials refused.

This module deliberately does not import ``fleet.controller.api``: the CLI should not pay for FastAPI.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleet.cli import EXIT_FAILED, fail
from fleet.cli.client import (
    DEFAULT_CONTROLLER,
    ApiError,
    CertsOption,
    ControllerClient,
    ControllerOption,
    IdentityOption,
    Output,
    OutputOption,
    controller_client,
    exit_code_for,
    for_output,
    print_data,
    target,
)
from fleet.controller.facade import (
    BadRequest,
    CommandView,
    HealthRecord,
    NodeDetail,
    NodeEvent,
    NodeOutcome,
    NodeView,
    RolloutPlan,
    RolloutRequest,
    RolloutState,
    RolloutView,
    WaveView,
    parse_label_changes,
)
from fleet.controller.facade import parse_selector as facade_parse_selector
from fleet.controller.selectors import Selector

TERMINAL_ACKS = frozenset({"done", "failed", "rejected", "duplicate", "expired", "cancelled"})
SUCCESSFUL_ACKS = frozenset({"done", "duplicate"})  # duplicate: the agent had already executed it
TERMINAL_ROLLOUTS = frozenset({RolloutState.ABORTED, RolloutState.SUCCEEDED})
POLL_INTERVAL = 0.2

_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_THRESHOLD = re.compile(r"\d+(?:\.\d+)?%|\d+")

SelectorOption = Annotated[
    str | None,
    typer.Option(
        "--selector",
        "-l",
        help="Label selector: ring=canary, site!=plant-7, tier in (a,b), tier notin (c), key, !key.",
    ),
]


# ---- parsing of options ------------------------------------------------------------------------


def parse_duration(option: str, value: str) -> float:
    """``90s``, ``2m``, ``1h``, ``30d``, ``500ms`` or plain seconds; anything else is a one-line error."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        fail(f"{option} {value!r}: expected a duration like 90s, 2m, 1h, 30d or plain seconds")
    return float(match.group("amount")) * _UNIT_SECONDS[match.group("unit")]


def parse_selector(option: str, text: str | None) -> dict[str, str]:
    """Equality only (what a rollout stores): ``ring=canary,site=plant-3``."""
    try:
        return facade_parse_selector(text, what=option)
    except BadRequest as exc:
        fail(str(exc))


def check_label_selector(option: str, text: str | None) -> str | None:
    """A kubectl-style selector, checked here so a typo is named before any request."""
    try:
        Selector.parse(text, what=option)
    except BadRequest as exc:
        fail(str(exc))
    return text


def parse_args(values: list[str] | None) -> dict[str, Any]:
    """Repeated ``--arg k=v`` (a string) or ``--arg k:=JSON`` (a number, bool, list... as in HTTPie)."""
    args: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.rstrip(":"):
            fail(f"--arg {item!r}: expected KEY=VALUE or KEY:=JSON")
        if key.endswith(":"):
            key = key[:-1]
            try:
                args[key] = json.loads(raw)
            except json.JSONDecodeError as exc:
                fail(f"--arg {item!r}: value is not JSON: {exc.msg}")
        else:
            args[key] = raw
    return args


def parse_list(option: str, text: str) -> list[str]:
    """``1%,25%,100%`` or counts ``5,50,100``: checked here so a typo is named before any request."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail(f"{option} {text!r}: expected a comma-separated list like 1%,25%,100%")
    for item in items:
        check_threshold(option, item)
    return items


def check_threshold(option: str, value: str) -> str:
    if _THRESHOLD.fullmatch(value.strip()) is None:
        fail(f"{option} {value!r}: expected a percentage like 5% or a count like 3")
    return value.strip()


# ---- output ------------------------------------------------------------------------------------


def console() -> Console:
    # Piped tables (grep, less) should not wrap at rich's default 80 columns.
    shown = Console(highlight=False)
    if not shown.is_terminal and "COLUMNS" not in os.environ:
        shown = Console(highlight=False, width=160)
    return shown


def ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return duration(max(time.time() - ts, 0.0)) + " ago"


def duration(seconds: float) -> str:
    """``3d 4h``, ``2h 5m``, ``1m 9s``, ``42s``: the two largest units."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f}s"
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or parts:
            amount = int(seconds // size)
            seconds -= amount * size
            parts.append(f"{amount}{unit}")
        if len(parts) == 2:
            break
    return " ".join(parts)


def size(value: float) -> str:
    """Bytes in binary units: ``22.7 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def clock_offset_text(offset: float | None) -> str:
    """A node's clock offset: ``+3600.2s (ahead of the controller)``, ``in sync (+0.1s)``."""
    if offset is None:
        return "-"
    if abs(offset) < 1.0:
        return f"in sync ({offset:+.1f}s)"
    return f"{offset:+.1f}s ({'ahead of' if offset > 0 else 'behind'} the controller)"


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


def health_text(healthy: bool | None) -> Text:
    if healthy is None:
        return Text("-")
    return Text("healthy", style="green") if healthy else Text("unhealthy", style="red")


_STATUS_STYLE = {"online": "green", "stale": "yellow", "offline": "red"}


def _reported(view: NodeView) -> dict[str, str]:
    """The labels the node reports; from ``labels`` for a controller that does not tell them apart."""
    return view.reported_labels if view.reported_labels or view.operator_labels else view.labels


def heartbeat_text(heartbeat: dict[str, Any]) -> str:
    """A heartbeat for people: ``uptime 1m 9s, cpu 3.2%, mem free 22.7 GiB, ...``."""
    parts = []
    if isinstance(heartbeat.get("uptime"), int | float):
        parts.append(f"uptime {duration(float(heartbeat['uptime']))}")
    if isinstance(heartbeat.get("cpu"), int | float):
        parts.append(f"cpu {float(heartbeat['cpu']):.1f}%")
    for key, label in (("mem_free", "mem free"), ("disk_free", "disk free")):
        if isinstance(heartbeat.get(key), int | float):
            parts.append(f"{label} {size(float(heartbeat[key]))}")
    if isinstance(heartbeat.get("latency_ms"), int | float):
        parts.append(f"latency {float(heartbeat['latency_ms']):.0f} ms")
    if "seq" in heartbeat:
        parts.append(f"seq {heartbeat['seq']}")
    return ", ".join(parts) or "-"


def nodes_table(nodes: list[NodeView], *, wide: bool = False) -> Table:
    columns = ["ID", "STATUS", "VERSION", "HEALTH", "LAST SEEN", "LABELS", "REPORTED LABELS"]
    if wide:
        columns += ["UPDATE STATE", "GENERATION", "AGENT", "UPTIME", "CPU", "MEM FREE"]
    table = Table(*columns, box=None, title=f"{len(nodes)} nodes")
    for view in nodes:
        status = Text(view.status.value, style=_STATUS_STYLE.get(view.status.value, ""))
        row: list[RenderableType] = [
            view.id,
            status,
            view.version or "-",
            health_text(view.healthy),
            ago(view.last_seen),
            labels_text(view.operator_labels),
            labels_text(_reported(view)),
        ]
        if wide:
            beat = view.heartbeat
            row += [
                view.update_state or "-",
                "-" if view.generation is None else str(view.generation),
                view.agent_version or "-",
                duration(float(beat["uptime"])) if isinstance(beat.get("uptime"), int | float) else "-",
                f"{float(beat['cpu']):.1f}%" if isinstance(beat.get("cpu"), int | float) else "-",
                size(float(beat["mem_free"])) if isinstance(beat.get("mem_free"), int | float) else "-",
            ]
        table.add_row(*row)
    return table


def health_transitions(history: list[HealthRecord]) -> list[tuple[HealthRecord, int]]:
    """Runs of the same health: the first message of each run and how many the run had."""
    runs: list[tuple[HealthRecord, int]] = []
    for record in history:
        if runs and runs[-1][0].healthy == record.healthy:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((record, 1))
    return runs


def node_detail(detail: NodeDetail) -> Group:
    view = detail.node
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    rows = {
        "node": view.id,
        "status": view.status.value,
        "version": view.version or "-",
        "previous version": view.previous_version or "-",
        "update state": view.update_state or "-",
        "generation": "-" if view.generation is None else str(view.generation),
        "health": "-" if view.healthy is None else ("healthy" if view.healthy else "unhealthy"),
        "last health": ago(view.health_ts),
        "last seen": ago(view.last_seen),
        "agent": view.agent_version or "-",
        "clock": clock_offset_text(view.clock_offset),
        "labels": labels_text(view.operator_labels),  # the operator's: they alone decide the canary ring
        "reported labels": labels_text(_reported(view)),  # the node's own word
        "effective labels": labels_text(view.labels),  # reported overlaid with the operator's: selectors match these
        "heartbeat": heartbeat_text(view.heartbeat),
    }
    for name, value in rows.items():
        facts.add_row(name, value)
    health = Table("SINCE", "HEALTH", "MESSAGES", "DETAIL", box=None, title="health history (transitions)")
    for record, count in health_transitions(detail.health_history):
        health.add_row(clock(record.ts), health_text(record.healthy), str(count), record.detail or "")
    return Group(facts, Text(), health, Text(), events_table(detail.events), Text(), commands_table(detail.commands))


def events_table(events: list[NodeEvent]) -> Table:
    table = Table("TIME", "EVENT", "DETAIL", box=None, title="update events")
    for event in events:
        extra = " ".join(f"{key}={value}" for key, value in sorted(event.data.items()) if not isinstance(value, dict))
        table.add_row(clock(event.ts), event.kind, " ".join(part for part in (event.detail, extra) if part) or "")
    return table


def commands_table(commands: list[CommandView], title: str = "recent commands") -> Table:
    table = Table("ID", "NODE", "ACTION", "STATUS", "CREATED", "ATTEMPTS", "ACKS", box=None, title=title)
    for command in commands:
        trail = " > ".join(ack.status for ack in command.acks) or "-"
        table.add_row(
            command.id,
            command.node,
            command.action,
            command.status,
            ago(command.created),
            str(command.attempts),
            trail,
        )
    return table


def _wave_counts(wave: WaveView) -> dict[str, int]:
    counts = {outcome: wave.counts.get(outcome, 0) for outcome in NodeOutcome if outcome != NodeOutcome.PENDING}
    finished = sum(counts.values())
    # Pending is derived rather than read: a controller may leave zero counts (or unstarted waves) out.
    return {"pending": max(wave.nodes - finished, 0), **{outcome.value: n for outcome, n in counts.items()}}


def wave_of(view: RolloutView) -> str:
    """``2/3``: the wave being driven, numbered from 1 like every wave people read."""
    return f"{min(view.current_wave + 1, len(view.waves))}/{len(view.waves)}"


def rollout_status(view: RolloutView, *, wide: bool = False) -> Group:
    head = Text.assemble(
        (f"rollout {view.id}", "bold"),
        f"  {view.release}  ",
        (view.state.value, _ROLLOUT_STYLE.get(view.state, "")),
        f"  wave {wave_of(view)}",
        f"  selector {labels_text(view.selector)}",
    )
    table = Table(
        "WAVE", "NODES", "SUCCEEDED", "FAILED", "UNREACHABLE", "ROLLED BACK", "PENDING", "PROGRESS", "", box=None
    )
    for wave in view.waves:
        counts = _wave_counts(wave)
        done = wave.nodes - counts["pending"]
        marker = ">" if wave.index == view.current_wave and view.state not in TERMINAL_ROLLOUTS else " "
        table.add_row(
            f"{marker}{wave.number}",
            str(wave.nodes),
            str(counts["succeeded"]),
            str(counts["failed"]),
            str(counts["unreachable"]),
            str(counts["rolled_back"]),
            str(counts["pending"]),
            ProgressBar(total=max(wave.nodes, 1), completed=done, width=30),
            f"{100 * done / max(wave.nodes, 1):.0f}%",
        )
    parts: list[RenderableType] = [head, table]
    if view.detail:
        parts.append(Text(view.detail, style="italic"))
    for action in view.actions:
        verb = action.action.removesuffix("_rollout")
        verb += "d" if verb.endswith("e") else "ed"  # started, paused, resumed, aborted
        parts.append(Text(f"{verb} by {action.actor} ({action.via}) at {when(action.ts)}", style="dim"))
    if wide and view.nodes:
        nodes = Table("NODE", "OUTCOME", box=None)
        for node, outcome in sorted(view.nodes.items()):
            nodes.add_row(node, outcome.value)
        parts.append(nodes)
    return Group(*parts)


_ROLLOUT_STYLE = {
    RolloutState.RUNNING: "cyan",
    RolloutState.PAUSED: "yellow",
    RolloutState.ABORTING: "red",
    RolloutState.ABORTED: "red",
    RolloutState.SUCCEEDED: "green",
}


def rollouts_table(views: list[RolloutView], *, wide: bool = False) -> Table:
    columns = ["ID", "RELEASE", "STATE", "WAVE", "SELECTOR", "UPDATED"]
    if wide:
        columns += ["STARTED BY", "NODES", "DETAIL"]
    table = Table(*columns, box=None, title=f"{len(views)} rollouts")
    for view in views:
        state = Text(view.state.value, style=_ROLLOUT_STYLE.get(view.state, ""))
        row: list[RenderableType] = [
            view.id, view.release, state, wave_of(view), labels_text(view.selector), ago(view.updated),
        ]  # fmt: skip
        if wide:
            starter = next((a.actor for a in view.actions if a.action == "start_rollout"), "-")
            row += [starter, str(len(view.nodes)), view.detail or ""]
        table.add_row(*row)
    return table


def show(output: Output, value: object, render: Callable[[bool], RenderableType]) -> None:
    """JSON / YAML for scripts, else the table ``render(wide)`` draws."""
    if output in (Output.JSON, Output.YAML):
        print_data(output, value)
    else:
        console().print(render(output is Output.WIDE))


def segment(value: str) -> str:
    """An id as one URL path segment: an id with a ``/`` must not reach another route."""
    return quote(value, safe="")


# ---- nodes -------------------------------------------------------------------------------------


def nodes(
    selector: SelectorOption = None,
    status: Annotated[str | None, typer.Option("--status", help="online, stale or offline.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Only nodes reporting this version.")] = None,
    health: Annotated[str | None, typer.Option("--health", help="healthy, unhealthy or unknown.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Show again on every change until Ctrl-C.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="Refresh interval with --watch.")] = "2s",
    timeout: Annotated[str | None, typer.Option("--timeout", help="With --watch: stop after this long.")] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """List nodes: id, status, version, health, last seen, labels."""
    params = {
        key: value
        for key, value in (
            ("selector", check_label_selector("--selector", selector)),
            ("status", status),
            ("version", version),
            ("health", health),
        )
        if value
    }
    period = max(parse_duration("--interval", interval), 0.05)
    deadline = None if timeout is None else time.monotonic() + parse_duration("--timeout", timeout)
    with controller_client(target(controller, certs, identity)) as client:

        def fetch() -> list[NodeView]:
            return client.all_pages("/v1/nodes", NodeView, params)

        found = fetch()
        if not watch:
            show(output, found, lambda wide: nodes_table(found, wide=wide))
            return
        _watch(output, fetch, found, lambda views, wide: nodes_table(views, wide=wide), period, deadline)


def _watch(
    output: Output,
    fetch: Callable[[], list[NodeView]],
    first: list[NodeView],
    render: Callable[[list[NodeView], bool], RenderableType],
    period: float,
    deadline: float | None,
) -> None:
    """Redraw (terminal) or print again (pipe; JSON: one line) whenever the list changes."""

    def key(views: list[NodeView]) -> str:
        return json.dumps([view.model_dump(mode="json", exclude={"last_seen", "heartbeat"}) for view in views])

    def expired() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    shown = console()
    views, last = first, None
    try:
        if output in (Output.TABLE, Output.WIDE) and shown.is_terminal:
            with Live(render(views, output is Output.WIDE), console=shown, auto_refresh=False) as live:
                while not expired():
                    time.sleep(period)
                    views = fetch()
                    live.update(render(views, output is Output.WIDE), refresh=True)
            return
        while True:
            if key(views) != last:
                last = key(views)
                if output in (Output.JSON, Output.YAML):
                    typer.echo(json.dumps(for_output(views), separators=(",", ":"), ensure_ascii=False))
                else:
                    shown.print(render(views, output is Output.WIDE))
            if expired():
                return
            time.sleep(period)
            views = fetch()
    except KeyboardInterrupt:
        return


def node(
    node_id: Annotated[str, typer.Argument(help="The node id (its certificate CN).")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """One node: reported state, health history, recent commands and acks."""
    with controller_client(target(controller, certs, identity)) as client:
        detail: NodeDetail = client.get(f"/v1/nodes/{segment(node_id)}", NodeDetail)
    show(output, detail, lambda _wide: node_detail(detail))


def label(
    node_id: Annotated[str, typer.Argument(help="The node id.")],
    changes: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE sets an operator label, KEY- removes one.", metavar="LABEL...")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Set or remove a node's operator labels (KEY=VALUE, KEY-); they win over the labels it reports."""
    try:
        body = parse_label_changes(changes or [])
    except BadRequest as exc:
        fail(str(exc))
    with controller_client(target(controller, certs, identity)) as client:
        path = f"/v1/nodes/{segment(node_id)}"
        view: NodeView = client.patch(f"{path}/labels", NodeView, body) if body else client.get(path, NodeDetail).node
    if output in (Output.JSON, Output.YAML):
        print_data(output, view)
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("node", view.id)
    facts.add_row("labels", labels_text(view.operator_labels))
    facts.add_row("reported labels", labels_text(_reported(view)))
    facts.add_row("effective labels", labels_text(view.labels))
    console().print(facts)


# ---- commands ----------------------------------------------------------------------------------


def send(
    words: Annotated[
        list[str],
        typer.Argument(help="NODE ACTION, or ACTION alone with --selector (e.g. restart).", metavar="[NODE] ACTION"),
    ],
    selector: SelectorOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --selector: send without asking.")] = False,
    args: Annotated[
        list[str] | None, typer.Option("--arg", help="KEY=VALUE (string) or KEY:=JSON; repeatable.")
    ] = None,
    wait: Annotated[
        str, typer.Option("--wait", help="Wait this long for a terminal ack (30, 30s, 2m), printing the trail.")
    ] = "0",
    expires_in: Annotated[str, typer.Option("--expires-in", help="Give up delivering after this long.")] = "1h",
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Send a command to a node (or to every node --selector matches, after a confirmation); with --wait, follow the ack trail (exit 1 if it fails or times out)."""  # noqa: E501 - one line: `fleet --help` lists it
    if selector is None and len(words) != 2:
        fail("expected NODE ACTION (or ACTION with --selector)")
    if selector is not None and len(words) != 1:
        fail("with --selector give the ACTION only (the selector picks the nodes)")
    check_label_selector("--selector", selector)
    action = words[-1]
    body = {"action": action, "args": parse_args(args), "expires_in": parse_duration("--expires-in", expires_in)}
    wait_seconds = parse_duration("--wait", wait)
    machine = output in (Output.JSON, Output.YAML)
    with controller_client(target(controller, certs, identity)) as client:
        if selector is None:
            command: CommandView = client.post(
                f"/v1/nodes/{segment(words[0])}/commands", CommandView, body, idempotent=True
            )
            if not machine:
                typer.echo(f"command {command.id} ({command.action}) sent to {command.node}")
            if wait_seconds > 0:
                command = _follow(client, command, wait_seconds, echo=not machine)
            if machine:
                print_data(output, command)
            if wait_seconds > 0:
                _exit_for([command], wait_seconds)
            return
        sent = _send_many(client, selector, action, body, yes=yes, echo=not machine)
        if wait_seconds > 0:
            deadline = time.monotonic() + wait_seconds
            sent = [_follow(client, command, max(deadline - time.monotonic(), 0.0), echo=False) for command in sent]
        show(output, sent, lambda _wide: commands_table(sent, title=f"{len(sent)} commands"))
        if wait_seconds > 0:
            _exit_for(sent, wait_seconds)


def _send_many(
    client: ControllerClient, selector: str, action: str, body: dict[str, Any], *, yes: bool, echo: bool
) -> list[CommandView]:
    targets = client.all_pages("/v1/nodes", NodeView, {"selector": selector})
    if not targets:
        fail(f"--selector {selector!r} matches no node")
    more = f" and {len(targets) - 10} more" if len(targets) > 10 else ""
    names = ", ".join(view.id for view in targets[:10]) + more
    if not yes:
        if not sys.stdin.isatty():
            fail(f"{action} would go to {len(targets)} nodes ({names}); add --yes to send without asking")
        if not typer.confirm(f"send {action} to {len(targets)} nodes ({names})?", default=False, err=True):
            typer.echo("nothing sent", err=True)
            raise typer.Exit(code=EXIT_FAILED)
    sent: list[CommandView] = []
    refused: list[str] = []
    for view in targets:
        answer = client.try_call("POST", f"/v1/nodes/{segment(view.id)}/commands", CommandView, body)
        if isinstance(answer, ApiError):
            refused.append(f"{view.id}: {answer.reason}")
            if exit_code_for(answer.status) == 3:  # refused credentials: the rest would be refused too
                break
        else:
            sent.append(answer)
    if echo:
        typer.echo(f"{action} sent to {len(sent)} of {len(targets)} nodes", err=True)
    for line in refused:
        typer.echo(f"fleet: not sent to {line}", err=True)
    if refused and not sent:
        raise typer.Exit(code=EXIT_FAILED)
    return sent


def _follow(client: ControllerClient, command: CommandView, timeout: float, *, echo: bool) -> CommandView:
    """Poll the command until a terminal ack or ``timeout``, printing each new ack as it appears."""
    deadline = time.monotonic() + timeout
    shown = 0
    while True:
        if echo:
            for ack in command.acks[shown:]:
                typer.echo(f"  {clock(ack.ts)}  {ack.status}" + (f"  {ack.detail}" if ack.detail else ""))
        shown = len(command.acks)
        remaining = deadline - time.monotonic()
        if command.status in TERMINAL_ACKS or remaining <= 0:
            return command
        time.sleep(min(POLL_INTERVAL, remaining))
        command = client.get(f"/v1/commands/{segment(command.id)}", CommandView)


def _exit_for(commands: list[CommandView], waited: float) -> None:
    # Exit 1, not 2: the request was fine, the outcome was not (2 is reserved for bad input).
    failed = False
    for command in commands:
        if command.status in SUCCESSFUL_ACKS:
            continue
        failed = True
        if command.status in TERMINAL_ACKS:
            typer.echo(f"fleet: command {command.id} {command.status} on {command.node}", err=True)
        else:
            typer.echo(
                f"fleet: no terminal ack for command {command.id} within {waited:g}s ({command.status})", err=True
            )
    if failed:
        raise typer.Exit(code=EXIT_FAILED)


def cancel(
    command_id: Annotated[str, typer.Argument(help="The command id (from fleet send or fleet node).", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Cancel a pending command: the controller stops resending it (exit 1 once it was acknowledged)."""
    with controller_client(target(controller, certs, identity)) as client:
        command: CommandView = client.post(f"/v1/commands/{segment(command_id)}/cancel", CommandView)
    show(output, command, lambda _wide: commands_table([command], title="cancelled"))


# ---- rollouts ----------------------------------------------------------------------------------

rollout_app = typer.Typer(no_args_is_help=True, help="Staged, health-gated rollouts.")


@rollout_app.command("start")
def rollout_start(
    release: Annotated[str, typer.Argument(help="name@version in the release store.")],
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="Label equality, e.g. ring=canary,site=plant-3.")
    ] = None,
    waves: Annotated[
        str, typer.Option("--waves", help="Cumulative wave sizes: percentages or counts.")
    ] = "1%,25%,100%",
    soak: Annotated[str, typer.Option("--soak", help="How long a node must stay healthy on the release.")] = "2m",
    wave_timeout: Annotated[str, typer.Option("--wave-timeout", help="Time budget of one wave.")] = "30m",
    max_failures: Annotated[str, typer.Option("--max-failures", help="Abort at this many failures (5% or 3).")] = "5%",
    health_timeout: Annotated[
        str, typer.Option("--health-timeout", help="Health silence after the update that counts as failure.")
    ] = "90s",
    min_finished: Annotated[
        int, typer.Option("--min-finished", min=1, help="Finished nodes before a percentage threshold applies.")
    ] = 1,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print which nodes land in which wave; start nothing.")
    ] = False,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Start a rollout of RELEASE to the nodes matching --selector."""
    try:
        request = RolloutRequest(
            release=release,
            selector=parse_selector("--selector", selector),
            waves=parse_list("--waves", waves),
            soak=parse_duration("--soak", soak),
            wave_timeout=parse_duration("--wave-timeout", wave_timeout),
            health_timeout=parse_duration("--health-timeout", health_timeout),
            max_failures=check_threshold("--max-failures", max_failures),
            min_finished=min_finished,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}")
    body = request.model_dump(mode="json")
    with controller_client(target(controller, certs, identity)) as client:
        if dry_run:
            plan: RolloutPlan = client.post("/v1/rollouts/plan", RolloutPlan, body)
            show(output, plan, lambda _wide: plan_text(plan))
            return
        view: RolloutView = client.post("/v1/rollouts", RolloutView, body, idempotent=True)
    show(output, view, lambda wide: rollout_status(view, wide=wide))


def plan_text(plan: RolloutPlan) -> Group:
    parts: list[RenderableType] = [
        Text(f"dry run: {plan.release} to {plan.nodes} nodes (selector {labels_text(plan.selector)}), nothing started")
    ]
    table = Table("WAVE", "NODES", "WHICH", box=None)
    canaries = set(plan.canaries)
    for wave in plan.waves:
        names = ", ".join(f"{node} (canary)" if node in canaries else node for node in wave.nodes)
        table.add_row(str(wave.number), str(len(wave.nodes)), names)
    parts.append(table)
    parts.append(Text(plan.note, style="dim"))
    if plan.conflicts:
        parts.append(Text(f"would be refused: active rollouts {', '.join(plan.conflicts)} target these nodes", "red"))
    return Group(*parts)


@rollout_app.command("status")
def rollout_status_cmd(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until the rollout ends: exit 0 succeeded, 1 aborted.")
    ] = False,
    interval: Annotated[str, typer.Option("--interval", help="Refresh interval with --watch.")] = "1s",
    timeout: Annotated[
        str | None, typer.Option("--timeout", help="With --watch: give up after this long (exit 1).")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Progress per wave: succeeded / failed / unreachable / pending; who started, paused, resumed or aborted it."""
    period = max(parse_duration("--interval", interval), 0.05)
    deadline = None if timeout is None else time.monotonic() + parse_duration("--timeout", timeout)
    path = f"/v1/rollouts/{segment(rollout_id)}"
    with controller_client(target(controller, certs, identity)) as client:
        view: RolloutView = client.get(path, RolloutView)
        if not watch:
            show(output, view, lambda wide: rollout_status(view, wide=wide))
            return
        if output in (Output.JSON, Output.YAML):
            view = _watch_lines(client, path, view, period, deadline)
        else:
            view = _watch_table(client, path, view, period, deadline, wide=output is Output.WIDE)
    _exit_for_rollout(view)


def _exit_for_rollout(view: RolloutView) -> None:
    if view.state is RolloutState.SUCCEEDED:
        return
    if view.state is RolloutState.ABORTED:
        typer.echo(f"fleet: rollout {view.id} aborted" + (f": {view.detail}" if view.detail else ""), err=True)
    else:
        typer.echo(f"fleet: rollout {view.id} still {view.state.value} at the --timeout", err=True)
    raise typer.Exit(code=EXIT_FAILED)


def _snapshot(view: RolloutView) -> dict[str, Any]:
    """What a watcher cares about: everything but the ``updated`` timestamp."""
    return view.model_dump(mode="json", exclude={"updated"})


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _watch_lines(
    client: ControllerClient, path: str, view: RolloutView, period: float, deadline: float | None
) -> RolloutView:
    """One compact JSON line per change, so a script can follow the rollout line by line."""
    last: dict[str, Any] | None = None
    while True:
        current = _snapshot(view)
        if current != last:
            typer.echo(json.dumps(for_output(view), separators=(",", ":"), ensure_ascii=False))
            last = current
        if view.state in TERMINAL_ROLLOUTS or _expired(deadline):
            return view
        time.sleep(period)
        view = client.get(path, RolloutView)


def _watch_table(
    client: ControllerClient, path: str, view: RolloutView, period: float, deadline: float | None, *, wide: bool
) -> RolloutView:
    shown = console()
    if not shown.is_terminal:
        # No cursor control in a pipe or log: print each changed snapshot instead of redrawing.
        last: dict[str, Any] | None = None
        while True:
            if _snapshot(view) != last:
                shown.print(rollout_status(view, wide=wide))
                last = _snapshot(view)
            if view.state in TERMINAL_ROLLOUTS or _expired(deadline):
                return view
            time.sleep(period)
            view = client.get(path, RolloutView)
    with Live(rollout_status(view, wide=wide), console=shown, auto_refresh=False) as live:
        while view.state not in TERMINAL_ROLLOUTS and not _expired(deadline):
            time.sleep(period)
            view = client.get(path, RolloutView)
            live.update(rollout_status(view, wide=wide), refresh=True)
    return view


def _transition(
    action: str, rollout_id: str, controller: str, certs: Path | None, identity: str | None, output: Output
) -> None:
    with controller_client(target(controller, certs, identity)) as client:
        view: RolloutView = client.post(f"/v1/rollouts/{segment(rollout_id)}/{action}", RolloutView)
    show(output, view, lambda wide: rollout_status(view, wide=wide))


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Stop starting new nodes; nodes already updating carry on."""
    _transition("pause", rollout_id, controller, certs, identity, output)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Continue a paused rollout where it stopped."""
    _transition("resume", rollout_id, controller, certs, identity, output)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """Abort and roll every touched node back to the baseline release."""
    _transition("abort", rollout_id, controller, certs, identity, output)


@rollout_app.command("ls")
def rollout_ls(
    state: Annotated[
        RolloutState | None, typer.Option("--state", case_sensitive=False, help="Only rollouts in this state.")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    certs: CertsOption = None,
    identity: IdentityOption = None,
    output: OutputOption = Output.TABLE,
) -> None:
    """All rollouts, oldest first."""
    params = {"state": state.value} if state is not None else None
    with controller_client(target(controller, certs, identity)) as client:
        views = client.all_pages("/v1/rollouts", RolloutView, params)
    show(output, views, lambda wide: rollouts_table(views, wide=wide))
