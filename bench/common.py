"""Shared helpers for the benchmarks: repo path, a throwaway PKI, brokers, a timestamping observer, memory probes.

Benchmarks print exactly one JSON document on stdout; everything for humans goes to stderr via ``say``.
The test helpers in ``tests/`` (MosquittoProcess, FaultProxy, MqttClient, AgentProcess) are reused, not copied.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import paho.mqtt.client as mqtt  # noqa: E402 - after the sys.path fix, like every import below

from certs import PkiPaths, init_pki, issue_device, load_control_key  # noqa: E402
from fleet.protocol.messages import DesiredState  # noqa: E402
from fleet.protocol.signing import sign_control  # noqa: E402
from tests.agentproc import AgentProcess  # noqa: E402
from tests.mqtt import Credentials, Endpoint, MqttClient  # noqa: E402

MIB = 1024 * 1024


def say(message: str) -> None:
    """Progress for humans: stderr only, stdout is reserved for the JSON result."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_and_print(run: Callable[[], dict[str, Any]]) -> int:
    """Run one benchmark and print its JSON document; SIGTERM (run_all's timeout) ends it like Ctrl-C,
    so the ``with`` blocks stop everything it started. Returns the exit code."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run()
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    print(json.dumps(result, indent=2))
    return 0


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll until ``predicate`` holds; returns the monotonic time it did, raises TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def summary_ms(samples_s: list[float]) -> dict[str, Any]:
    """Median and max of durations given in seconds, in milliseconds."""
    millis = [s * 1000.0 for s in samples_s]
    return {
        "median_ms": round(statistics.median(millis), 1),
        "max_ms": round(max(millis), 1),
        "samples_ms": [round(m, 1) for m in millis],
    }


# ---- PKI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchPki:
    paths: PkiPaths
    node_id: str

    @classmethod
    def create(cls, root: Path, node_id: str) -> BenchPki:
        paths = init_pki(root)
        issue_device(paths, node_id)
        return cls(paths, node_id)

    def device(self) -> Credentials:
        client = self.paths.device(self.node_id)
        return Credentials(self.paths.ca_cert, client.cert, client.key)

    def operator(self) -> Credentials:
        return Credentials(self.paths.ca_cert, self.paths.operator_cert, self.paths.operator_key)

    def controller(self) -> Credentials:
        return Credentials(self.paths.ca_cert, self.paths.controller_cert, self.paths.controller_key)

    def signed(self, desired: DesiredState) -> DesiredState:
        """``desired`` for the node, signed with the control key as the controller signs it (agents
        refuse unsigned desired state)."""
        issued_at = desired.issued_at if desired.issued_at is not None else time.time()
        return sign_control(desired, self.node_id, load_control_key(self.paths), issued_at=issued_at)


# ---- brokers -----------------------------------------------------------------------------------


@contextmanager
def running_broker(kind: str, pki: BenchPki, workdir: Path) -> Iterator[Endpoint]:
    """A TLS broker on a free loopback port: a real mosquitto from a rendered config, or the embedded amqtt."""
    if kind == "mosquitto":
        yield from _mosquitto(pki, workdir)
    elif kind == "amqtt":
        yield from _amqtt(pki)
    else:
        raise ValueError(f"unknown broker {kind!r}")


def _mosquitto(pki: BenchPki, workdir: Path) -> Iterator[Endpoint]:
    from tests.conftest import MosquittoProcess

    process = MosquittoProcess(pki.paths, workdir)
    try:
        process.start(pki.controller())
        yield Endpoint("mosquitto", "127.0.0.1", process.port)
    finally:
        process.stop()


def _amqtt(pki: BenchPki) -> Iterator[Endpoint]:
    from broker.embedded import BrokerSettings, Listener, ThreadedBroker

    threaded = ThreadedBroker(BrokerSettings(pki=pki.paths, listeners=(Listener("127.0.0.1", 0),)))
    try:
        threaded.start()
        yield Endpoint("amqtt", "127.0.0.1", threaded.ports[0])
    finally:
        threaded.stop()


# ---- MQTT clients ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stamped:
    at: float  # time.monotonic() when paho's thread handed the message over
    topic: str
    payload: bytes


@dataclass
class StampedClient(MqttClient):
    """An MqttClient that also records the arrival time of every message, for latency measurements."""

    stamped: queue.Queue[Stamped] = field(default_factory=queue.Queue)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.stamped.put(Stamped(time.monotonic(), msg.topic, bytes(msg.payload)))

    def take(self) -> list[Stamped]:
        taken: list[Stamped] = []
        while True:
            try:
                taken.append(self.stamped.get_nowait())
            except queue.Empty:
                return taken


@contextmanager
def mqtt_session(endpoint: Endpoint, creds: Credentials) -> Iterator[StampedClient]:
    client = StampedClient(endpoint, creds)
    try:
        client.connect()
        yield client
    finally:
        client.close()


# ---- the agent process -------------------------------------------------------------------------


@dataclass
class BenchAgent(AgentProcess):
    """AgentProcess at production log level (tests run it at debug, which costs CPU at idle)."""

    log_level: str = "info"

    def start(self, *, failpoints: str = "", wait_connected: bool = True, timeout: float = 20.0) -> BenchAgent:
        self.write_config()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "--config", str(self.config_path), "--log-level", self.log_level],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                # The bench's own FLEET_AGENT_* variables would override the file under test.
                env={k: v for k, v in os.environ.items() if not k.upper().startswith("FLEET_AGENT_")},
            )
        if wait_connected:
            self.wait_log("Connected to control plane", timeout)
        return self


# ---- memory ------------------------------------------------------------------------------------


def proc_status_kib(pid: int | str, field_name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise KeyError(f"{field_name} not in /proc/{pid}/status")


def mib(nbytes: float) -> float:
    return round(nbytes / MIB, 1)


_IMPORT_PROBE = """
import sys
{imports}
for line in open('/proc/self/status'):
    if line.startswith('VmRSS:'):
        print(line.split()[1])
"""


def import_rss_mib(imports: str, repeats: int = 3, timeout: float = 60.0) -> float:
    """Median RSS (MiB) of fresh interpreters that ran only ``imports``; the children run concurrently."""
    code = _IMPORT_PROBE.format(imports=imports)
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
        for _ in range(repeats)
    ]
    values: list[int] = []
    try:
        for child in children:
            out, err = child.communicate(timeout=timeout)
            if child.returncode != 0:
                raise RuntimeError(f"import probe {imports!r} failed: {err.decode(errors='replace')}")
            values.append(int(out.split()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
    return mib(statistics.median(values) * 1024)
