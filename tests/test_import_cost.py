"""What the two entry points import when they have nothing to do: `fleet-agent --version` and
`fleet --help` load no server library and (for the agent) no pydantic models."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

AGENT_VERSION = "from agent.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass"
FLEET_HELP = (
    "import sys\nsys.argv = ['fleet', '--help']\nfrom fleet.cli import main\n"
    "try:\n    main()\nexcept SystemExit:\n    pass"
)


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys\nprint('MODULES', ' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
    )
    (line,) = (line for line in result.stdout.splitlines() if line.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize(
    ("code", "forbidden"),
    [
        pytest.param(
            AGENT_VERSION,
            {"amqtt", "fastapi", "uvicorn", "starlette", "typer", "rich", "pydantic", "msgpack", "paho"},
            id="fleet-agent --version",
        ),
        pytest.param(FLEET_HELP, {"amqtt", "fastapi", "uvicorn", "starlette"}, id="fleet --help"),
    ],
)
def test_entry_point_loads_nothing_it_does_not_need(code: str, forbidden: set[str]) -> None:
    loaded = loaded_after(code)
    assert "fleet" in loaded  # the probe ran
    assert not loaded & forbidden


def test_a_fleet_command_still_loads_what_it_runs() -> None:
    code = FLEET_HELP.replace("'--help'", "'broker', '--help'")
    assert "amqtt" in loaded_after(code)
