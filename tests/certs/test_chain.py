"""Real TLS handshakes: devices from the issuing CA, verified by servers that trust only ca.pem.

Two verifiers, both OpenSSL underneath but configured differently:

- Python's ssl as the embedded broker sets it up (``ca.pem`` as the trust anchor, ``crl.pem``
  through ``load_verify_locations``, ``VERIFY_CRL_CHECK_LEAF``): a server of our own here, and the
  embedded broker itself through the session fixture;
- a real Mosquitto 2.0 with the configuration ``broker.render`` writes (``cafile``, ``crlfile``).
"""

from __future__ import annotations

import queue
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import certs
from broker.embedded import BrokerSettings, Listener
from broker.render import default_options, render
from certs import PkiPaths
from tests.certs import make_legacy_pki

TIMEOUT = 15.0


@dataclass(frozen=True)
class Client:
    ca: Path
    cert: Path
    key: Path


def _client(pki: PkiPaths, name: str, *, ca: Path | None = None) -> Client:
    paths = pki.device(name)
    return Client(ca or pki.ca_cert, paths.cert, paths.key)


def _client_context(client: Client) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(client.ca))
    context.load_cert_chain(str(client.cert), str(client.key))  # sends cert.pem's chain too
    return context


# --------------------------------------------------------------------- a server like the embedded one


