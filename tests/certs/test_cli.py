"""``fleet certs`` through Typer's runner on the sub-app (``fleet.cli`` registers it at startup)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner, Result

from fleet.cli import certs_cmd
from tests.certs import load_cert


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(certs_cmd.app, [str(arg) for arg in args])


def _assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleet: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "pki"
    assert _run("init", root).exit_code == 0
    return root


def test_init_lists_what_it_wrote(tmp_path: Path) -> None:
    root = tmp_path / "pki"
    result = _run("init", root, "--san", "broker.example", "--san", "192.0.2.7", "--days", "400")
    assert result.exit_code == 0, result.output
    written = [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines()]
    assert sorted(written) == sorted(root.iterdir())
    san = load_cert(root / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker.example" in san.get_values_for_type(x509.DNSName)


def test_init_twice_is_a_one_line_error(root: Path) -> None:
    _assert_one_line_error(_run("init", root), f"{root}/ca.pem: already exists", "--force")


def test_init_force_replaces(root: Path) -> None:
    old = (root / "ca.pem").read_bytes()
    assert _run("init", root, "--force").exit_code == 0
    assert (root / "ca.pem").read_bytes() != old


def test_device_operator_controller(root: Path) -> None:
    for command, name, layout in (
        ("device", "gw-0001", "devices"),
        ("operator", "alice", "operators"),
        ("controller", "ctl-2", "controllers"),
    ):
        result = _run(command, root, name)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == [
            f"wrote {root / layout / name / 'cert.pem'}",
            f"wrote {root / layout / name / 'key.pem'}",
        ]


def test_bad_node_id_is_a_one_line_error(root: Path) -> None:
    _assert_one_line_error(_run("device", root, "gw 1"), "device name 'gw 1' is not a node id")


def test_existing_device_needs_force(root: Path) -> None:
    assert _run("device", root, "gw-0001").exit_code == 0
    _assert_one_line_error(_run("device", root, "gw-0001"), "already exists (--force replaces it)")
    assert _run("device", root, "gw-0001", "--force").exit_code == 0


def test_name_taken_by_another_role_is_a_one_line_error(root: Path) -> None:
    assert _run("operator", root, "alice").exit_code == 0
    _assert_one_line_error(_run("device", root, "alice"), "'alice' is already the name of operator identity")


def test_missing_certs_dir_is_a_one_line_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (("device", missing, "gw-1"), ("ls", missing), ("revoke", missing, "gw-1")):
        _assert_one_line_error(_run(*args), f"{missing}/ca.pem: not found (run `fleet certs init {missing}` first)")


def test_revoke_then_ls_json(root: Path) -> None:
    assert _run("device", root, "gw-0001").exit_code == 0
    serial = load_cert(root / "devices" / "gw-0001" / "cert.pem").serial_number
    revoked = _run("revoke", root, "gw-0001")
    assert revoked.exit_code == 0, revoked.output
    reported = re.search(r"\(serial ([0-9A-F]+)\)", revoked.stdout)
    assert reported is not None, revoked.stdout
    assert int(reported.group(1), 16) == serial
    listed = json.loads(_run("ls", root, "-o", "json").stdout)
    by_name = {entry["name"]: entry for entry in listed}
    assert set(by_name) == {"fleet-server", "fleet-controller", "operator", "gw-0001"}
    assert by_name["gw-0001"]["revoked"] is True
    assert by_name["operator"]["revoked"] is False
    assert int(by_name["gw-0001"]["serial"], 16) == serial
    assert by_name["gw-0001"]["role"] == "device"
    assert by_name["gw-0001"]["not_after"].endswith("+00:00")


def test_revoke_unknown_is_a_one_line_error(root: Path) -> None:
    _assert_one_line_error(_run("revoke", root, "bob"), "no identity named 'bob'")


def test_ls_table_names_every_identity(root: Path) -> None:
    assert _run("device", root, "gw-0001").exit_code == 0
    result = _run("ls", root)
    assert result.exit_code == 0
    for name in ("fleet-server", "fleet-controller", "operator", "gw-0001", "device", "revoked"):
        assert name in result.stdout
