"""Fixtures: a real PKI, the embedded broker in-process and a real Mosquitto, both on port 0."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.embedded import BrokerSettings, Listener, ThreadedBroker
from broker.render import default_options, render
from certs import PkiPaths, init_pki, issue_controller, issue_device, issue_operator, revoke
from fleet.controller.mqtt import TlsIdentity
from tests.leaks import leak_report, pending_tasks_at_asyncio_run_exit, started_threads
from tests.mqtt import Credentials, Endpoint

DEVICES = ("gw-a", "gw-b")


@pytest.fixture(autouse=True)
def no_leaked_threads_or_tasks() -> Iterator[None]:
    """Fail a test that leaves a thread running after its teardown, or a task pending when an
    ``asyncio.run`` of its own returned (see tests/leaks.py). Autouse, so it is set up before the
    test's other function fixtures and torn down after them; threads of session and module
    fixtures exist before it starts and are not counted."""
    before = set(threading.enumerate())
    tasks: list[str] = []
    with pending_tasks_at_asyncio_run_exit(tasks):
        yield
    report = leak_report(started_threads(before), tasks)
    if report is not None:
        pytest.fail(report, pytrace=False)


@dataclass(frozen=True)
class Pki:
    paths: PkiPaths
    foreign: PkiPaths  # a second CA that the brokers must not trust

    def device(self, node_id: str) -> Credentials:
        client = self.paths.device(node_id)
        return Credentials(self.paths.ca_cert, client.cert, client.key)

    def operator(self, name: str | None = None) -> Credentials:
        if name is None:
            return Credentials(self.paths.ca_cert, self.paths.operator_cert, self.paths.operator_key)
        client = self.paths.operator(name)
        return Credentials(self.paths.ca_cert, client.cert, client.key)

    def controller(self) -> Credentials:
        return Credentials(self.paths.ca_cert, self.paths.controller_cert, self.paths.controller_key)

    def own_controller(self, name: str) -> TlsIdentity:
        """A controller identity for one test module, issued on first use (the PKI is per session):
        two connections with one certificate kick each other off, so modules must not share."""
        client = self.paths.controller(name)
        if not client.cert.exists():
            issue_controller(self.paths, name)
        return TlsIdentity(self.paths.ca_cert, client.cert, client.key)

    def foreign_device(self, node_id: str) -> Credentials:
        client = self.foreign.device(node_id)
        return Credentials(self.paths.ca_cert, client.cert, client.key)

    def server_as_client(self) -> Credentials:
        """Signed by our CA, but a server identity: must never act as an MQTT client."""
        return Credentials(self.paths.ca_cert, self.paths.server_cert, self.paths.server_key)

    def no_certificate(self) -> Credentials:
        return Credentials(self.paths.ca_cert, None, None)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    paths = init_pki(root / "main")
    for node_id in (*DEVICES, "gw-revoked", "gw-late"):
        issue_device(paths, node_id)
    past = datetime.now(UTC) - timedelta(days=30)
    issue_device(paths, "gw-expired", not_valid_before=past, not_valid_after=past + timedelta(days=1))
    issue_operator(paths, "alice")
    issue_controller(paths, "ctl-2")
    revoke(paths, "gw-revoked")
    foreign = init_pki(root / "foreign")
    issue_device(foreign, "gw-a")
    return Pki(paths, foreign)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_port_ready(port: int, creds: Credentials) -> bool:
    context = ssl.create_default_context(cafile=str(creds.ca))
    assert creds.cert is not None and creds.key is not None
    context.load_cert_chain(str(creds.cert), str(creds.key))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname="localhost"),
        ):
            return True
    except OSError:
        return False


class MosquittoProcess:
    """A real mosquitto from the rendered configuration; restartable on the same port."""

    def __init__(self, pki: PkiPaths, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        settings = BrokerSettings(pki=pki, listeners=(Listener("127.0.0.1", self.port),))
        render("mosquitto", settings, workdir, default_options(settings, workdir))
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: Credentials, timeout: float = 15.0) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.workdir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()}")
            if tls_port_ready(self.port, ready):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto not ready in {timeout}s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def mosquitto(pki: Pki, tmp_path: Path) -> Iterator[Endpoint]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto mosquitto-clients; .ci/run does)")
    process = MosquittoProcess(pki.paths, tmp_path / "mosquitto")
    process.start(pki.controller())
    try:
        yield Endpoint("mosquitto", "127.0.0.1", process.port)
    finally:
        process.stop()


@pytest.fixture
def embedded(pki: Pki) -> Iterator[Endpoint]:
    threaded = ThreadedBroker(
        BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 0),), crl_poll_interval=0.2)
    )
    threaded.start()
    try:
        yield Endpoint("amqtt", "127.0.0.1", threaded.ports[0])
    finally:
        threaded.stop()


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest) -> Endpoint:
    """Every test using this runs against both brokers."""
    return request.getfixturevalue("embedded" if request.param == "amqtt" else "mosquitto")  # type: ignore[no-any-return]
