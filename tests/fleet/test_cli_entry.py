"""The `fleet` entry point: the lazily listed sub-commands match the real ones, and without the
[server] extra it says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fleet.cli

MISSING = "fleet: error: the operator CLI needs the server extra: pip install 'fleet-mqtt[server]'\n"


def run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "120", "TERM": "dumb"},
    )


def test_help_lists_the_same_commands_as_loading_them_all() -> None:
    lazy = run("import sys; sys.argv[0] = 'fleet'\nfrom fleet.cli import main; main()", "--help")
    full = run("import fleet.cli as c; c._register_subcommands(); c.app(prog_name='fleet')", "--help")
    assert lazy.returncode == full.returncode == 0, lazy.stderr + full.stderr
    assert lazy.stdout == full.stdout
    for name in fleet.cli.SUBCOMMANDS:
        assert f" {name} " in lazy.stdout


def test_the_command_run_is_the_real_one() -> None:
    result = run("from fleet.cli import main; main()", "release", "--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout  # mounted on the release sub-app with it


def test_unknown_command_is_a_usage_error() -> None:
    result = run("from fleet.cli import main; main()", "no-such-command")
    assert result.returncode == 2
    assert "No such command" in result.stderr


@pytest.mark.parametrize(
    ("blocked", "args"),
    [("typer", ("--help",)), ("typer", ()), ("amqtt", ("broker", "--help")), ("httpx", ("nodes",))],
)
def test_without_the_server_extra_one_line_and_exit_2(blocked: str, args: tuple[str, ...]) -> None:
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = f"import sys; sys.modules[{blocked!r}] = None\nfrom fleet.cli import main; main()"
    result = run(code, *args)
    assert result.returncode == 2
    assert result.stderr == MISSING
    assert result.stdout == ""
