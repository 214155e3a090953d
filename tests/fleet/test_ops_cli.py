"""The operator CLI against a real HTTPS server (the in-memory controller), and ``fleet watch`` on a real broker.

The server is the API with TLS from the session PKI; the CLI authenticates with the PKI's operator
certificate (``--certs`` via FLEET_CERTS, an admin) unless a test sets FLEET_TOKEN.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import typer
import yaml
from typer.testing import CliRunner, Result

from certs import AccessRole, issue_operator
from fleet.cli import ops_cmd, token_cmd, watch_cmd
from fleet.controller.api import TlsFiles, allowed_hosts, create_app, serve_in_thread
from fleet.controller.auth import CertificateAuthenticator
from fleet.controller.logs import JsonFormatter
from tests.conftest import Pki, free_port
from tests.fleet.apisupport import Access, MemoryController, memory_access
from tests.mqtt import Endpoint, connected

pytestmark = pytest.mark.timeout(30)


def cli() -> typer.Typer:
    """The commands mounted as the lead mounts them on ``fleet``."""
    app = typer.Typer()
    app.command("nodes")(ops_cmd.nodes)
    app.command("node")(ops_cmd.node)
    app.command("label")(ops_cmd.label)
    app.command("send")(ops_cmd.send)
    app.command("cancel")(ops_cmd.cancel)
    app.command("watch")(watch_cmd.watch)
    app.command("audit")(token_cmd.audit)
    app.command("whoami")(token_cmd.whoami)
    app.add_typer(ops_cmd.rollout_app, name="rollout")
    app.add_typer(token_cmd.app, name="token")
    return app


@pytest.fixture
def memory() -> MemoryController:
    return MemoryController()


@pytest.fixture
def access(memory: MemoryController, pki: Pki) -> Access:
    tls = TlsFiles(pki.paths.server_cert, pki.paths.server_key, pki.paths.ca_cert)
    return memory_access(
        memory, certificates=CertificateAuthenticator(pki.paths), hosts=allowed_hosts("127.0.0.1", tls, [])
    )


@pytest.fixture
def controller(memory: MemoryController, access: Access, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    tls = TlsFiles(pki.paths.server_cert, pki.paths.server_key, pki.paths.ca_cert)
    server = serve_in_thread(create_app(memory, access.security), "127.0.0.1", 0, tls=tls)
    monkeypatch.setenv("FLEET_CONTROLLER", server.url)
    monkeypatch.setenv("FLEET_CERTS", str(pki.paths.root))
    monkeypatch.delenv("FLEET_TOKEN", raising=False)
    monkeypatch.delenv("FLEET_IDENTITY", raising=False)
    try:
        yield server.url
    finally:
        server.stop()


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli(), list(args), input=stdin)


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


def test_nodes_wide_yaml_filters_and_kubectl_selectors(controller: str) -> None:
    wide = ok("nodes", "-o", "wide").stdout
    assert "UPDATE STATE" in wide and "MEM FREE" in wide and "22.7 GiB" in wide and "1m 9s" in wide
    as_yaml = yaml.safe_load(ok("nodes", "-l", "ring notin (canary)", "-o", "yaml").stdout)
    assert [node["id"] for node in as_yaml] == ["gw-0002", "gw-0003"]
    assert as_yaml[0]["last_seen"].endswith("Z") and "T" in as_yaml[0]["last_seen"]  # ISO-8601
    assert [n["id"] for n in json.loads(ok("nodes", "--status", "offline", "-o", "json").stdout)] == ["gw-0003"]
    assert json.loads(ok("nodes", "-l", "!ring", "-o", "json").stdout) == []


def test_nodes_watch_prints_each_change_until_the_timeout(controller: str) -> None:
    lines = ok("nodes", "--watch", "--interval", "0.05", "--timeout", "0.3", "-o", "json").stdout.splitlines()
    assert len(lines) == 1  # nothing changed: one snapshot
    assert [node["id"] for node in json.loads(lines[0])] == ["gw-0001", "gw-0002", "gw-0003"]


def test_node_detail_events_health_transitions_and_human_heartbeat(controller: str) -> None:
    out = ok("node", "gw-0001").stdout
    assert "gw-0001" in out and "all checks passed" in out and "health history (transitions)" in out
    transitions = [line.split() for line in out.splitlines() if line.strip().endswith(("http: 500", "passed"))]
    assert [row[1:3] for row in transitions] == [["unhealthy", "1"], ["healthy", "1"]]
    assert any(line.split()[1:3] == ["healthy", "2"] for line in out.splitlines() if line.strip())  # the first run
    assert "update.downloading" in out and "update.installed" in out and "update events" in out
    assert "uptime 1m 9s, cpu 3.2%, mem free 22.7 GiB, disk free 2.0 GiB, latency 3 ms, seq 7" in out
    assert "mem_free=" not in out
    detail = json.loads(ok("node", "gw-0001", "-o", "json").stdout)
    assert detail["node"]["labels"]["ring"] == "canary"
    assert detail["events"][0]["ts"].endswith("Z")


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


def test_send_to_a_selector_asks_first_unless_yes(controller: str, memory: MemoryController) -> None:
    refused = run("send", "-l", "site=plant-3", "restart")  # no terminal to ask on
    assert refused.exit_code == 2 and "would go to 2 nodes (gw-0001, gw-0002); add --yes" in refused.stderr
    declined = run("send", "-l", "site=plant-3", "restart", stdin="n\n")
    assert declined.exit_code in (1, 2) and memory.sent == 0
    sent = json.loads(ok("send", "-l", "site=plant-3", "ping", "--yes", "--wait", "5s", "-o", "json").stdout)
    assert sorted(command["node"] for command in sent) == ["gw-0001", "gw-0002"]
    assert {command["status"] for command in sent} == {"done"} and memory.sent == 2
    nothing = run("send", "-l", "site=mars", "ping", "--yes")
    assert nothing.exit_code == 2 and "matches no node" in nothing.stderr
    assert run("send", "gw-0001").exit_code == 2  # NODE without ACTION
    assert run("send", "-l", "site=plant-3", "gw-0001", "ping").exit_code == 2


def test_cancel_a_pending_command(controller: str) -> None:
    sent = json.loads(ok("send", "gw-0003", "ping", "-o", "json").stdout)
    assert json.loads(ok("cancel", sent["id"], "-o", "json").stdout)["status"] == "cancelled"
    again = run("cancel", sent["id"])
    assert again.exit_code == 1 and "only a pending command can be cancelled" in again.stderr


def test_rollout_start_status_pause_resume_abort(controller: str) -> None:
    args = ("--selector", "site=plant-3", "--waves", "50%,100%", "--soak", "0", "--wave-timeout", "5m")
    started = json.loads(ok("rollout", "start", "app@1.2.0", *args, "--health-timeout", "90s", "-o", "json").stdout)
    rid = started["id"]
    assert started["state"] == "running" and started["selector"] == {"site": "plant-3"}
    assert started["created"].endswith("Z")
    assert rid in ok("rollout", "ls").stdout
    assert "paused" in ok("rollout", "pause", rid).stdout
    status = ok("rollout", "status", rid).stdout
    assert f"rollout {rid}" in status and "paused" in status and "SUCCEEDED" in status and "PENDING" in status
    assert "started by operator (certificate)" in status and "paused by operator (certificate)" in status
    assert "running" in ok("rollout", "resume", rid).stdout
    assert json.loads(ok("rollout", "abort", rid, "-o", "json").stdout)["state"] == "aborted"
    assert rid in ok("rollout", "ls", "--state", "aborted").stdout
    assert rid not in ok("rollout", "ls", "--state", "running").stdout


def test_rollout_dry_run_prints_the_waves_and_starts_nothing(controller: str, memory: MemoryController) -> None:
    out = ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "--dry-run").stdout
    assert "dry run" in out and "nothing started" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])}
    assert "gw-0001 (canary)" in rows["1"] and "gw-0002" in rows["2"]
    assert memory.rollouts() == []
    plan = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "--dry-run", "-o", "json").stdout)
    assert [wave["nodes"] for wave in plan["waves"]] == [["gw-0001"], ["gw-0002"]]


def test_rollout_status_watch_runs_until_finished(controller: str) -> None:
    rid = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "-o", "json").stdout)["id"]
    out = ok("rollout", "status", rid, "--watch", "--interval", "0.05").stdout
    headers = [line for line in out.splitlines() if line.startswith(f"rollout {rid}")]
    assert "running" in headers[0] and "succeeded" in headers[-1]  # one snapshot per change, the last one final
    assert "100%" in out
    lines = ok("rollout", "status", rid, "--watch", "-o", "json").stdout.splitlines()
    assert json.loads(lines[-1])["state"] == "succeeded"


def test_rollout_status_watch_exits_1_on_abort_and_on_timeout(controller: str) -> None:
    rid = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "-o", "json").stdout)["id"]
    ok("rollout", "pause", rid)
    timed_out = run("rollout", "status", rid, "--watch", "--interval", "0.05", "--timeout", "0.3")
    assert timed_out.exit_code == 1 and f"rollout {rid} still paused at the --timeout" in timed_out.stderr
    ok("rollout", "abort", rid)
    aborted = run("rollout", "status", rid, "--watch", "-o", "json")
    assert aborted.exit_code == 1
    assert aborted.stderr == f"fleet: rollout {rid} aborted: aborted by the operator\n"
    assert json.loads(aborted.stdout.splitlines()[-1])["state"] == "aborted"


# ---- credentials, tokens, audit ----


def test_tokens_created_used_listed_revoked_and_audited(controller: str, monkeypatch: pytest.MonkeyPatch) -> None:
    created = ok("token", "create", "ci", "--role", "operator", "--expires", "30d")
    token = created.stdout.strip()
    assert token.startswith("fleet_") and "shown this once" in created.stderr
    assert "ci" in ok("token", "ls").stdout
    monkeypatch.setenv("FLEET_TOKEN", token)
    assert ok("whoami").stdout.strip() == "ci (token, role operator)"
    rid = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "-o", "json").stdout)["id"]
    refused = run("token", "ls")  # an operator token cannot manage tokens
    assert refused.exit_code == 3 and "has role operator; this needs admin" in refused.stderr
    monkeypatch.delenv("FLEET_TOKEN")
    entries = json.loads(ok("audit", "--since", "1h", "--target", rid, "-o", "json").stdout)
    assert [(e["actor"], e["via"], e["action"], e["outcome"]) for e in entries] == [
        ("ci", "token", "start_rollout", "ok")
    ]
    assert "create_token" in ok("audit", "--action", "create_token").stdout
    assert json.loads(ok("token", "revoke", "ci", "-o", "json").stdout)["revoked_at"].endswith("Z")
    time.sleep(1.1)  # the token table is re-read at most once a second
    monkeypatch.setenv("FLEET_TOKEN", token)
    gone = run("nodes")
    assert gone.exit_code == 3 and "token 'ci' was revoked" in gone.stderr


def test_a_viewer_certificate_may_read_but_not_write(controller: str, pki: Pki, memory: MemoryController) -> None:
    if not pki.paths.operator("cli-viewer").cert.exists():
        issue_operator(pki.paths, "cli-viewer", access=AccessRole.VIEWER)
    assert "3 nodes" in ok("nodes", "--identity", "cli-viewer").stdout
    refused = run("send", "gw-0001", "restart", "--identity", "cli-viewer")
    assert refused.exit_code == 3
    assert refused.stderr == "fleet: error: certificate 'cli-viewer' has role viewer; this needs operator\n"
    assert memory.sent == 0
    missing = run("nodes", "--identity", "nobody")
    assert missing.exit_code == 2 and "operators/nobody/cert.pem: no such file" in missing.stderr


def test_no_credentials_a_bad_token_and_an_untrusted_server_exit_3(
    controller: str, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_only = tmp_path / "ca-only"  # what a CI machine holds: the CA, no operator certificate
    ca_only.mkdir()
    shutil.copy(pki.paths.ca_cert, ca_only / "ca.pem")
    nobody = run("nodes", "--certs", str(ca_only))
    assert nobody.exit_code == 3 and "no credentials" in nobody.stderr and "set FLEET_TOKEN" in nobody.stderr
    monkeypatch.setenv("FLEET_TOKEN", "fleet_0123456789abcdef_" + "A" * 43)
    wrong = run("nodes", "--certs", str(ca_only))
    assert (wrong.exit_code, wrong.stderr.split(" (")[0]) == (3, "fleet: error: unknown token")
    monkeypatch.delenv("FLEET_CERTS")
    untrusted = run("nodes")  # the system trust store does not know the fleet CA
    assert untrusted.exit_code == 3 and "certificate is not trusted" in untrusted.stderr


# ---- errors ----


def test_http_error_is_one_line_with_its_exit_code(controller: str) -> None:
    result = run("node", "gw-9999")
    assert result.exit_code == 2
    assert result.stderr == "fleet: error: no node 'gw-9999'\n"
    assert result.stdout == ""
    missing = run("rollout", "resume", "ro-404")
    assert (missing.exit_code, missing.stderr) == (2, "fleet: error: no rollout 'ro-404'\n")
    rid = json.loads(ok("rollout", "start", "app@1.2.0", "-l", "site=plant-3", "-o", "json").stdout)["id"]
    conflict = run("rollout", "resume", rid)  # running: a conflict with its state, so the operation failed
    assert conflict.exit_code == 1 and "cannot go to running" in conflict.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("rollout", "start", "app@1.2.0", "--soak", "2 minutes"), "--soak '2 minutes': expected a duration"),
        (("rollout", "start", "app@1.2.0", "--waves", "1%,lots"), "--waves 'lots': expected a percentage"),
        (("rollout", "start", "app@1.2.0", "--selector", "ring"), "--selector 'ring': expected key=value"),
        (("send", "gw-0001", "restart", "--arg", "delay:=soon"), "--arg 'delay:=soon': value is not JSON"),
        (("nodes", "-l", "ring in (a"), "--selector 'ring in (a': '(' without ')'"),
        (("rollout", "start", "app@9.9.9"), "no release 'app@9.9.9' in the store"),
        (("audit", "--since", "last week"), "--since 'last week': expected a duration ago"),
    ],
)
def test_bad_input_is_one_line_with_exit_2(controller: str, args: tuple[str, ...], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"fleet: error: {message}") and result.stderr.count("\n") == 1


def test_unreachable_controller_names_the_url_and_exits_3() -> None:
    url = f"https://127.0.0.1:{free_port()}"
    result = run("nodes", "--controller", url)
    assert result.exit_code == 3
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


# ---- the fleet entry point: version, completion, help ----


def fleet_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'fleet'\nfrom fleet.cli import main; main()", *args],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb", **(env or {})},
    )  # fmt: skip


def test_version_completion_and_exit_codes_in_help() -> None:
    version = fleet_process("--version")
    assert version.returncode == 0 and re.fullmatch(r"fleet \d+\.\d+\.\d+\S*\n", version.stdout)
    completion = {"_FLEET_COMPLETE": "complete_bash", "COMP_WORDS": "fleet rollout st", "COMP_CWORD": "2"}
    completed = fleet_process(env=completion)
    assert completed.returncode == 0 and {"start", "status"} <= set(completed.stdout.split()), completed
    options = fleet_process(env={**completion, "COMP_WORDS": "fleet nodes --", "COMP_CWORD": "2"})
    assert {"--selector", "--watch", "--output"} <= set(options.stdout.split()), options
    shown = fleet_process("--help").stdout
    assert "--install-completion" in shown and "Exit codes: 0 success; 1 the operation failed" in shown
    assert "3 controller unreachable or credentials refused" in " ".join(shown.split())


def test_controller_json_logs_carry_the_agents_fields() -> None:
    handler_output = io.StringIO()
    record = logging.LogRecord("fleet.controller.api", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    handler = logging.StreamHandler(handler_output)
    handler.setFormatter(JsonFormatter())
    handler.emit(record)
    line = json.loads(handler_output.getvalue())
    assert line == {"ts": round(record.created, 3), "level": "warning", "logger": "fleet.controller.api", "msg": "a b"}
