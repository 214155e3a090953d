"""Controller settings: defaults < YAML file < environment < flags, one-line errors naming source and field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fleet.cli import controller_cmd
from fleet.controller.settings import (
    BrokerSettings,
    ControllerSettings,
    Setting,
    env_name,
    load_settings,
)
from fleet.protocol.errors import ConfigError, FleetError

pytestmark = pytest.mark.timeout(60)

FILE = """
broker: {host: broker.example.com, port: 8884, certs: /etc/fleet/pki, identity: ctl-1}
storage: {db: /var/lib/fleet/fleet.db}
releases: {store: /var/lib/fleet/releases, max_transfers: 16, rate_limit: 1000000}
timing: {tick_interval: 250ms, stale_after: 2m, offline_after: 10m, lease_ttl: 5s}
http: {host: 0.0.0.0, port: 9090}
"""
REQUIRED = {"FLEET_CONTROLLER_BROKER__HOST": "b", "FLEET_CONTROLLER_BROKER__CERTS": "/pki"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(environ=REQUIRED)
    assert settings == ControllerSettings(broker=BrokerSettings(host="b", certs=Path("/pki")))
    assert (settings.broker.port, settings.broker.identity, settings.broker.share) == (8883, None, None)
    assert settings.storage.db == Path("fleet.db")
    assert (settings.releases.store, settings.releases.max_transfers, settings.releases.rate_limit) == (
        Path("releases"),
        8,
        None,
    )
    timing = settings.timing
    assert (timing.tick_interval, timing.stale_after, timing.offline_after, timing.lease_ttl) == (0.5, 90, 300, 10)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.pki.root == Path("/pki")


def test_every_field_has_a_description() -> None:
    for section in ControllerSettings.model_fields.values():
        assert section.description, section
        assert isinstance(section.annotation, type)
        for name, field in section.annotation.model_fields.items():
            assert field.description, name


def test_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE), {})
    assert settings.broker == BrokerSettings(
        host="broker.example.com", port=8884, certs=Path("/etc/fleet/pki"), identity="ctl-1"
    )
    assert settings.storage.db == Path("/var/lib/fleet/fleet.db")
    assert (settings.releases.max_transfers, settings.releases.rate_limit) == (16, 1_000_000)
    assert (settings.timing.tick_interval, settings.timing.stale_after, settings.timing.offline_after) == (
        0.25,
        120,
        600,
    )
    assert settings.timing.lease_ttl == 5
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 9090)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    environ = {
        "FLEET_CONTROLLER_TIMING__STALE_AFTER": "30s",
        "FLEET_CONTROLLER_BROKER__SHARE": "ingest",
        "FLEET_CONTROLLER_HTTP__PORT": "0",
        "FLEET_CONTROLLER": "http://127.0.0.1:8080",  # the operator CLI's variable, not a setting
        "PATH": "/bin",
    }
    settings = load_settings(write(tmp_path, FILE), environ)
    assert settings.timing.stale_after == 30
    assert settings.timing.offline_after == 600  # the file's, untouched
    assert settings.broker.share == "ingest"
    assert settings.broker.host == "broker.example.com"
    assert settings.http.port == 0
    assert env_name("timing.stale_after") == "FLEET_CONTROLLER_TIMING__STALE_AFTER"


def test_flags_override_the_environment(tmp_path: Path) -> None:
    environ = {"FLEET_CONTROLLER_TIMING__STALE_AFTER": "30s", "FLEET_CONTROLLER_STORAGE__DB": "/env.db"}
    flags = [Setting("timing.stale_after", "5", "--stale-after"), Setting("broker.host", "flag-host", "--broker")]
    cli_env = [Setting("broker.host", "cli-env-host", "FLEET_BROKER"), Setting("storage.db", "/x.db", "FLEET_X")]
    settings = load_settings(write(tmp_path, FILE), environ, cli_env=cli_env, flags=flags)
    assert settings.timing.stale_after == 5
    assert settings.broker.host == "flag-host"
    assert settings.storage.db == Path("/env.db")  # FLEET_CONTROLLER_* ranks above the CLI-wide variables


@pytest.mark.parametrize(
    ("text", "environ", "problem"),
    [
        (
            FILE.replace("stale_after: 2m", "stale_after: soon"),
            {},
            "controller.yaml: timing.stale_after: 'soon' is not a duration (e.g. 500ms, 30s, 5m, 1h)",
        ),
        (
            FILE + "surprise: 1\n",
            {},
            "controller.yaml: surprise: unknown setting"
            " (known here: broker, storage, releases, timing, http, metrics, log)",
        ),
        (
            FILE.replace("port: 8884", "port: 70000"),
            {},
            "controller.yaml: broker.port: Input should be less than or equal to 65535",
        ),
        (
            FILE,
            {"FLEET_CONTROLLER_BROKER__PORT": "eighty"},
            "FLEET_CONTROLLER_BROKER__PORT: broker.port: Input should be a valid integer",
        ),
        (
            FILE,
            {"FLEET_CONTROLLER_TIMING__STALE_AFTER": "1h"},
            "FLEET_CONTROLLER_TIMING__STALE_AFTER: timing: offline_after (600s) is shorter than stale_after (3600s)",
        ),
        (
            FILE,
            {"FLEET_CONTROLLER_BROKER__HOTS": "x"},
            "FLEET_CONTROLLER_BROKER__HOTS: broker.hots: unknown setting (known here: host, port, certs,",
        ),
        (FILE, {"FLEET_CONTROLLER_BROKER__SHARE": "a/b"}, "broker.share: 'a/b' is not a share group name"),
        (FILE.replace("ctl-1", "ctl 1"), {}, "controller.yaml: broker.identity: 'ctl 1' is not a node id"),
        ("broker: [unclosed\n", {}, "controller.yaml: not valid YAML"),
        ("- a list\n", {}, "controller.yaml: the top level must be a mapping"),
        (
            "storage: {db: x.db}\n",
            {},
            "broker.host: required: set FLEET_CONTROLLER_BROKER__HOST or broker.host in the --config file (and 1 more)",
        ),
    ],
)
def test_problems_are_one_line_naming_source_and_field(
    tmp_path: Path, text: str, environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ)
    message = str(caught.value)
    assert "\n" not in message
    assert problem in message, message


def test_a_bad_flag_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--max-transfers: releases.max_transfers: Input should be greater"):
        load_settings(write(tmp_path, FILE), {}, flags=[Setting("releases.max_transfers", "0", "--max-transfers")])


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: not found$"):
        load_settings(tmp_path / "nope.yaml", {})


# ---- the command: flags and their variables onto the tree ----------------------------------------


class Loaded(FleetError):
    """Raised by the stand-in Controller: the command got as far as building one."""


def run_command(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]) -> ControllerSettings | str:
    """``fleet controller ARGS`` up to the point it would start: the settings it built, or its error line."""
    seen: list[ControllerSettings] = []

    def stand_in(settings: ControllerSettings) -> None:
        seen.append(settings)
        raise Loaded("loaded")

    monkeypatch.setattr("fleet.controller.service.Controller", stand_in)
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = typer.Typer()
    app.command()(controller_cmd.controller)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    return seen[0] if seen else result.stderr.strip()


def test_command_flags_override_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, FILE)
    env = {"FLEET_CONTROLLER_TIMING__LEASE_TTL": "20s", "FLEET_CONTROLLER_TIMING__STALE_AFTER": "1m"}
    args = ["--config", str(config), "--broker", "flag.example.com:1883", "--stale-after", "5", "--offline-after", "15"]
    settings = run_command(monkeypatch, [*args, "--max-transfers", "4", "--http", "127.0.0.1:0"], env)
    assert isinstance(settings, ControllerSettings), settings
    assert (settings.broker.host, settings.broker.port) == ("flag.example.com", 1883)
    assert settings.broker.certs == Path("/etc/fleet/pki")  # from the file
    assert (settings.timing.stale_after, settings.timing.offline_after) == (5, 15)  # flags over env over file
    assert settings.timing.lease_ttl == 20  # env over file
    assert settings.releases.max_transfers == 4
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 0)


def test_command_cli_wide_variables_rank_below_controller_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"FLEET_CERTS": str(tmp_path), "FLEET_BROKER": "a.example.com:8883", "FLEET_CONTROLLER_BROKER__HOST": "b"}
    settings = run_command(monkeypatch, [], env)
    assert isinstance(settings, ControllerSettings), settings
    assert (settings.broker.host, settings.broker.port, settings.broker.certs) == ("b", 8883, tmp_path)


def test_command_errors_name_the_flag_or_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--certs", str(tmp_path), "--broker", "b:8883"]
    assert run_command(monkeypatch, [*base, "--lease-ttl", "soon"], {}) == (
        "fleet: error: --lease-ttl: timing.lease_ttl: 'soon' is not a duration (e.g. 500ms, 30s, 5m, 1h)"
    )
    assert run_command(monkeypatch, ["--certs", str(tmp_path)], {}) == (
        "fleet: error: broker.host: required: set --broker, FLEET_CONTROLLER_BROKER__HOST"
        " or broker.host in the --config file"
    )
    assert run_command(monkeypatch, ["--certs", str(tmp_path)], {"FLEET_BROKER": "b:0"}) == (
        "fleet: error: FLEET_BROKER: broker.port: Input should be greater than or equal to 1"
    )


def test_real_command_with_a_bad_file_exits_2_with_one_line(tmp_path: Path) -> None:
    config = write(tmp_path, FILE.replace("max_transfers: 16", "max_transfer: 16"))
    env = {name: value for name, value in os.environ.items() if not name.startswith("FLEET_")}
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "controller", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"fleet: error: {config}: releases.max_transfer: unknown setting (known here: store, max_transfers, rate_limit)"
    ]
