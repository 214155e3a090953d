"""Smoke tests of the benchmarks: each runs once, fast, and must report every figure as a number."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float) -> dict[str, Any]:
    """Run bench/<script> and return its JSON document; a failure shows the end of its stderr."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto mosquitto-clients; .ci/run does)")
    command = [sys.executable, str(REPO / "bench" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def lookup(document: dict[str, Any], dotted: str) -> Any:
    value: Any = document
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"missing {dotted!r} (at {part!r})"
        value = value[part]
    return value


def assert_numbers(document: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = lookup(document, key)
        assert isinstance(value, int | float) and not isinstance(value, bool), f"{key} = {value!r} is not a number"
