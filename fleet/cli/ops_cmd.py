"""Operator commands that talk to the controller's HTTP API: nodes, node, label, send and ``rollout ...``.

Each command is one or two HTTP requests (httpx, bounded timeouts) whose JSON answers are parsed
back into the facade's view models, then shown as rich tables for people or as JSON for scripts
(``-o json``). Every failure is one line and exit code 2: HTTP errors print the controller's own
reason, an unreachable controller names the URL.

This module deliberately does not import ``fleet.controller.api``: the CLI should not pay for FastAPI.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import httpx
import typer
from pydantic import BaseModel, TypeAdapter, ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleet.cli import fail
from fleet.controller.facade import (
    BadRequest,
    CommandView,
    NodeDetail,
    NodeOutcome,
    NodeView,
    RolloutRequest,
    RolloutState,
    RolloutView,
    WaveView,
    parse_label_changes,
)
from fleet.controller.facade import parse_selector as facade_parse_selector

T = TypeVar("T")

DEFAULT_CONTROLLER = "http://127.0.0.1:8080"
TERMINAL_ACKS = frozenset({"done", "failed", "rejected", "duplicate", "expired"})
SUCCESSFUL_ACKS = frozenset({"done", "duplicate"})  # duplicate: the agent had already executed it
TERMINAL_ROLLOUTS = frozenset({RolloutState.ABORTED, RolloutState.SUCCEEDED})
POLL_INTERVAL = 0.2
HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

_DURATION = re.compile(r"(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_THRESHOLD = re.compile(r"\d+(?:\.\d+)?%|\d+")


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


ControllerOption = Annotated[
    str,
    typer.Option("--controller", envvar="FLEET_CONTROLLER", help="Controller HTTP API URL.", metavar="URL"),
]
OutputOption = Annotated[
    Output, typer.Option("-o", "--output", case_sensitive=False, help="table for people, json for scripts.")
]


# ---- parsing of options ------------------------------------------------------------------------


def parse_duration(option: str, value: str) -> float:
    """``90s``, ``2m``, ``1h``, ``500ms`` or plain seconds; anything else is a one-line error naming the option."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        fail(f"{option} {value!r}: expected a duration like 90s, 2m, 1h or plain seconds")
    return float(match.group("amount")) * _UNIT_SECONDS[match.group("unit")]


def parse_selector(option: str, text: str | None) -> dict[str, str]:
    try:
        return facade_parse_selector(text, what=option)
    except BadRequest as exc:
        fail(str(exc))


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


# ---- HTTP --------------------------------------------------------------------------------------


class ControllerClient:
    """The controller's HTTP API; every failure ends the command with one line and exit code 2."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            self._http = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT)
        except (httpx.InvalidURL, ValueError) as exc:
            fail(f"--controller {url!r}: not a URL ({exc})")

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, model: type[T], params: dict[str, str] | None = None) -> T:
        return self._call("GET", path, model, params=params)

    def post(self, path: str, model: type[T], body: dict[str, Any] | None = None) -> T:
        return self._call("POST", path, model, body=body)

    def patch(self, path: str, model: type[T], body: dict[str, Any]) -> T:
        return self._call("PATCH", path, model, body=body)

    def _call(
        self,
        method: str,
        path: str,
        model: type[T],
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> T:
        response = self._send(method, path, params, body)
        if response.is_error:
            fail(_error_reason(response))
        try:
            return TypeAdapter(model).validate_json(response.content)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            fail(f"unexpected answer from {self.url}{path}: {where}: {first['msg']}")

    def _send(
        self, method: str, path: str, params: dict[str, str] | None, body: dict[str, Any] | None
    ) -> httpx.Response:
        try:
            return self._http.request(method, path, params=params, json=body)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            fail(f"--controller {self.url!r}: not an http(s) URL ({exc})")
        except httpx.TimeoutException:
            fail(f"controller at {self.url} did not answer within {HTTP_TIMEOUT.read:.0f}s")
        except httpx.ConnectError as exc:
            fail(f"cannot reach the controller at {self.url}: {exc} (set --controller or FLEET_CONTROLLER)")
        except httpx.HTTPError as exc:
            fail(f"controller at {self.url}: {type(exc).__name__}: {exc}")


def _error_reason(response: httpx.Response) -> str:
    """The controller's ``{"error": ...}``, or the start of whatever else answered (a proxy, say)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return " ".join(body["error"].split())
    text = " ".join(response.text.split())[:200]
    return f"HTTP {response.status_code} from {response.request.url}" + (f": {text}" if text else "")


