"""Embedded broker start-up, listeners and bad input."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.embedded import BrokerSettings, BrokerStartError, Listener, ThreadedBroker, parse_listen, running_broker
from certs import PkiPaths, init_pki, issue_device, revoke
from fleet.protocol.errors import ConfigError
from fleet.protocol.topics import Channel, node_topic
from tests.conftest import Pki
from tests.mqtt import Credentials, Endpoint, MqttClient, connected, wait_until

pytestmark = pytest.mark.timeout(60)


def test_defect_7_secondary_listener_keeps_its_own_settings(pki: Pki) -> None:
    """amqtt copied unset fields from the default listener; here listener 2 stays unlimited."""
    settings = BrokerSettings(
        pki=pki.paths, listeners=(Listener("127.0.0.1", 0, max_connections=1), Listener("127.0.0.1", 0))
    )
    with running_broker(settings) as threaded:
        assert threaded.broker is not None
        assert threaded.broker.listeners_config["listener1"].max_connections == 0
        second = Endpoint("amqtt", "127.0.0.1", threaded.ports[1])
        clients = [MqttClient(second, pki.device(node)) for node in ("gw-a", "gw-b")]
        try:
            assert all(client.try_connect() for client in clients)
        finally:
            for client in clients:
                client.close()


def test_ipv6_loopback_listener(pki: Pki) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with running_broker(BrokerSettings(pki=pki.paths, listeners=(Listener("::1", 0),))) as threaded:
        client = MqttClient(Endpoint("amqtt", "::1", threaded.ports[0]), pki.device("gw-a"))
        try:
            assert client.try_connect()
        finally:
            client.close()


def test_port_in_use_is_a_one_line_error(pki: Pki) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        threaded = ThreadedBroker(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", port),)))
        try:
            with pytest.raises(BrokerStartError, match=re.escape(f"127.0.0.1:{port}")):
                threaded.start()
        finally:
            threaded.stop()


def test_missing_certificates_name_the_file(tmp_path: Path) -> None:
    threaded = ThreadedBroker(BrokerSettings(pki=PkiPaths(tmp_path), listeners=(Listener("127.0.0.1", 0),)))
    try:
        with pytest.raises(BrokerStartError, match=r"ca\.pem"):
            threaded.start()
    finally:
        threaded.stop()


@pytest.mark.parametrize("value", ["8883", "localhost:", ":8883", "host:99999", "host:port"])
def test_bad_listen_values(value: str) -> None:
    with pytest.raises(ConfigError, match="--listen"):
        parse_listen(value)


def test_listen_accepts_ipv6_brackets() -> None:
    assert parse_listen("[::1]:8883") == Listener("::1", 8883)


def test_cli_reports_a_busy_port_in_one_line(pki: Pki) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fleet", "broker", "--certs", str(pki.paths.root), "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip() == f"fleet: error: --listen 127.0.0.1:{port}: Address already in use"


def test_a_will_that_slips_past_connect_is_still_neither_delivered_nor_retained(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Second line for issue 11: with the CONNECT check switched off, the single way into delivery
    and the retained store (``_broadcast_message`` / ``retain_message``) still holds the policy."""
    monkeypatch.setattr("broker.embedded.will_refusal", lambda *args: None)
    topic = node_topic("gw-a", Channel.DESIRED)
    with running_broker(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 0),))) as threaded:
        broker = threaded.broker
        assert broker is not None
        endpoint = Endpoint("amqtt", "127.0.0.1", threaded.ports[0])
        with connected(endpoint, pki.controller()) as controller:
            controller.subscribe(topic)
            attacker = MqttClient(endpoint, pki.device("gw-b"), will=(topic, b"forged will", 1, True)).connect()
            attacker.cut()
            wait_until(lambda: broker.stats.unattributed_dropped == 2, 10, "the will refused for delivery and retain")
            assert controller.drain(settle=0.3) == []
        assert topic not in broker.retained_messages
        assert broker.stats.will_denied == 0


def test_an_older_crl_put_back_does_not_unrevoke(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: restoring an old crl.pem (a backup, a careless copy) must not un-revoke anybody:
    CRL numbers never go backwards, so the broker keeps the newer list and says why."""
    paths = init_pki(tmp_path / "pki")
    for node in ("gw-old", "gw-new"):
        issue_device(paths, node)
    ca = paths.ca_cert
    threaded = ThreadedBroker(BrokerSettings(pki=paths, listeners=(Listener("127.0.0.1", 0),), crl_poll_interval=0.1))
    threaded.start()
    try:
        endpoint = Endpoint("amqtt", "127.0.0.1", threaded.ports[0])

        def refused(node: str) -> bool:
            client = paths.device(node)
            attempt = MqttClient(endpoint, Credentials(ca, client.cert, client.key))
            try:
                return not attempt.try_connect()
            finally:
                attempt.close()

        revoke(paths, "gw-old")
        older = paths.crl.read_bytes()
        revoke(paths, "gw-new")
        wait_until(lambda: refused("gw-new"), 10, "gw-new refused once revoked")
        caplog.set_level(logging.ERROR, logger="broker.embedded")
        paths.crl.write_bytes(older)
        os.utime(paths.crl, (time.time() + 5, time.time() + 5))  # a change the poller cannot miss
        wait_until(lambda: "keeping the last good CRL" in caplog.text, 10, "the older CRL refused")
        assert "number" in caplog.text
        assert refused("gw-new"), "an older CRL un-revoked gw-new"
        assert refused("gw-old")
    finally:
        threaded.stop()
