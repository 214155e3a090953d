"""``fleet certs`` through Typer's runner on the sub-app (``fleet.cli`` registers it at startup)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner, Result

import certs
from fleet.cli import certs_cmd
from tests.certs import load_cert, make_legacy_pki


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
        control = [f"wrote {root / layout / name / 'control.pub'}"] if command == "device" else []
        assert result.stdout.splitlines() == [
            f"wrote {root / layout / name / 'cert.pem'}",
            f"wrote {root / layout / name / 'key.pem'}",
            *control,
        ]
    assert (root / "devices" / "gw-0001" / "control.pub").read_bytes() == (root / "control.pub").read_bytes()


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


def test_device_defaults_to_90_days_and_days_overrides(root: Path) -> None:
    for name, extra, days in (("gw-1", (), certs.DEVICE_DAYS), ("gw-2", ("--days", "7"), 7)):
        assert _run("device", root, name, *extra).exit_code == 0
        cert = load_cert(root / "devices" / name / "cert.pem")
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert timedelta(days=days) <= lifetime <= timedelta(days=days, minutes=6)


def test_renew_reports_the_new_certificate(root: Path) -> None:
    assert _run("device", root, "gw-0001").exit_code == 0
    old = load_cert(root / "devices" / "gw-0001" / "cert.pem").serial_number
    result = _run("renew", root, "gw-0001", "--days", "30")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"wrote {root / 'devices' / 'gw-0001' / 'cert.pem'}",
        f"wrote {root / 'devices' / 'gw-0001' / 'key.pem'}",
    ]
    new = load_cert(root / "devices" / "gw-0001" / "cert.pem").serial_number
    assert new != old
    assert re.fullmatch(
        r"renewed gw-0001 \(device, serial [0-9A-F]+, issued by the issuing CA, valid until \S+\)", lines[2]
    )
    assert int(re.findall(r"serial ([0-9A-F]+)", lines[2])[0], 16) == new


def test_renew_unknown_is_a_one_line_error(root: Path) -> None:
    _assert_one_line_error(_run("renew", root, "bob"), "no identity named 'bob'")


def test_ls_shows_the_issuer(root: Path) -> None:
    assert _run("device", root, "gw-0001").exit_code == 0
    listed = {entry["name"]: entry["issuer"] for entry in json.loads(_run("ls", root, "-o", "json").stdout)}
    assert listed == {"fleet-server": "root", "fleet-controller": "root", "operator": "root", "gw-0001": "issuing"}
    table = _run("ls", root).stdout
    assert "issuing" in table
    assert "root" in table


def test_init_on_a_pki_without_issuing_ca_adds_it_and_says_so(tmp_path: Path) -> None:
    pki = make_legacy_pki(tmp_path / "pki")
    result = _run("init", pki.root)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{pki.ca_cert}: the PKI exists; adding what it lacks" in out
    assert f"re-signed {pki.ca_cert}: same key, name and validity, path length 0 -> 1" in out
    assert "restart every broker" in out
    for path in (pki.issuing_cert, pki.issuing_key, pki.crl):
        assert f"wrote {path}" in out
    assert f"added the issuing CA {pki.issuing_cert}" in out
    _assert_one_line_error(_run("init", pki.root), "ca.pem: already exists, with its issuing CA", "--force")


def test_init_with_options_on_an_existing_pki_is_a_one_line_error(root: Path) -> None:
    _assert_one_line_error(_run("init", root, "--san", "x.example"), "--san and --days apply to a new PKI")