@contextmanager
def controller_client(url: str) -> Iterator[ControllerClient]:
    client = ControllerClient(url)
    try:
        yield client
    finally:
        client.close()


# ---- output ------------------------------------------------------------------------------------


def _console() -> Console:
    # Piped tables (grep, less) should not wrap at rich's default 80 columns.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=160)
    return console


def _print_json(value: BaseModel | list[Any]) -> None:
    data = TypeAdapter(type(value)).dump_python(value, mode="json")
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    seconds = max(time.time() - ts, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items())) or "-"


def _health(healthy: bool | None) -> Text:
    if healthy is None:
        return Text("-")
    return Text("healthy", style="green") if healthy else Text("unhealthy", style="red")


_STATUS_STYLE = {"online": "green", "stale": "yellow", "offline": "red"}


def _reported(view: NodeView) -> dict[str, str]:
    """The labels the node reports; from ``labels`` for a controller that does not tell them apart."""
    return view.reported_labels if view.reported_labels or view.operator_labels else view.labels


def nodes_table(nodes: list[NodeView]) -> Table:
    table = Table(
        "ID", "STATUS", "VERSION", "HEALTH", "LAST SEEN", "LABELS", "REPORTED LABELS",
        box=None, title=f"{len(nodes)} nodes",
    )  # fmt: skip
    for view in nodes:
        status = Text(view.status.value, style=_STATUS_STYLE.get(view.status.value, ""))
        table.add_row(
            view.id,
            status,
            view.version or "-",
            _health(view.healthy),
            _ago(view.last_seen),
            _labels(view.operator_labels),
            _labels(_reported(view)),
        )
    return table


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
        "last health": _ago(view.health_ts),
        "last seen": _ago(view.last_seen),
        "agent": view.agent_version or "-",
        "labels": _labels(view.operator_labels),  # the operator's: they alone decide the canary ring
        "reported labels": _labels(_reported(view)),  # the node's own word
        "effective labels": _labels(view.labels),  # reported overlaid with the operator's: selectors match these
        "heartbeat": " ".join(f"{key}={value}" for key, value in view.heartbeat.items()) or "-",
    }
    for name, value in rows.items():
        facts.add_row(name, value)
    health = Table("TIME", "HEALTH", "DETAIL", box=None, title="health history")
    for record in detail.health_history:
        health.add_row(_clock(record.ts), _health(record.healthy), record.detail or "")
    return Group(facts, Text(), health, Text(), commands_table(detail.commands))


def commands_table(commands: list[CommandView]) -> Table:
    table = Table("ID", "ACTION", "STATUS", "CREATED", "ATTEMPTS", "ACKS", box=None, title="recent commands")
    for command in commands:
        trail = " > ".join(ack.status for ack in command.acks) or "-"
        table.add_row(command.id, command.action, command.status, _ago(command.created), str(command.attempts), trail)
    return table


def _wave_counts(wave: WaveView) -> dict[str, int]:
    counts = {outcome: wave.counts.get(outcome, 0) for outcome in NodeOutcome if outcome != NodeOutcome.PENDING}
    finished = sum(counts.values())
    # Pending is derived rather than read: a controller may leave zero counts (or unstarted waves) out.
    return {"pending": max(wave.nodes - finished, 0), **{outcome.value: n for outcome, n in counts.items()}}


