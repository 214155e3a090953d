"""Idle cost of one real ``fleet-agent`` process with TLS: memory, CPU, bytes on the wire, reconnect latency.

    python bench/agent_idle.py [--duration 60] [--broker mosquitto|amqtt] [--quick]

Prints ONE JSON document on stdout (progress on stderr). Everything runs on loopback: a throwaway PKI,
a broker on a free port, tests/faultproxy.FaultProxy between agent and broker, an operator observer and a
controller publisher connected straight to the broker. Targets come from issue 3 ("Benchmarks").
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.common import (
    BenchAgent,
    BenchPki,
    Stamped,
    StampedClient,
    import_rss_mib,
    mib,
    mqtt_session,
    proc_status_kib,
    run_and_print,
    running_broker,
    say,
    summary_ms,
    wait_for,
)
from fleet.protocol.codec import decode, encode
from fleet.protocol.messages import DesiredState, Heartbeat, Reported
from fleet.protocol.topics import Channel, node_topic
from tests.faultproxy import FaultProxy, ProxyStats

NODE = "gw-bench"
TARGET_RSS_MIB = 40.0
TARGET_CPU_PERCENT = 0.5
TARGET_RECONNECT_MS = 1000.0
KEEPALIVE_S = 30.0
RECONNECT = {"initial": 0.1, "maximum": 1.0, "jitter": 0.1}
HEARTBEAT_ITERATIONS = 1000
WAIT_S = 15.0  # bound on every single wait for the agent or the broker

# Cumulative import steps, each in a fresh interpreter (DESIGN.md section 7 measured the same idea).
IMPORT_STEPS: tuple[tuple[str, str], ...] = (
    ("bare_interpreter", ""),
    ("paho_mqtt", "import paho.mqtt.client"),
    ("plus_pydantic_fleet_protocol", "import pydantic, fleet.protocol.messages"),
    ("plus_sqlite3", "import sqlite3"),
    ("plus_agent_daemon_whole_agent", "import agent.config, agent.daemon"),
    ("plus_cryptography_ed25519", "from cryptography.hazmat.primitives.asymmetric import ed25519"),
)
DESIGN_IMPORT_BASELINE_MB = {
    "bare_interpreter": 8.9,
    "paho_mqtt": 21.7,
    "plus_pydantic_one_model": 32.6,
    "plus_cryptography_ed25519": 39.8,
    "plus_sqlite3_after_ed25519": 40.9,
}


# ---- arguments and signals ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60.0, help="idle measurement window, seconds")
    parser.add_argument("--broker", choices=["mosquitto", "amqtt"], default="mosquitto")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0, help="agent heartbeat_interval, seconds")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after connect before the window opens")
    parser.add_argument("--rounds", type=int, default=5, help="reconnect rounds")
    parser.add_argument("--outage", type=float, default=2.0, help="seconds the proxy refuses per reconnect round")
    parser.add_argument("--quick", action="store_true", help="skip the import breakdown, one reconnect round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    if args.duration <= 0 or args.rounds < 1 or args.heartbeat_interval < 1:
        parser.error("--duration must be > 0, --rounds >= 1, --heartbeat-interval >= 1")
    return args


# ---- in-process measurements -------------------------------------------------------------------


def _heartbeat(seq: int, state_dir: str) -> Heartbeat:
    """The same metric collection as Agent._send_heartbeat."""
    return Heartbeat(
        seq=seq,
        uptime=3600.0 + seq,
        cpu=psutil.cpu_percent(interval=None),
        mem_free=psutil.virtual_memory().available,
        disk_free=psutil.disk_usage(state_dir).free,
        latency_ms=1.234,
        version=None,
    )


def _mean_us(action: Any, iterations: int) -> float:
    start = time.perf_counter()
    for seq in range(iterations):
        action(seq)
    return (time.perf_counter() - start) / iterations * 1e6


def measure_heartbeat_cost(state_dir: Path, heartbeat_interval: float) -> dict[str, Any]:
    say(f"heartbeat cost: {HEARTBEAT_ITERATIONS} iterations in-process")
    folder = str(state_dir)
    psutil.cpu_percent(interval=None)
    _mean_us(lambda seq: encode(_heartbeat(seq, folder)), 20)  # warm-up: pydantic and psutil caches
    total_us = _mean_us(lambda seq: encode(_heartbeat(seq, folder)), HEARTBEAT_ITERATIONS)
    sample = _heartbeat(120, folder)
    encode_us = _mean_us(lambda _seq: encode(sample), HEARTBEAT_ITERATIONS)
    payload = encode(sample)
    topic = node_topic(NODE, Channel.HEARTBEAT)
    return {
        "iterations": HEARTBEAT_ITERATIONS,
        "mean_us": round(total_us, 1),
        "encode_only_mean_us": round(encode_us, 1),
        "encoded_bytes": len(payload),
        # QoS 0 PUBLISH: fixed header (2) + topic length (2) + topic + payload; TLS adds ~22-29 per record.
        "mqtt_publish_bytes": 4 + len(topic) + len(payload),
        "cpu_percent_at_interval": round(total_us / 1e6 / heartbeat_interval * 100, 6),
        "target_cpu_percent": TARGET_CPU_PERCENT,
    }


def measure_imports() -> dict[str, Any]:
    breakdown: dict[str, Any] = {}
    imports: list[str] = []
    for name, statement in IMPORT_STEPS:
        if statement:
            imports.append(statement)
        breakdown[name] = import_rss_mib("\n".join(imports))
        say(f"import breakdown: {name} {breakdown[name]} MiB")
    return {
        "unit": "MiB RSS of a fresh interpreter, cumulative, median of 3",
        "rss_mib": breakdown,
        "baseline_design_s7_mb": DESIGN_IMPORT_BASELINE_MB,
        "target_mib": TARGET_RSS_MIB,
    }


# ---- the rig: broker, proxy, observer, controller, agent ---------------------------------------


@dataclass
class Rig:
    proxy: FaultProxy
    observer: StampedClient
    controller: StampedClient
    agent: BenchAgent
    pki: BenchPki
    seen: list[Stamped] = field(default_factory=list)

    def collect(self) -> list[Stamped]:
        self.seen.extend(self.observer.take())
        return self.seen

    def on(self, channel: Channel, since: float = 0.0, until: float = float("inf")) -> list[Stamped]:
        topic = node_topic(NODE, channel)
        return [m for m in self.collect() if m.topic == topic and since <= m.at <= until]


def agent_settings(heartbeat_interval: float) -> dict[str, Any]:
    return {
        "heartbeat_interval": heartbeat_interval,
        "keepalive": KEEPALIVE_S,
        "connect_timeout": 10.0,
        "config_poll_interval": 2.0,  # the agent's default
        "reconnect": dict(RECONNECT),
    }


def build_rig(stack: ExitStack, args: argparse.Namespace, workdir: Path) -> Rig:
    say(f"PKI and {args.broker} broker in {workdir}")
    pki = BenchPki.create(workdir / "pki", NODE)
    endpoint = stack.enter_context(running_broker(args.broker, pki, workdir / "broker"))
    proxy = stack.enter_context(FaultProxy(endpoint.host, endpoint.port))
    observer = stack.enter_context(mqtt_session(endpoint, pki.operator()))
    observer.subscribe(f"fleet/v1/nodes/{NODE}/#")
    controller = stack.enter_context(mqtt_session(endpoint, pki.controller()))
    via_proxy = type(endpoint)(endpoint.kind, "127.0.0.1", proxy.port)
    agent = BenchAgent(NODE, via_proxy, pki.device(), workdir / "agent", extra=agent_settings(args.heartbeat_interval))
    stack.callback(agent.stop)
    return Rig(proxy, observer, controller, agent, pki)


# ---- idle: memory, CPU, wire -------------------------------------------------------------------


@dataclass
class Window:
    seconds: float
    cpu_seconds: float
    before: ProxyStats
    after: ProxyStats
    opened: float
    closed: float
    peak_uss: int
    peak_rss_sampled: int


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def observe_window(rig: Rig, duration: float) -> Window:
    process = psutil.Process(rig.agent.pid)
    before, cpu_before, opened = rig.proxy.stats, _cpu_seconds(process), time.monotonic()
    peak_uss = peak_rss = 0
    while (left := opened + duration - time.monotonic()) > 0:
        info = process.memory_full_info()  # reads smaps: once a second is cheap and barely disturbs the agent
        peak_uss, peak_rss = max(peak_uss, info.uss), max(peak_rss, info.rss)
        time.sleep(min(1.0, left))
    cpu_after, closed, after = _cpu_seconds(process), time.monotonic(), rig.proxy.stats
    return Window(closed - opened, cpu_after - cpu_before, before, after, opened, closed, peak_uss, peak_rss)


def start_agent(rig: Rig) -> float:
    say("starting fleet-agent (TLS, via the fault proxy)")
    started = time.monotonic()
    rig.agent.start(timeout=WAIT_S)
    wait_for(lambda: bool(rig.on(Channel.REPORTED)), WAIT_S, "the agent's first reported")
    return started


def wait_first_heartbeat(rig: Rig, started: float, heartbeat_interval: float) -> float:
    timeout = max(0.0, started + heartbeat_interval + WAIT_S - time.monotonic())
    wait_for(lambda: bool(rig.on(Channel.HEARTBEAT)), timeout, "the first heartbeat")
    return rig.on(Channel.HEARTBEAT)[0].at - started


def _mapped(pid: int, needle: str) -> bool:
    return needle in Path(f"/proc/{pid}/maps").read_text()


def measure_idle(rig: Rig, args: argparse.Namespace) -> dict[str, Any]:
    started = start_agent(rig)
    pid = rig.agent.pid
    rss_connected = proc_status_kib(pid, "VmRSS") * 1024
    say(f"connected; settling {args.settle}s, then a {args.duration}s idle window")
    time.sleep(args.settle)
    window = observe_window(rig, args.duration)
    first_heartbeat_s = wait_first_heartbeat(rig, started, args.heartbeat_interval)
    rss_idle = proc_status_kib(pid, "VmRSS") * 1024
    uss_idle = psutil.Process(pid).memory_full_info().uss
    memory = {
        "rss_after_connect_mib": mib(rss_connected),
        "idle_rss_mib": mib(rss_idle),
        "target_mib": TARGET_RSS_MIB,
        "idle_uss_mib": mib(uss_idle),
        "peak_uss_mib": mib(max(window.peak_uss, uss_idle)),
        "peak_rss_mib": mib(proc_status_kib(pid, "VmHWM") * 1024),
        "first_heartbeat_after_start_s": round(first_heartbeat_s, 2),
        "cryptography_loaded": _mapped(pid, "cryptography"),
        "note": "idle_rss_mib is read after connect and after the first heartbeat; peak_rss_mib is VmHWM",
    }
    return {"idle_memory": memory, "idle_cpu": cpu_result(window), "wire": wire_result(rig, window)}


def cpu_result(window: Window) -> dict[str, Any]:
    return {
        "window_s": round(window.seconds, 2),
        "cpu_seconds": round(window.cpu_seconds, 3),
        "cpu_percent_of_one_core": round(window.cpu_seconds / window.seconds * 100, 3),
        "target_percent": TARGET_CPU_PERCENT,
    }


def wire_result(rig: Rig, window: Window) -> dict[str, Any]:
    up = window.after.bytes_up - window.before.bytes_up
    down = window.after.bytes_down - window.before.bytes_down
    per_hour = (up + down) * 3600.0 / window.seconds
    return {
        "window_s": round(window.seconds, 2),
        "bytes_up": up,
        "bytes_down": down,
        "bytes_total": up + down,
        "bytes_per_hour": round(per_hour),
        "kib_per_hour": round(per_hour / 1024, 1),
        "heartbeats_in_window": len(rig.on(Channel.HEARTBEAT, window.opened, window.closed)),
        "health_messages_in_window": len(rig.on(Channel.HEALTH, window.opened, window.closed)),
        "connect_bytes": window.before.bytes_up + window.before.bytes_down,
        "keepalive_s": KEEPALIVE_S,
        "target": None,
        "note": "TLS+MQTT bytes seen by the proxy, extrapolated from the window; connect_bytes = everything "
        "before the window (TLS handshake, CONNECT, SUBSCRIBE, online status, reported); no target in issue 3",
    }


# ---- reconnect to desired state applied --------------------------------------------------------


def _real_accepts(stats: ProxyStats) -> int:
    return stats.accepted - stats.refused


def _reported_at(rig: Rig, generation: int) -> float | None:
    topic = node_topic(NODE, Channel.REPORTED)
    for message in rig.collect():
        if message.topic == topic and decode(message.topic, message.payload, Reported).generation == generation:
            return message.at
    return None


def wait_reported(rig: Rig, generation: int, timeout: float) -> float:
    """Arrival time, at the operator observer, of the agent's reported for ``generation``."""
    wait_for(lambda: _reported_at(rig, generation) is not None, timeout, f"reported generation {generation}", 0.001)
    arrived = _reported_at(rig, generation)
    assert arrived is not None
    return arrived


