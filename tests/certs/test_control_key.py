"""The control-plane signing key: made by ``init``, added to an older PKI by ``init`` (upgrade),
handed to devices with their identity."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import certs
from certs import PkiError, PkiPaths
from fleet.cli import certs_cmd
from fleet.protocol.signing import load_private_key, load_public_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_the_control_key_pair(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    key = load_private_key(pki.control_key.read_bytes())
    assert load_public_key(pki.control_pub.read_bytes()) == key.public_key()
    assert _mode(pki.control_key) == 0o600
    assert _mode(pki.control_pub) & 0o044 == 0o044
    release = load_private_key(pki.release_key.read_bytes())
    assert release.public_key() != key.public_key()  # one key per purpose


def test_a_device_gets_control_pub_with_its_identity(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    paths = certs.issue_device(pki, "gw-1")
    assert pki.device_control_pub("gw-1") == paths.cert.parent / "control.pub"
    assert pki.device_control_pub("gw-1").read_bytes() == pki.control_pub.read_bytes()
    operator = certs.issue_operator(pki, "alice")
    assert not (operator.cert.parent / "control.pub").exists()


def test_upgrade_adds_a_missing_control_key_once(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    pki.control_key.unlink()
    pki.control_pub.unlink()
    before = {path: path.read_bytes() for path in pki.root.iterdir() if path.is_file()}
    upgrade = certs.upgrade_pki(pki)
    assert upgrade.control_key_added
    assert (upgrade.issuing_added, upgrade.root_recertified, upgrade.crl_completed) == (False, False, False)
    assert set(upgrade.written) == {pki.control_key, pki.control_pub}
    assert load_public_key(pki.control_pub.read_bytes()) == load_private_key(pki.control_key.read_bytes()).public_key()
    assert _mode(pki.control_key) == 0o600
    for path, data in before.items():
        assert path.read_bytes() == data, path  # nothing else touched
    key = pki.control_key.read_bytes()
    with pytest.raises(PkiError, match=r"already exists, with its issuing CA"):
        certs.upgrade_pki(pki)  # idempotent: nothing to add is the usual "already exists"
    assert pki.control_key.read_bytes() == key


def test_upgrade_derives_a_lost_control_pub_from_the_key(tmp_path: Path) -> None:
    pki = certs.init_pki(tmp_path / "pki")
    public = pki.control_pub.read_bytes()
    pki.control_pub.unlink()
    upgrade = certs.upgrade_pki(pki)
    assert not upgrade.control_key_added
    assert upgrade.written == (pki.control_pub,)
    assert pki.control_pub.read_bytes() == public


def test_cli_init_on_a_pki_without_control_key_adds_it_and_says_so(tmp_path: Path) -> None:
    pki = PkiPaths(tmp_path / "pki")
    certs.init_pki(pki.root)
    pki.control_key.unlink()
    pki.control_pub.unlink()
    result = CliRunner().invoke(certs_cmd.app, ["init", str(pki.root)])
    assert result.exit_code == 0, result.output
    assert f"wrote {pki.control_key}" in result.stdout
    assert f"added the control key {pki.control_key}" in result.stdout
    assert pki.control_key.exists()
