"""A real ``fleet controller`` process for tests: start, wait for its API, kill -9, talk HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Pki, free_port
from tests.mqtt import Endpoint, wait_until


@dataclass
class ControllerProcess:
    pki: Pki
    broker: Endpoint
    workdir: Path
    store: Path
    identity: str = "ctl-e2e"
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    db: Path | None = None  # default workdir/fleet.db; controllers sharing ingest share one
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"controller-{self.identity}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.pki.own_controller(self.identity)
        log = self.log_path.open("ab")
        command = [
            sys.executable, "-m", "fleet", "controller", "--certs", str(self.pki.paths.root),
            "--broker", f"127.0.0.1:{self.broker.port}", "--db", str(self.db or self.workdir / "fleet.db"),
            "--store", str(self.store), "--http", f"127.0.0.1:{self.port}", "--identity", self.identity,
            "--stale-after", "5", "--offline-after", "15", *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._ready, 30, "controller API up")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(self.log_path.read_text())
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.post(f"{self.url}{path}", json=body or {}, timeout=10)
        assert response.status_code in (200, 201), response.text
        return response.json()
