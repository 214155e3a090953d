"""Fault sources for the fault-injection suite: links cut at random, simulated fleets as processes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.faultproxy import FaultProxy
from tests.mqtt import Endpoint

_JOIN_TIMEOUT = 15.0


class LinkChaos:
    """Cuts each proxied link at random intervals (uniform in ``every``) from a background thread,
    so every device loses its connection every few seconds, each at its own moments."""

    def __init__(self, proxies: dict[str, FaultProxy], every: tuple[float, float], seed: int) -> None:
        self.proxies = proxies
        self.every = every
        self.cuts: dict[str, int] = dict.fromkeys(proxies, 0)
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="link-chaos", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> LinkChaos:
        self._thread.start()
        return self

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join(_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise AssertionError("link chaos thread did not stop")
        if self.error is not None:
            raise AssertionError("link chaos thread failed") from self.error
        return self.cuts

    def _main(self) -> None:
        now = time.monotonic()
        due = {name: now + self._rng.uniform(*self.every) for name in self.proxies}
        try:
            while not self._stop.is_set():
                name = min(due, key=due.__getitem__)
                if self._stop.wait(max(0.0, due[name] - time.monotonic())):
                    return
                self.cuts[name] += self.proxies[name].cut()
                due[name] = time.monotonic() + self._rng.uniform(*self.every)
        except BaseException as exc:  # reported by stop(), in the test thread
            self.error = exc


@dataclass
class SimProcess:
    """``fleet sim`` as a real process; SIGTERM ends it and its JSON report is read from stdout."""

    certs: Path  # the PKI directory
    broker: Endpoint
    workdir: Path
    prefix: str
    agents: int
    options: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)

    def node_ids(self) -> list[str]:
        return [f"{self.prefix}{index:05d}" for index in range(self.agents)]

    def start(self) -> SimProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "fleet", "sim", "--agents", str(self.agents), "--prefix", self.prefix,
            "--broker", f"{self.broker.host}:{self.broker.port}", "--certs", str(self.certs),
            "--duration", "3600",
        ]  # fmt: skip
        for name, value in self.options.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        run = len(self.reports)
        with (
            (self.workdir / f"report-{run}.json").open("wb") as report,
            (self.workdir / f"sim-{run}.log").open("wb") as log,
        ):
            self.process = subprocess.Popen(command, stdout=report, stderr=log)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """True while running; raises with the end of its log once it has exited (for wait loops)."""
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.workdir / f"sim-{len(self.reports)}.log").read_text()
            raise AssertionError(f"fleet sim {self.prefix} exited {self.process.returncode}:\n{log[-2000:]}")
        return True

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """End the simulation (devices publish offline and disconnect) and return its report."""
        assert self.process is not None
        run = len(self.reports)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"fleet sim {self.prefix} did not stop on SIGTERM") from None
        output = (self.workdir / f"report-{run}.json").read_text()
        if self.process.returncode != 0 or not output.strip():
            log = (self.workdir / f"sim-{run}.log").read_text()
            raise AssertionError(f"fleet sim {self.prefix} exited {self.process.returncode}:\n{log[-4000:]}")
        report: dict[str, Any] = json.loads(output)
        self.reports.append(report)
        return report

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