def reconnect_round(rig: Rig, generation: int, outage: float) -> tuple[float, float]:
    rig.proxy.refuse(True)
    rig.proxy.cut()
    desired = DesiredState(generation=generation, config={"bench_round": generation}, issued_at=time.time())
    rig.controller.publish(node_topic(NODE, Channel.DESIRED), encode(rig.pki.signed(desired)), qos=1, retain=True)
    time.sleep(outage)  # long enough for the agent's backoff to reach its cap
    before = _real_accepts(rig.proxy.stats)
    reopened = time.monotonic()
    rig.proxy.refuse(False)
    tcp = wait_for(lambda: _real_accepts(rig.proxy.stats) > before, WAIT_S, "the agent's TCP reconnect", 0.001)
    reported = wait_reported(rig, generation, WAIT_S)
    return reported - reopened, reported - tcp


def measure_reconnect(rig: Rig, rounds: int, outage: float) -> dict[str, Any]:
    to_applied: list[float] = []
    from_tcp: list[float] = []
    for generation in range(1, rounds + 1):
        total, after_tcp = reconnect_round(rig, generation, outage)
        say(f"reconnect round {generation}: {total * 1000:.0f} ms to applied ({after_tcp * 1000:.0f} ms after TCP)")
        to_applied.append(total)
        from_tcp.append(after_tcp)
        time.sleep(0.5)  # let the outbox drain before the next cut
    return {
        "rounds": rounds,
        "outage_s": outage,
        "reconnect_to_applied": summary_ms(to_applied),
        "tcp_connect_to_reported": summary_ms(from_tcp),
        "target_ms": TARGET_RECONNECT_MS,
        "backoff_s": dict(RECONNECT),
        "note": "the agent config sets reconnect initial 100ms, maximum 1s, jitter 100ms for this bench; "
        "reconnect_to_applied counts from the proxy accepting again, so it includes the backoff wait",
    }


# ---- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "bench": "agent_idle",
        "python": platform.python_version(),
        "broker": args.broker,
        "duration_s": args.duration,
        "quick": args.quick,
        "agent_config": {"tls": True, "log_level": "info", **agent_settings(args.heartbeat_interval)},
    }
    with tempfile.TemporaryDirectory(prefix="bench-agent-idle-") as tmp, ExitStack() as stack:
        result["heartbeat_cost"] = measure_heartbeat_cost(Path(tmp), args.heartbeat_interval)
        if not args.quick:
            result["import_breakdown"] = measure_imports()
        rig = build_rig(stack, args, Path(tmp))
        result |= measure_idle(rig, args)
        result["reconnect"] = measure_reconnect(rig, args.rounds, args.outage)
        say("done; stopping agent, proxy and broker")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_print(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
