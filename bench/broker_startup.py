"""Broker start time, memory and mTLS fleet connect time: embedded amqtt vs Mosquitto, same run.

    python bench/broker_startup.py [--devices 200]

Prints one JSON document. Each broker runs as its own process on a free loopback port with the
same freshly generated PKI; N devices (real paho clients, mutual TLS) connect one after another,
each subscribing to its own retained desired state, while N retained desired documents exist.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.embedded import BrokerSettings, Listener
from broker.render import default_options, render
from certs import PkiPaths, init_pki, issue_device
from fleet.protocol.topics import Channel, node_topic

DEADLINE = 60.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_context(pki: PkiPaths, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(cert), str(key))
    return context


def wait_tls_ready(port: int, pki: PkiPaths, process: subprocess.Popen[bytes]) -> None:
    context = tls_context(pki, pki.controller_cert, pki.controller_key)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"broker exited with {process.returncode}")
        try:
            with (
                socket.create_connection(("127.0.0.1", port), 1) as raw,
                context.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except OSError:
            time.sleep(0.005)
    raise RuntimeError("broker did not come up")


@contextmanager
def broker_process(kind: str, pki: PkiPaths, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, float]]:
    port = free_port()
    if kind == "mosquitto":
        settings = BrokerSettings(pki=pki, listeners=(Listener("127.0.0.1", port),))
        render("mosquitto", settings, workdir, default_options(settings, workdir))
        command = ["mosquitto", "-c", str(workdir / "mosquitto.conf")]
    else:
        command = [sys.executable, "-m", "fleet", "broker", "--certs", str(pki.root), "--listen", f"127.0.0.1:{port}"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_tls_ready(port, pki, process)
        yield process, port, time.monotonic() - started
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def client(pki: PkiPaths, client_id: str, cert: Path, key: Path) -> mqtt.Client:
    result = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, protocol=mqtt.MQTTv311)
    result.tls_set_context(tls_context(pki, cert, key))
    return result


def publish_desired(pki: PkiPaths, port: int, devices: list[str]) -> None:
    controller = client(pki, "fleet-controller", pki.controller_cert, pki.controller_key)
    controller.connect("127.0.0.1", port)
    controller.loop_start()
    try:
        infos = [controller.publish(node_topic(d, Channel.DESIRED), b"x" * 200, qos=1, retain=True) for d in devices]
        for info in infos:
            info.wait_for_publish(DEADLINE)
    finally:
        controller.disconnect()
        controller.loop_stop()


def connect_fleet(pki: PkiPaths, port: int, devices: list[str]) -> tuple[float, int]:
    """Connect every device in turn; each waits for its own retained desired state. Returns
    (seconds, foreign retained messages received: must be 0)."""
    clients = []
    foreign = 0
    started = time.monotonic()
    try:
        for device in devices:
            paths = pki.device(device)
            c = client(pki, device, paths.cert, paths.key)
            got: list[str] = []
            c.on_message = lambda _c, _u, m, got=got: got.append(m.topic)  # type: ignore[misc]
            c.connect("127.0.0.1", port)
            c.loop_start()
            clients.append(c)
            c.subscribe(node_topic(device, Channel.DESIRED), 1)
            deadline = time.monotonic() + DEADLINE
            while node_topic(device, Channel.DESIRED) not in got:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{device} never got its desired state")
                time.sleep(0.001)
            foreign += sum(1 for topic in got if topic != node_topic(device, Channel.DESIRED))
        return time.monotonic() - started, foreign
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()


def measure(kind: str, pki: PkiPaths, devices: list[str], workdir: Path) -> dict[str, float | int]:
    log(f"{kind}: starting")
    with broker_process(kind, pki, workdir) as (process, port, start_seconds):
        rss_idle = psutil.Process(process.pid).memory_info().rss
        publish_desired(pki, port, devices)
        seconds, foreign = connect_fleet(pki, port, devices)
        rss_connected = psutil.Process(process.pid).memory_info().rss
    return {
        "start_seconds": round(start_seconds, 3),
        "idle_rss_mib": round(rss_idle / 2**20, 1),
        "rss_after_fleet_mib": round(rss_connected / 2**20, 1),
        "fleet_connect_seconds": round(seconds, 2),
        "connect_ms_per_device": round(seconds * 1000 / len(devices), 1),
        "foreign_retained_received": foreign,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        pki = init_pki(root / "pki")
        devices = [f"gw-{index:05d}" for index in range(args.devices)]
        log(f"issuing {len(devices)} device certificates")
        for device in devices:
            issue_device(pki, device)
        results = {kind: measure(kind, pki, devices, root / kind) for kind in ("amqtt", "mosquitto")}
    print(
        json.dumps(
            {
                "benchmark": "broker_startup",
                "devices": args.devices,
                "cpu_count": os.cpu_count(),
                "embedded_amqtt": results["amqtt"],
                "baseline_mosquitto": results["mosquitto"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
