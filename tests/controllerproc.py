"""A real ``fleet controller`` process for tests: start, wait for its API, kill -9, talk HTTPS.

The API is HTTPS with the PKI's server certificate; this helper verifies it with the PKI's
``ca.pem`` and authenticates with the operator certificate of ``fleet certs init`` (an admin), or
with ``as_token(token)``. Paths are the API's without the ``/v1`` prefix (``get("/nodes")``); a
paginated list comes back as the list of all its items.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Pki, free_port
from tests.mqtt import Endpoint, wait_until


def client_context(pki: Pki, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS that trusts the PKI, presenting ``cert``/``key`` (default: the admin operator.pem)."""
    context = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
    context.load_cert_chain(str(cert or pki.paths.operator_cert), str(key or pki.paths.operator_key))
    return context


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
    metrics_port: int | None = None  # with a port: the unauthenticated metrics listener too

    @property
    def log_path(self) -> Path:
        return self.workdir / f"controller-{self.identity}.log"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None
        return f"http://127.0.0.1:{self.metrics_port}"

    def start(self) -> None:
        self.pki.own_controller(self.identity)
        log = self.log_path.open("ab")
        metrics = ("--metrics", f"127.0.0.1:{self.metrics_port}") if self.metrics_port is not None else ()
        command = [
            sys.executable, "-m", "fleet", "controller", "--certs", str(self.pki.paths.root),
            "--broker", f"127.0.0.1:{self.broker.port}", "--db", str(self.db or self.workdir / "fleet.db"),
            "--store", str(self.store), "--http", f"127.0.0.1:{self.port}", "--identity", self.identity,
            "--stale-after", "5", "--offline-after", "15", *metrics, *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._ready, 30, "controller API up")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(self.log_path.read_text())
        try:
            with self.http() as http:
                return http.get("/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def http(
        self, *, token: str | None = None, cert: Path | None = None, key: Path | None = None, anonymous: bool = False
    ) -> httpx.Client:
        """A client of the API: the admin certificate, another operator's (``cert``/``key``), a bearer
        ``token`` (with no certificate at all), or no credentials at all. Close it after use."""
        if anonymous:
            verify = ssl.create_default_context(cafile=str(self.pki.paths.ca_cert))
            return httpx.Client(base_url=self.url, verify=verify, timeout=10)
        if token is not None:
            verify = ssl.create_default_context(cafile=str(self.pki.paths.ca_cert))
            return httpx.Client(
                base_url=self.url, verify=verify, timeout=10, headers={"Authorization": f"Bearer {token}"}
            )
        return httpx.Client(base_url=self.url, verify=client_context(self.pki, cert=cert, key=key), timeout=10)

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
        """``GET /v1{path}`` as the admin; every page of a list."""
        with self.http() as http:
            response = http.get(f"/v1{path}")
            assert response.status_code == 200, response.text
            body = response.json()
            if isinstance(body, dict) and set(body) == {"items", "next_cursor"}:
                items = list(body["items"])
                while body["next_cursor"] is not None:
                    response = http.get(f"/v1{path}", params={"cursor": body["next_cursor"]})
                    assert response.status_code == 200, response.text
                    body = response.json()
                    items.extend(body["items"])
                return items
            return body

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        with self.http() as http:
            response = http.post(f"/v1{path}", json=body or {})
        assert response.status_code in (200, 201), response.text
        return response.json()

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        with self.http() as http:
            response = http.patch(f"/v1{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics_text(self) -> str:
        """``/metrics`` of the API (as the admin)."""
        with self.http() as http:
            response = http.get("/metrics")
        assert response.status_code == 200, response.text
        return response.text
