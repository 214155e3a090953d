"""Real ``fleet-agent`` processes for tests: config file, start, wait for log lines, kill -9.

The agent verifies desired state and commands with the PKI's ``control.pub``: its default is the
file next to ``tls.ca``, which the tests' PKI has (tests.control signs what tests publish). With
``clock_offset`` set (``"+1h"``, ``"-1h"``) the agent runs under libfaketime, its clock that far off.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.mqtt import Credentials, Endpoint, wait_until


@dataclass
class AgentProcess:
    node_id: str
    endpoint: Endpoint
    creds: Credentials
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    clock_offset: str | None = None  # libfaketime's FAKETIME, e.g. "+1h": the agent's clock is that far off
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "agent.yaml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def settings(self) -> dict[str, Any]:
        assert self.creds.cert is not None and self.creds.key is not None
        base: dict[str, Any] = {
            "node_id": self.node_id,
            "server_addr": f"{self.endpoint.host}:{self.endpoint.port}",
            "tls_enabled": True,
            "tls": {"ca": str(self.creds.ca), "cert": str(self.creds.cert), "key": str(self.creds.key)},
            "state_dir": str(self.state_dir),
            "heartbeat_interval": "1s",
            "keepalive": "5s",
            "connect_timeout": "5s",
            "reconnect": {"initial": "100ms", "maximum": "1s", "jitter": "100ms"},
            "config_poll_interval": "200ms",
        }
        return base | self.extra

    def write_config(self, **changes: Any) -> None:
        self.extra |= changes
        self.workdir.mkdir(parents=True, exist_ok=True)
        temp = self.config_path.with_suffix(".tmp")
        temp.write_text(yaml.safe_dump(self.settings()))
        os.replace(temp, self.config_path)

    def start(self, *, failpoints: str = "", wait_connected: bool = True, timeout: float = 20.0) -> AgentProcess:
        self.write_config()
        env = {**os.environ, **self.env}
        if failpoints:
            env["FLEET_FAILPOINTS"] = failpoints
        else:
            env.pop("FLEET_FAILPOINTS", None)
        if self.clock_offset is not None:
            library = libfaketime()
            assert library is not None, "libfaketime is not installed (apt-get install faketime)"
            env |= {"LD_PRELOAD": str(library), "FAKETIME": self.clock_offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config_path), "--log-level", "debug"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if wait_connected:
            self.wait_log("Connected to control plane", timeout, offset=offset)
        return self

    def log_text(self, offset: int = 0) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[offset:].decode(errors="replace")

    def wait_log(self, needle: str, timeout: float = 20.0, *, offset: int = 0, count: int = 1) -> None:
        def seen() -> bool:
            if self.process is not None and self.process.poll() is not None and needle not in self.log_text(offset):
                raise AssertionError(f"agent exited ({self.process.returncode}) before {needle!r}:\n{self.log_text()}")
            return self.log_text(offset).count(needle) >= count

        try:
            wait_until(seen, timeout, f"agent log line {needle!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- agent log ---\n{self.log_text()[-4000:]}") from None

    def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


def libfaketime() -> Path | None:
    """The libfaketime preload library (Debian package faketime, in .ci/sysdeps.sh), or None."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return Path(found[0])
    return None


def wait_file_lines(path: Path, count: int, timeout: float) -> list[str]:
    wait_until(
        lambda: path.exists() and len(path.read_text().splitlines()) >= count, timeout, f"{count} lines in {path}"
    )
    return path.read_text().splitlines()


def settle(seconds: float) -> None:
    """For asserting that something does NOT happen: give it a bounded chance to happen."""
    time.sleep(seconds)