def _embedded_like_context(pki: PkiPaths, *, ca: Path | None = None) -> ssl.SSLContext:
    """What broker/embedded.py's build_tls_context does, restated so this test pins the PKI's side."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(ca or pki.ca_cert))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.load_verify_locations(cafile=str(pki.crl))
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


class TlsServer:
    """Accepts connections one by one; answers b"ok" after a handshake that verified the client."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.refusals: list[str] = []
        self.outcomes: queue.Queue[str | None] = queue.Queue()  # per connection: None or the refusal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-tls-server")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with raw:
                raw.settimeout(TIMEOUT)
                try:
                    with self.context.wrap_socket(raw, server_side=True) as tls:
                        tls.sendall(b"ok")
                except (ssl.SSLError, OSError) as exc:
                    self.refusals.append(str(exc))
                    self.outcomes.put(str(exc))
                else:
                    self.outcomes.put(None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[list[TlsServer]]:
    servers: list[TlsServer] = []
    yield servers
    for server in servers:
        server.close()


def _accepted_by(server: TlsServer, client: Client) -> bool:
    """Both ends agree the handshake succeeded (and the server is done with the connection)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw,
            _client_context(client).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            client_ok = tls.recv(2) == b"ok"  # TLS 1.3: a refused client certificate shows up here
    except (ssl.SSLError, OSError):
        client_ok = False
    return server.outcomes.get(timeout=TIMEOUT) is None and client_ok


@pytest.fixture
def fresh(tmp_path: Path) -> PkiPaths:
    """A PKI of this test alone (``pki`` is the session PKI of tests/conftest.py)."""
    pki = certs.init_pki(tmp_path / "pki")
    for name in ("gw-good", "gw-revoked"):
        certs.issue_device(pki, name)
    certs.issue_controller(pki, "ctl-revoked")
    certs.revoke(pki, "gw-revoked")
    certs.revoke(pki, "ctl-revoked")
    return pki


def test_python_ssl_accepts_a_good_device_and_refuses_a_revoked_one(fresh: PkiPaths, serve: list[TlsServer]) -> None:
    server = TlsServer(_embedded_like_context(fresh))
    serve.append(server)
    assert _accepted_by(server, _client(fresh, "gw-good"))
    assert not _accepted_by(server, _client(fresh, "gw-revoked"))
    assert any("revoked" in refusal for refusal in server.refusals), server.refusals


def test_python_ssl_checks_root_issued_identities_against_the_root_crl(fresh: PkiPaths, serve: list[TlsServer]) -> None:
    server = TlsServer(_embedded_like_context(fresh))
    serve.append(server)
    assert _accepted_by(server, Client(fresh.ca_cert, fresh.controller_cert, fresh.controller_key))
    revoked = fresh.controller("ctl-revoked")
    assert not _accepted_by(server, Client(fresh.ca_cert, revoked.cert, revoked.key))


def test_a_device_that_sends_no_chain_is_refused(fresh: PkiPaths, serve: list[TlsServer], tmp_path: Path) -> None:
    # Why cert.pem carries the issuing CA: the broker trusts the root only.
    server = TlsServer(_embedded_like_context(fresh))
    serve.append(server)
    good = _client(fresh, "gw-good")
    leaf_only = tmp_path / "leaf.pem"
    text = good.cert.read_text()
    leaf_only.write_text(text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----\n")])
    assert not _accepted_by(server, Client(good.ca, leaf_only, good.key))
    assert any("unable to get local issuer" in refusal for refusal in server.refusals), server.refusals


def test_upgraded_pki_accepts_old_and_new_devices_once_the_broker_has_the_new_root(
    tmp_path: Path, serve: list[TlsServer]
) -> None:
    pki = make_legacy_pki(tmp_path / "pki")
    certs.issue_device(pki, "gw-legacy")  # root-issued: the PKI has no issuing CA yet
    old_root = tmp_path / "old-ca.pem"
    shutil.copy(pki.ca_cert, old_root)
    certs.upgrade_pki(pki)
    certs.issue_device(pki, "gw-new")
    stale = TlsServer(_embedded_like_context(pki, ca=old_root))  # a broker not restarted yet
    current = TlsServer(_embedded_like_context(pki))
    serve.extend([stale, current])
    # Devices keep their old ca.pem: they only verify the (root-issued) server with it.
    for client_ca in (old_root, pki.ca_cert):
        assert _accepted_by(current, _client(pki, "gw-legacy", ca=client_ca))
        assert _accepted_by(current, _client(pki, "gw-new", ca=client_ca))
    assert _accepted_by(stale, _client(pki, "gw-legacy"))
    assert not _accepted_by(stale, _client(pki, "gw-new"))  # path length 0 in the old root
    assert any("path length" in refusal for refusal in stale.refusals), stale.refusals
    certs.revoke(pki, "gw-legacy")  # into the root's CRL
    certs.revoke(pki, "gw-new")  # into the issuing CA's CRL
    after = TlsServer(_embedded_like_context(pki))
    serve.append(after)
    assert not _accepted_by(after, _client(pki, "gw-legacy"))
    assert not _accepted_by(after, _client(pki, "gw-new"))
    assert _accepted_by(after, Client(pki.ca_cert, pki.controller_cert, pki.controller_key))


# -------------------------------------------------------------------------------------- Mosquitto


def _mqtt_connect(port: int, client: Client) -> bool:
    """TLS, then MQTT 3.1.1 CONNECT: True on CONNACK 0 (both brokers name the client by its CN)."""
    connect_body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", 4) + b"test"
    packet = bytes([0x10, len(connect_body)]) + connect_body
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            _client_context(client).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(packet)
            connack = tls.recv(4)
    except (ssl.SSLError, OSError):
        return False
    return len(connack) == 4 and connack[0] == 0x20 and connack[3] == 0


class Mosquitto:
    def __init__(self, pki: PkiPaths, workdir: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.port: int = probe.getsockname()[1]
        settings = BrokerSettings(pki=pki, listeners=(Listener("127.0.0.1", self.port),))
        render("mosquitto", settings, workdir, default_options(settings, workdir))
        self.log = workdir / "mosquitto.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(workdir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
            )
        ready = Client(pki.ca_cert, pki.controller_cert, pki.controller_key)
        deadline = time.monotonic() + TIMEOUT
        while not _mqtt_connect(self.port, ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not come up: {self.log.read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@pytest.fixture
def mosquittos() -> Iterator[list[Mosquitto]]:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    started: list[Mosquitto] = []
    yield started
    for broker in started:
        broker.stop()


def _mosquitto_accepts(
    pki: PkiPaths, workdir: Path, started: list[Mosquitto], clients: dict[str, Client]
) -> dict[str, bool]:
    """Start a Mosquitto (it reads crl.pem at start), try every client, stop it."""
    broker = Mosquitto(pki, workdir)
    started.append(broker)
    try:
        return {name: _mqtt_connect(broker.port, client) for name, client in clients.items()}
    finally:
        broker.stop()


def test_mosquitto_accepts_a_good_device_and_refuses_a_revoked_one(
    fresh: PkiPaths, mosquittos: list[Mosquitto], tmp_path: Path
) -> None:
    # Mosquitto closes without an alert, so "refused because revoked" is shown as: accepted before
    # the revocation, refused after it (by a restarted Mosquitto; it reads the CRL at start only).
    certs.issue_device(fresh, "gw-victim")
    certs.issue_controller(fresh, "ctl-victim")
    clients = {
        "gw-good": _client(fresh, "gw-good"),
        "gw-victim": _client(fresh, "gw-victim"),
        "ctl-victim": Client(fresh.ca_cert, fresh.controller("ctl-victim").cert, fresh.controller("ctl-victim").key),
        "gw-revoked": _client(fresh, "gw-revoked"),
    }
    before = _mosquitto_accepts(fresh, tmp_path / "before", mosquittos, clients)
    assert before == {"gw-good": True, "gw-victim": True, "ctl-victim": True, "gw-revoked": False}
    certs.revoke(fresh, "gw-victim")  # the issuing CA's CRL
    certs.revoke(fresh, "ctl-victim")  # the root's CRL
    after = _mosquitto_accepts(fresh, tmp_path / "after", mosquittos, clients)
    assert after == {"gw-good": True, "gw-victim": False, "ctl-victim": False, "gw-revoked": False}


def test_mosquitto_on_an_upgraded_pki(tmp_path: Path, mosquittos: list[Mosquitto]) -> None:
    pki = make_legacy_pki(tmp_path / "pki")
    certs.issue_device(pki, "gw-legacy")
    certs.issue_device(pki, "gw-legacy-victim")
    certs.upgrade_pki(pki)
    certs.issue_device(pki, "gw-new")
    certs.issue_device(pki, "gw-new-victim")
    clients = {name: _client(pki, name) for name in ("gw-legacy", "gw-legacy-victim", "gw-new", "gw-new-victim")}
    before = _mosquitto_accepts(pki, tmp_path / "before", mosquittos, clients)
    assert before == dict.fromkeys(clients, True)
    certs.revoke(pki, "gw-legacy-victim")
    certs.revoke(pki, "gw-new-victim")
    after = _mosquitto_accepts(pki, tmp_path / "after", mosquittos, clients)
    assert after == {"gw-legacy": True, "gw-legacy-victim": False, "gw-new": True, "gw-new-victim": False}


# ------------------------------------------------------------- the session brokers of tests/conftest.py


@pytest.mark.parametrize("kind", ["embedded", "mosquitto"])
def test_session_brokers_take_issuing_ca_devices(kind: str, request: pytest.FixtureRequest) -> None:
    """The shared session PKI issues its devices from the issuing CA; both brokers agree on them."""
    endpoint = request.getfixturevalue(kind)
    session_pki: PkiPaths = request.getfixturevalue("pki").paths
    (gw_a,) = [info for info in certs.list_identities(session_pki) if info.name == "gw-a"]
    assert gw_a.issuer is certs.Issuer.ISSUING
    assert _mqtt_connect(endpoint.port, _client(session_pki, "gw-a"))
    assert not _mqtt_connect(endpoint.port, _client(session_pki, "gw-revoked"))
