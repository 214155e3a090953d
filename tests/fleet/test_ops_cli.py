"""The operator CLI against a real HTTP server (the in-memory controller), and ``fleet watch`` on a real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import typer
from typer.testing import CliRunner, Result

from fleet.cli import ops_cmd, watch_cmd
from fleet.controller.api import create_app, serve_in_thread
from tests.conftest import Pki, free_port
from tests.fleet.test_api import MemoryController
from tests.mqtt import Endpoint, connected

pytestmark = pytest.mark.timeout(30)


def cli() -> typer.Typer:
    """The commands mounted as the lead mounts them on ``fleet``."""
    app = typer.Typer()
    app.command("nodes")(ops_cmd.nodes)
    app.command("node")(ops_cmd.node)
    app.command("label")(ops_cmd.label)
    app.command("send")(ops_cmd.send)
    app.command("watch")(watch_cmd.watch)
    app.add_typer(ops_cmd.rollout_app, name="rollout")
    return app


@pytest.fixture
def controller(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = serve_in_thread(create_app(MemoryController()), "127.0.0.1", 0)
    monkeypatch.setenv("FLEET_CONTROLLER", server.url)
    try:
        yield server.url
    finally:
        server.stop()


def run(*args: str) -> Result:
    return CliRunner().invoke(cli(), list(args))


def ok(*args: str) -> Result:
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


# ---- nodes ----


def test_nodes_table_and_json(controller: str) -> None:
    table = ok("nodes").stdout
    assert "3 nodes" in table
    for expected in ("gw-0001", "online", "1.1.0", "healthy", "ring=canary,site=plant-3", "gw-0003", "offline"):
        assert expected in table
    data = json.loads(ok("nodes", "--selector", "site=plant-3", "-o", "json").stdout)
    assert [node["id"] for node in data] == ["gw-0001", "gw-0002"]


def test_node_detail(controller: str) -> None:
    out = ok("node", "gw-0001").stdout
    assert "gw-0001" in out and "all checks passed" in out and "health history" in out
    assert json.loads(ok("node", "gw-0001", "-o", "json").stdout)["node"]["labels"]["ring"] == "canary"


def test_label_sets_and_removes_operator_labels_shown_apart_from_reported_ones(controller: str) -> None:
    out = ok("label", "gw-0002", "ring=canary", "owner=team-a").stdout
    assert "ring=canary" in out and "ring=main" in out  # operator and reported, each on its own line
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert lines["labels"].split()[-1] == "owner=team-a,ring=canary"
    shown = json.loads(ok("label", "gw-0002", "owner-", "-o", "json").stdout)
    assert shown["operator_labels"] == {"ring": "canary"}
    assert shown["reported_labels"] == {"ring": "main", "site": "plant-3"}
    assert shown["labels"] == {"ring": "canary", "site": "plant-3"}
    assert json.loads(ok("label", "gw-0002", "-o", "json").stdout) == shown  # no change: shows the labels
    table = ok("nodes").stdout
    assert "REPORTED LABELS" in table
    row = next(line for line in table.splitlines() if line.split()[:1] == ["gw-0002"])
    assert "ring=canary " in row and row.rstrip().endswith("ring=main,site=plant-3")
    detail = ok("node", "gw-0002").stdout
    assert "reported labels" in detail and "effective labels" in detail


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("gw-0002", "ring"), "fleet: error: label 'ring': expected KEY=VALUE to set or KEY- to remove\n"),
        (("gw-0002", "=x"), "fleet: error: label '=x': expected KEY=VALUE to set or KEY- to remove\n"),
        (("gw-0002", "ring=can ary"), "fleet: error: label ring='can ary': the value must be 1-128 characters"),
        (("gw-9999", "ring=canary"), "fleet: error: no node 'gw-9999'\n"),
    ],
)
def test_label_errors_are_one_line_with_exit_2(controller: str, args: tuple[str, ...], error: str) -> None:
    result = run("label", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(error)


def test_send_wait_prints_the_ack_trail(controller: str) -> None:
    result = ok("send", "gw-0001", "restart", "--arg", "reason=test", "--arg", "delay:=1", "--wait", "5s")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("command cmd-") and lines[0].endswith("(restart) sent to gw-0001")
    assert [line.split()[1] for line in lines[1:]] == ["accepted", "done"]
    assert "restarting in 1s" in lines[1]
    as_json = json.loads(ok("send", "gw-0002", "ping", "--wait", "5", "-o", "json").stdout)
    assert as_json["status"] == "done" and [ack["status"] for ack in as_json["acks"]] == ["accepted", "done"]
    sent = json.loads(ok("node", "gw-0001", "-o", "json").stdout)["commands"][0]
    assert sent["args"] == {"reason": "test", "delay": 1}


def test_send_wait_without_terminal_ack_exits_1(controller: str) -> None:
    result = run("send", "gw-0003", "ping", "--wait", "0.5")  # offline: never acknowledges
    assert result.exit_code == 1
    assert result.stderr.startswith("fleet: no terminal ack for command cmd-") and "(pending)" in result.stderr


def test_rollout_start_status_pause_resume_abort(controller: str) -> None:
    args = ("--selector", "site=plant-3", "--waves", "50%,100%", "--soak", "0", "--wave-timeout", "5m")
    started = json.loads(ok("rollout", "start", "app@1.2.0", *args, "--health-timeout", "90s", "-o", "json").stdout)
    rid = started["id"]
    assert started["state"] == "running" and started["selector"] == {"site": "plant-3"}
    assert rid in ok("rollout", "ls").stdout
    assert "paused" in ok("rollout", "pause", rid).stdout
    status = ok("rollout", "status", rid).stdout
    assert f"rollout {rid}" in status and "paused" in status and "SUCCEEDED" in status and "PENDING" in status
    assert "running" in ok("rollout", "resume", rid).stdout
    assert json.loads(ok("rollout", "abort", rid, "-o", "json").stdout)["state"] == "aborted"


def test_rollout_status_watch_runs_until_finished(controller: str) -> None:
    rid = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "-o", "json").stdout)["id"]
    out = ok("rollout", "status", rid, "--watch", "--interval", "0.05").stdout
    headers = [line for line in out.splitlines() if line.startswith(f"rollout {rid}")]
    assert "running" in headers[0] and "succeeded" in headers[-1]  # one snapshot per change, the last one final
    assert out.rstrip().endswith("100%")
    lines = ok("rollout", "status", rid, "--watch", "-o", "json").stdout.splitlines()
    assert json.loads(lines[-1])["state"] == "succeeded"


# ---- errors ----


def test_http_error_is_one_line_with_exit_2(controller: str) -> None:
    result = run("node", "gw-9999")
    assert result.exit_code == 2
    assert result.stderr == "fleet: error: no node 'gw-9999'\n"
    assert result.stdout == ""
    conflict = run("rollout", "resume", "ro-404")
    assert (conflict.exit_code, conflict.stderr) == (2, "fleet: error: no rollout 'ro-404'\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("rollout", "start", "app@1.2.0", "--soak", "2 minutes"), "--soak '2 minutes': expected a duration"),
        (("rollout", "start", "app@1.2.0", "--waves", "1%,lots"), "--waves 'lots': expected a percentage"),
        (("rollout", "start", "app@1.2.0", "--selector", "ring"), "--selector 'ring': expected key=value"),
        (("send", "gw-0001", "restart", "--arg", "delay:=soon"), "--arg 'delay:=soon': value is not JSON"),
        (("rollout", "start", "app@9.9.9"), "no release 'app@9.9.9' in the store"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(controller: str, args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"fleet: error: {message}") and result.stderr.count("\n") == 1


def test_unreachable_controller_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run("nodes", "--controller", url)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"fleet: error: cannot reach the controller at {url}")


# ---- watch ----


def test_watch_prints_decoded_json_lines(embedded: Endpoint, pki: Pki) -> None:
    """Two device events, msgpack on the wire, come out as two JSON lines; --count 2 ends the watch."""
    broker = f"{embedded.host}:{embedded.port}"
    args = ["watch", "fleet/v1/nodes/gw-a/events", "--broker", broker, "--certs", str(pki.paths.root)]
    with ThreadPoolExecutor(1, thread_name_prefix="watch-cli") as pool:
        watching = pool.submit(run, *args, "--identity", "alice", "--count", "2")
        with connected(embedded, pki.device("gw-a")) as device:
            # The watch subscribes at some point after it starts: publish until it has seen two.
            seq = 0
            deadline = time.monotonic() + 15
            while not watching.done() and time.monotonic() < deadline:
                device.publish("fleet/v1/nodes/gw-a/events", msgpack.packb({"kind": "probe", "seq": seq, "ts": 1.5}))
                seq += 1
                time.sleep(0.1)
        result = watching.result(timeout=10)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    assert {line["topic"] for line in lines} == {"fleet/v1/nodes/gw-a/events"}
    assert [line["payload"]["kind"] for line in lines] == ["probe", "probe"]
    assert lines[1]["payload"]["seq"] == lines[0]["payload"]["seq"] + 1


def test_watch_format_shows_undecodable_payloads() -> None:
    shown = json.loads(watch_cmd.format_message("fleet/v1/nodes/gw-a/events", b"\xc1"))
    assert set(shown) == {"topic", "error", "size"} and shown["size"] == 1 and shown["error"]
    json_payload = json.loads(watch_cmd.format_message("t", b'{"a": [1, "x"]}'))
    assert json_payload == {"topic": "t", "payload": {"a": [1, "x"]}}


def test_watch_missing_identity_is_one_line(pki: Pki) -> None:
    result = run("watch", "#", "--broker", "127.0.0.1:1", "--certs", str(pki.paths.root), "--identity", "nobody")
    assert result.exit_code == 2
    assert "operators/nobody/cert.pem: no such file" in result.stderr and result.stderr.count("\n") == 1