def rollout_status(view: RolloutView) -> Group:
    head = Text.assemble(
        (f"rollout {view.id}", "bold"),
        f"  {view.release}  ",
        (view.state.value, _ROLLOUT_STYLE.get(view.state, "")),
        f"  wave {min(view.current_wave + 1, len(view.waves))}/{len(view.waves)}",
        f"  selector {_labels(view.selector)}",
    )
    table = Table(
        "WAVE", "NODES", "SUCCEEDED", "FAILED", "UNREACHABLE", "ROLLED BACK", "PENDING", "PROGRESS", "", box=None
    )
    for wave in view.waves:
        counts = _wave_counts(wave)
        done = wave.nodes - counts["pending"]
        marker = ">" if wave.index == view.current_wave and view.state not in TERMINAL_ROLLOUTS else " "
        table.add_row(
            f"{marker}{wave.index + 1}",
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
    return Group(*parts)


_ROLLOUT_STYLE = {
    RolloutState.RUNNING: "cyan",
    RolloutState.PAUSED: "yellow",
    RolloutState.ABORTING: "red",
    RolloutState.ABORTED: "red",
    RolloutState.SUCCEEDED: "green",
}


def rollouts_table(views: list[RolloutView]) -> Table:
    table = Table("ID", "RELEASE", "STATE", "WAVE", "SELECTOR", "UPDATED", box=None, title=f"{len(views)} rollouts")
    for view in views:
        wave = f"{min(view.current_wave + 1, len(view.waves))}/{len(view.waves)}"
        state = Text(view.state.value, style=_ROLLOUT_STYLE.get(view.state, ""))
        table.add_row(view.id, view.release, state, wave, _labels(view.selector), _ago(view.updated))
    return table


def _show(output: Output, value: BaseModel | list[Any], table: RenderableType) -> None:
    if output is Output.JSON:
        _print_json(value)
    else:
        _console().print(table)


# ---- nodes and commands ------------------------------------------------------------------------


def nodes(
    selector: Annotated[
        str | None, typer.Option("--selector", "-l", help="Label equality, e.g. ring=canary,site=plant-3.")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """List nodes: id, status, version, health, last seen, labels."""
    params = {"selector": selector} if selector else None
    with controller_client(controller) as client:
        found: list[NodeView] = client.get("/nodes", list[NodeView], params=params)
    _show(output, found, nodes_table(found))


def node(
    node_id: Annotated[str, typer.Argument(help="The node id (its certificate CN).")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """One node: reported state, health history, recent commands and acks."""
    with controller_client(controller) as client:
        detail: NodeDetail = client.get(f"/nodes/{_segment(node_id)}", NodeDetail)
    _show(output, detail, node_detail(detail))


def label(
    node_id: Annotated[str, typer.Argument(help="The node id.")],
    changes: Annotated[
        list[str] | None, typer.Argument(help="KEY=VALUE sets an operator label, KEY- removes one.", metavar="LABEL...")
    ] = None,
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Set or remove a node's operator labels (KEY=VALUE, KEY-); they win over the labels it reports."""
    try:
        body = parse_label_changes(changes or [])
    except BadRequest as exc:
        fail(str(exc))
    with controller_client(controller) as client:
        path = f"/nodes/{_segment(node_id)}"
        view: NodeView = client.patch(f"{path}/labels", NodeView, body) if body else client.get(path, NodeDetail).node
    if output is Output.JSON:
        _print_json(view)
        return
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("node", view.id)
    facts.add_row("labels", _labels(view.operator_labels))
    facts.add_row("reported labels", _labels(_reported(view)))
    facts.add_row("effective labels", _labels(view.labels))
    _console().print(facts)


def send(
    node_id: Annotated[str, typer.Argument(help="The node id.")],
    action: Annotated[str, typer.Argument(help="The command, e.g. restart.")],
    args: Annotated[
        list[str] | None, typer.Option("--arg", help="KEY=VALUE (string) or KEY:=JSON; repeatable.")
    ] = None,
    wait: Annotated[
        str, typer.Option("--wait", help="Wait this long for a terminal ack (30, 30s, 2m), printing the trail.")
    ] = "0",
    expires_in: Annotated[str, typer.Option("--expires-in", help="Give up delivering after this long.")] = "1h",
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Send a command to a node; with --wait, follow its ack trail (exit 1 if it fails or times out)."""
    body = {"action": action, "args": parse_args(args), "expires_in": parse_duration("--expires-in", expires_in)}
    wait_seconds = parse_duration("--wait", wait)
    with controller_client(controller) as client:
        command: CommandView = client.post(f"/nodes/{_segment(node_id)}/commands", CommandView, body)
        if output is Output.TABLE:
            typer.echo(f"command {command.id} ({command.action}) sent to {command.node}")
        if wait_seconds > 0:
            command = _follow(client, command, wait_seconds, echo=output is Output.TABLE)
    if output is Output.JSON:
        _print_json(command)
    if wait_seconds > 0:
        _exit_for(command, wait_seconds)


def _follow(client: ControllerClient, command: CommandView, timeout: float, *, echo: bool) -> CommandView:
    """Poll the command until a terminal ack or ``timeout``, printing each new ack as it appears."""
    deadline = time.monotonic() + timeout
    shown = 0
    while True:
        if echo:
            for ack in command.acks[shown:]:
                typer.echo(f"  {_clock(ack.ts)}  {ack.status}" + (f"  {ack.detail}" if ack.detail else ""))
        shown = len(command.acks)
        remaining = deadline - time.monotonic()
        if command.status in TERMINAL_ACKS or remaining <= 0:
            return command
        time.sleep(min(POLL_INTERVAL, remaining))
        command = client.get(f"/commands/{_segment(command.id)}", CommandView)


def _exit_for(command: CommandView, waited: float) -> None:
    # Exit 1, not 2: the request was fine, the outcome was not (2 is reserved for bad input).
    if command.status in SUCCESSFUL_ACKS:
        return
    if command.status in TERMINAL_ACKS:
        typer.echo(f"fleet: command {command.id} {command.status} on {command.node}", err=True)
    else:
        typer.echo(f"fleet: no terminal ack for command {command.id} within {waited:g}s ({command.status})", err=True)
    raise typer.Exit(code=1)


def _segment(value: str) -> str:
    """An id as one URL path segment: an id with a ``/`` must not reach another route."""
    return quote(value, safe="")


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
    controller: ControllerOption = DEFAULT_CONTROLLER,
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
    with controller_client(controller) as client:
        view: RolloutView = client.post("/rollouts", RolloutView, request.model_dump(mode="json"))
    _show(output, view, rollout_status(view))


@rollout_app.command("status")
def rollout_status_cmd(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until the rollout is finished.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="Refresh interval with --watch.")] = "1s",
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Progress per wave: succeeded / failed / unreachable / pending."""
    period = max(parse_duration("--interval", interval), 0.05)
    path = f"/rollouts/{_segment(rollout_id)}"
    with controller_client(controller) as client:
        view: RolloutView = client.get(path, RolloutView)
        if not watch:
            _show(output, view, rollout_status(view))
        elif output is Output.JSON:
            _watch_json(client, path, view, period)
        else:
            _watch_table(client, path, view, period)


def _snapshot(view: RolloutView) -> dict[str, Any]:
    """What a watcher cares about: everything but the ``updated`` timestamp."""
    return view.model_dump(mode="json", exclude={"updated"})


def _watch_json(client: ControllerClient, path: str, view: RolloutView, period: float) -> None:
    """One compact JSON line per change, so a script can follow the rollout line by line."""
    last: dict[str, Any] | None = None
    while True:
        current = _snapshot(view)
        if current != last:
            typer.echo(json.dumps(view.model_dump(mode="json"), separators=(",", ":")))
            last = current
        if view.state in TERMINAL_ROLLOUTS:
            return
        time.sleep(period)
        view = client.get(path, RolloutView)


def _watch_table(client: ControllerClient, path: str, view: RolloutView, period: float) -> None:
    console = _console()
    if not console.is_terminal:
        # No cursor control in a pipe or log: print each changed snapshot instead of redrawing.
        last: dict[str, Any] | None = None
        while True:
            if _snapshot(view) != last:
                console.print(rollout_status(view))
                last = _snapshot(view)
            if view.state in TERMINAL_ROLLOUTS:
                return
            time.sleep(period)
            view = client.get(path, RolloutView)
    with Live(rollout_status(view), console=console, auto_refresh=False) as live:
        while view.state not in TERMINAL_ROLLOUTS:
            time.sleep(period)
            view = client.get(path, RolloutView)
            live.update(rollout_status(view), refresh=True)


def _transition(action: str, rollout_id: str, controller: str, output: Output) -> None:
    with controller_client(controller) as client:
        view: RolloutView = client.post(f"/rollouts/{_segment(rollout_id)}/{action}", RolloutView)
    _show(output, view, rollout_status(view))


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Stop starting new nodes; nodes already updating carry on."""
    _transition("pause", rollout_id, controller, output)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Continue a paused rollout where it stopped."""
    _transition("resume", rollout_id, controller, output)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: Annotated[str, typer.Argument(help="The rollout id.", metavar="ID")],
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """Abort and roll every touched node back to the baseline release."""
    _transition("abort", rollout_id, controller, output)


@rollout_app.command("ls")
def rollout_ls(
    controller: ControllerOption = DEFAULT_CONTROLLER,
    output: OutputOption = Output.TABLE,
) -> None:
    """All rollouts, newest state first as the controller orders them."""
    with controller_client(controller) as client:
        views: list[RolloutView] = client.get("/rollouts", list[RolloutView])
    _show(output, views, rollouts_table(views))
