"""``fleet demo``: the whole system on one machine, on embedded defaults, in well under two minutes.

A fresh PKI, the embedded broker, the controller and N real ``fleet-agent`` processes, all as child
processes logging into the work directory; three releases of a tiny HTTP app (1.0.0 and 1.1.0
healthy, 1.2.0 failing its health check); then three rollouts through the controller's HTTPS API,
the authenticated way: the PKI's operator certificate (an admin) labels the canary and creates an
operator API token, and the token starts the rollouts (the audit trail then names it):
1.0.0 in three waves, 1.1.0 in three waves (shipped as deltas), and 1.2.0, which must abort in its
first wave with the canary rolled back and no other node touched. Every check is on what the
controller and the agents report, not on what the demo asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psutil
import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from certs import PkiPaths, init_pki, issue_device
from fleet.controller.facade import NodeOutcome, NodeView, RolloutState, RolloutView, TokenCreated, WaveView
from fleet.protocol.errors import FleetError
from fleet.protocol.signing import load_private_key
from fleet.releases import ReleaseProbe, ReleaseStore, build_release

APP_NAME = "app"
SELECTOR = {"demo": "yes"}
WAVES = ["1", "2", "100%"]  # cumulative: the canary, one more node, then everyone
HEALTH = ReleaseProbe(
    kind="http",
    target="http://127.0.0.1:${APP_PORT}/healthz",
    env=["APP_PORT"],  # each device its own port: the release declares what its probe may expand
    initial_delay=0.3,
    period=0.3,
    timeout=1,
    failure_threshold=2,
)

APP = """#!{python}
import http.server, os
VERSION = {version!r}
HEALTHY = {healthy!r}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if HEALTHY else 500)
        self.end_headers()
        self.wfile.write(VERSION.encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])), Handler).serve_forever()
"""


@dataclass(frozen=True)
class Timings:
    """Short on purpose: the demo shows the mechanics, not production settings."""

    soak: float = 2.0
    health_timeout: float = 10.0
    wave_timeout: float = 60.0
    startup: float = 30.0  # broker, controller, every agent online
    converge: float = 30.0  # after an abort, every node back on its baseline
    poll: float = 0.25
    stop: float = 15.0  # per process group, before SIGKILL


@dataclass(frozen=True)
class DemoOptions:
    agents: int = 5
    workdir: Path | None = None
    keep: bool = False
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class ReleasePlan:
    version: str
    healthy: bool
    edits: int  # bytes changed in the data file: versions differ a little, so deltas are small


RELEASES = (ReleasePlan("1.0.0", True, 0), ReleasePlan("1.1.0", True, 40), ReleasePlan("1.2.0", False, 80))


@dataclass(frozen=True)
class Step:
    name: str
    version: str
    expect_abort: bool

    @property
    def release(self) -> str:
        return f"{APP_NAME}@{self.version}"

    @property
    def expectation(self) -> str:
        return "abort in wave 1, roll back" if self.expect_abort else "succeed on every node"


STEPS = (
    Step("rollout 1", "1.0.0", expect_abort=False),
    Step("rollout 2 (delta update)", "1.1.0", expect_abort=False),
    Step("rollout 3 (bad release)", "1.2.0", expect_abort=True),
)


class DemoFailed(Exception):
    """A step did not do what it should; the message names the step."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the demo cleans up and exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


INTERRUPTED = "interrupted"


@dataclass
class StepResult:
    step: Step
    view: RolloutView | None = None
    seconds: float = 0.0
    problem: str | None = None
    note: str | None = None


# --- the sample app and the releases ------------------------------------------------------------


def app_tree(root: Path, version: str, *, healthy: bool, edits: int) -> Path:
    """The app plus 200 kB of incompressible data (13 chunks of 16 KiB); versions differ by a few
    edited bytes, so a delta is tiny while the full artifact is not."""
    root.mkdir(parents=True)
    run = root / "run"
    run.write_text(APP.format(python=sys.executable, version=version, healthy=healthy))
    run.chmod(0o755)
    data = bytearray(random.Random(7).randbytes(200_000))  # noqa: S311 - test data, not secrets
    edit = random.Random(version)  # noqa: S311
    for _ in range(edits):
        data[edit.randrange(len(data))] = edit.randrange(256)
    (root / "data.bin").write_bytes(bytes(data))
    return root


def build_releases(pki: PkiPaths, sources: Path, store: Path) -> None:
    key = load_private_key(pki.release_key.read_bytes())
    for plan in RELEASES:
        tree = app_tree(sources / plan.version, plan.version, healthy=plan.healthy, edits=plan.edits)
        build_release(tree, name=APP_NAME, version=plan.version, store=store, release_key=key, entry=["./run"],
                      health=HEALTH, chunk_size=16 * 1024)  # fmt: skip


def node_ids(count: int) -> list[str]:
    return [f"gw-demo-{index:02d}" for index in range(1, count + 1)]


# --- child processes ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: a demo killed with SIGKILL still takes its children along."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_env() -> dict[str, str]:
    """The environment without FLEET_* settings: the agent lets the environment win over its file."""
    return {key: value for key, value in os.environ.items() if not key.startswith("FLEET_")}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Children:
    """Every process the demo starts; stopped in groups (agents, controller, broker)."""

    def __init__(self, stop_timeout: float) -> None:
        self.stop_timeout = stop_timeout
        self.groups: dict[str, list[Child]] = {"agents": [], "controller": [], "broker": []}

    def spawn(self, group: str, name: str, argv: list[str], log: Path) -> Child:
        preexec = _die_with_parent if sys.platform == "linux" else None
        with log.open("ab") as out:
            # A session of its own: a Ctrl-C in the terminal reaches only the demo, which stops
            # the children in order instead of all of them at once.
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                       start_new_session=True, preexec_fn=preexec)  # noqa: PLW1509  # fmt: skip
        child = Child(name, process, log)
        self.groups[group].append(child)
        return child

    def stop_all(self) -> None:
        for group in ("agents", "controller", "broker"):
            self._stop(self.groups[group])

    def _stop(self, children: list[Child]) -> None:
        running = [child for child in children if child.process.poll() is None]
        for child in running:
            child.process.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for child in running:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(10)


def leftover_processes(workdir: Path) -> list[psutil.Process]:
    """Processes other than this one whose command line or working directory is under ``workdir``."""
    marker = str(workdir)
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if process.pid == os.getpid():
            continue
        cmdline = " ".join(process.info.get("cmdline") or [])
        cwd = process.info.get("cwd") or ""
        if marker in cmdline or cwd == marker or cwd.startswith(marker + os.sep):
            found.append(process)
    return found


def sweep(workdir: Path) -> list[int]:
    """Kill anything the orderly stop missed (e.g. a workload orphaned by a killed agent)."""
    pids = []
    for process in leftover_processes(workdir):
        with contextlib.suppress(psutil.Error):
            process.kill()
            pids.append(process.pid)
    return pids


def wait_for(check: Callable[[], bool], timeout: float, poll: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(poll)
    return check()


def log_match(child: Child, pattern: str) -> str | None:
    """The first group of ``pattern`` in the child's log; DemoFailed if the child has exited."""
    text = child.log.read_text(errors="replace") if child.log.exists() else ""
    found = re.search(pattern, text)
    if found is None and child.process.poll() is not None:
        raise DemoFailed("start", f"{child.name} exited ({child.process.returncode}); see {child.log}")
    return found.group(1) if found else None


def wait_log(child: Child, pattern: str, timeout: float) -> str:
    seen: list[str] = []

    def found() -> bool:
        value = log_match(child, pattern)
        if value is not None:
            seen.append(value)
        return bool(seen)

    if not wait_for(found, timeout, 0.05):
        raise DemoFailed("start", f"{child.name} not ready within {timeout:.0f}s; see {child.log}")
    return seen[0]


# --- talking to the controller ------------------------------------------------------------------


TOKEN_NAME = "demo-rollouts"  # noqa: S105 - the token's name (the audit trail's actor), not a secret


class ControllerApi:
    """The controller's HTTPS API as an operator uses it: the PKI's CA verifies the server, the
    operator certificate of ``fleet certs init`` (an admin) authenticates; ``use_token`` switches to
    an API token, the way a script or CI job calls it."""

    def __init__(self, url: str, pki: PkiPaths) -> None:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
        context.load_cert_chain(str(pki.operator_cert), str(pki.operator_key))
        self.client = httpx.Client(base_url=url, timeout=10, verify=context)
        self.tokened: httpx.Client | None = None
        self.pki = pki
        self.url = url

    def close(self) -> None:
        self.client.close()
        if self.tokened is not None:
            self.tokened.close()

    def create_token(self, name: str, role: str) -> str:
        response = self.client.post("/v1/tokens", json={"name": name, "role": role, "expires_in": 86400})
        if response.status_code != 201:
            raise DemoFailed("start", f"creating token {name}: HTTP {response.status_code}: {response.text}")
        return TokenCreated.model_validate(response.json()).token

    def use_token(self, token: str) -> None:
        """Changes from now on as the token: no client certificate, ``Authorization: Bearer``."""
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        headers = {"Authorization": f"Bearer {token}"}
        self.tokened = httpx.Client(base_url=self.url, timeout=10, verify=context, headers=headers)

    @property
    def changes(self) -> httpx.Client:
        return self.tokened or self.client

    def nodes(self) -> list[NodeView]:
        response = self.client.get("/v1/nodes", params={"selector": "demo=yes", "limit": 1000})
        response.raise_for_status()
        return [NodeView.model_validate(item) for item in response.json()["items"]]

    def rollout(self, rollout_id: str) -> RolloutView:
        response = self.client.get(f"/v1/rollouts/{rollout_id}")
        response.raise_for_status()
        return RolloutView.model_validate(response.json())

    def label(self, node: str, labels: dict[str, str]) -> None:
        """Set operator labels: only an operator's ``ring=canary`` makes a node a canary."""
        response = self.client.patch(f"/v1/nodes/{node}/labels", json=labels)
        if response.status_code != 200:
            raise DemoFailed("start", f"labelling {node}: HTTP {response.status_code}: {response.text}")

    def start_rollout(self, release: str, timings: Timings) -> RolloutView:
        body = {"release": release, "selector": SELECTOR, "waves": WAVES, "soak": timings.soak,
                "wave_timeout": timings.wave_timeout, "health_timeout": timings.health_timeout,
                "max_failures": "1"}  # fmt: skip
        # An idempotency key: a retry after a lost answer would get the same rollout, not a second one.
        key = {"Idempotency-Key": f"demo-{release}"}
        response = self.changes.post("/v1/rollouts", json=body, headers=key)
        if response.status_code not in (200, 201):
            raise DemoFailed(f"start {release}", f"HTTP {response.status_code}: {response.text}")
        return RolloutView.model_validate(response.json())


# --- live progress ------------------------------------------------------------------------------


class Progress:
    """One line per change of a node (version, update state, health, outcome), a wave or a rollout."""

    def __init__(self, console: Console, started: float) -> None:
        self.console = console
        self.started = started
        self.nodes: dict[str, tuple[Any, ...]] = {}
        self.outcomes: dict[str, NodeOutcome] = {}
        self.waves: dict[int, tuple[bool, bool]] = {}
        self.state: RolloutState | None = None
        self.versions_seen: dict[str, set[str]] = {}

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started:6.1f}s[/dim]  {text}", highlight=False)

    def new_rollout(self) -> None:
        self.outcomes, self.waves, self.state = {}, {}, None

    def show_nodes(self, nodes: list[NodeView]) -> None:
        for node in nodes:
            if node.version:
                self.versions_seen.setdefault(node.id, set()).add(node.version)
            key = (node.status, node.version, node.update_state, node.healthy)
            if self.nodes.get(node.id) != key:
                self.nodes[node.id] = key
                health = {True: "healthy", False: "[red]unhealthy[/red]", None: "-"}[node.healthy]
                self.say(f"{node.id}  {node.status}  version {node.version or '-'}  "
                         f"{node.update_state or '-'}  {health}")  # fmt: skip

    def show_rollout(self, view: RolloutView) -> None:
        for wave in view.waves:
            self._show_wave(view, wave)
        for node, outcome in view.nodes.items():
            if self.outcomes.get(node, NodeOutcome.PENDING) != outcome:
                self.say(f"{node}  -> [bold]{outcome}[/bold]")
            self.outcomes[node] = outcome
        if view.state != self.state:
            self.state = view.state
            detail = f" ({view.detail})" if view.detail else ""
            self.say(f"[bold]{view.release}: {view.state}[/bold]{detail}")

    def _show_wave(self, view: RolloutView, wave: WaveView) -> None:
        flags = (wave.started_at is not None, wave.finished_at is not None)
        before = self.waves.get(wave.index, (False, False))
        if flags[0] and not before[0]:
            self.say(f"{view.release}: wave {wave.index + 1}/{len(view.waves)} started ({wave.nodes} nodes)")
        if flags[1] and not before[1]:
            self.say(f"{view.release}: wave {wave.index + 1}/{len(view.waves)} finished")
        self.waves[wave.index] = flags


# --- the demo -----------------------------------------------------------------------------------


class Demo:
    def __init__(self, options: DemoOptions, console: Console, workdir: Path) -> None:
        self.options = options
        self.timings = options.timings
        self.console = console
        self.workdir = workdir
        self.pki = PkiPaths(workdir / "pki")
        self.store = workdir / "store"
        self.nodes = node_ids(options.agents)
        self.children = Children(self.timings.stop)
        self.progress = Progress(console, time.monotonic())
        self.results: list[StepResult] = []
        self.api: ControllerApi | None = None
        self.failure: str | None = None  # "<step>: <what went wrong>"

    # setup

    def setup(self) -> None:
        self.progress.say(f"work dir {self.workdir}")
        init_pki(self.pki.root)
        for node in self.nodes:
            issue_device(self.pki, node)
        build_releases(self.pki, self.workdir / "src", self.store)
        self.progress.say(f"PKI, {len(self.nodes)} device certificates and releases "
                          f"{', '.join(plan.version for plan in RELEASES)} built")  # fmt: skip
        broker_port = self.start_broker()
        self.api = ControllerApi(self.start_controller(broker_port), self.pki)
        for node in self.nodes:
            self.start_agent(node, broker_port)
        self.wait_online()

    def start_broker(self) -> int:
        argv = [sys.executable, "-m", "fleet", "broker", "--certs", str(self.pki.root), "--listen", "127.0.0.1:0"]
        child = self.children.spawn("broker", "broker", argv, self.workdir / "broker.log")
        port = int(wait_log(child, r"Broker listening on 127\.0\.0\.1:(\d+)", self.timings.startup))
        self.progress.say(f"embedded broker on 127.0.0.1:{port} (mutual TLS)")
        return port

    def start_controller(self, broker_port: int) -> str:
        argv = [sys.executable, "-m", "fleet", "controller", "--certs", str(self.pki.root),
                "--broker", f"127.0.0.1:{broker_port}", "--db", str(self.workdir / "fleet.db"),
                "--store", str(self.store), "--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                "--stale-after", "5", "--offline-after", "15"]  # fmt: skip
        child = self.children.spawn("controller", "controller", argv, self.workdir / "controller.log")
        url = wait_log(child, r"controller API on (https://\S+)", self.timings.startup)
        metrics = wait_log(child, r"controller metrics on (http://\S+)", self.timings.startup)
        self.progress.say(f"controller API on {url} (HTTPS: an operator certificate or an API token)")
        self.progress.say(f"  reach it (with --keep): FLEET_CONTROLLER={url} FLEET_CERTS={self.pki.root} fleet nodes")
        self.progress.say(f"  Prometheus metrics, no credentials: {metrics}")
        return url

    def start_agent(self, node: str, broker_port: int) -> None:
        directory = self.workdir / "agents" / node
        directory.mkdir(parents=True)
        config = directory / "agent.yaml"
        config.write_text(yaml.safe_dump(self.agent_settings(node, directory, broker_port)))
        argv = [sys.executable, "-m", "agent.cli", "--config", str(config)]
        self.children.spawn("agents", node, argv, directory / "agent.log")

    def agent_settings(self, node: str, directory: Path, broker_port: int) -> dict[str, Any]:
        device = self.pki.device(node)
        return {
            "node_id": node,
            "server_addr": f"127.0.0.1:{broker_port}",
            "tls": {"ca": str(self.pki.ca_cert), "cert": str(device.cert), "key": str(device.key)},
            "state_dir": str(directory / "state"),
            "labels": SELECTOR,
            "heartbeat_interval": "1s",
            "keepalive": "5s",
            "reconnect": {"initial": "100ms", "maximum": "1s", "jitter": "100ms"},
            "release_public_key": str(self.pki.release_pub),
            # Desired state and commands must be signed with the PKI's control key (the controller does).
            "controller_public_key": str(self.pki.device_control_pub(node)),
            "workload": {
                # Before the first release: an idle placeholder (the path names it as the demo's).
                "command": [sys.executable, "-c", "import time; time.sleep(3600)", str(directory)],
                "env": {"APP_PORT": str(free_port())},
                "restart_backoff": {"initial": "200ms", "maximum": "1s", "jitter": 0},
            },
            "update": {"window": 8, "request_timeout": "3s", "health_grace": "1s"},
        }

    def wait_online(self) -> None:
        def online() -> bool:
            for child in self.children.groups["agents"]:
                if child.process.poll() is not None:
                    raise DemoFailed("start", f"agent {child.name} exited; see {child.log}")
            nodes = self.controller.nodes()
            self.progress.show_nodes(nodes)
            return {node.id for node in nodes if node.status == "online"} >= set(self.nodes)

        if not wait_for(online, self.timings.startup, self.timings.poll):
            raise DemoFailed("start", f"not every agent online within {self.timings.startup:.0f}s")
        self.controller.label(self.nodes[0], {"ring": "canary"})
        self.progress.say(
            f"{len(self.nodes)} agents online ({self.nodes[0]} is the canary: operator label ring=canary)"
        )
        self.controller.use_token(self.controller.create_token(TOKEN_NAME, "operator"))
        self.progress.say(f"API token {TOKEN_NAME} (role operator) created; the rollouts are started with it")

    @property
    def controller(self) -> ControllerApi:
        assert self.api is not None
        return self.api

    # rollouts

    def run_steps(self) -> None:
        for step in STEPS:
            result = StepResult(step)
            self.results.append(result)
            try:
                self.run_step(step, result)
            except DemoFailed as exc:
                result.problem = str(exc)
                raise
            except Interrupted:
                result.problem = INTERRUPTED
                raise

    def run_step(self, step: Step, result: StepResult) -> None:
        self.progress.say(f"[bold cyan]{step.name}: {step.release} in waves {','.join(WAVES)}, "
                          f"expected to {step.expectation}[/bold cyan]")  # fmt: skip
        before = {node.id: node for node in self.controller.nodes()}
        started = time.monotonic()
        view = self.watch(step, self.controller.start_rollout(step.release, self.timings).id)
        result.view, result.seconds = view, time.monotonic() - started
        starter = next((action for action in view.actions if action.action == "start_rollout"), None)
        if starter is None or starter.actor != TOKEN_NAME:
            raise DemoFailed(step.name, f"the audit trail does not name {TOKEN_NAME} as the starter: {view.actions}")
        if step.expect_abort:
            result.note = self.check_aborted(step, view, before)
            result.seconds = time.monotonic() - started
        else:
            self.check_succeeded(step, view)
            result.note = self.delta_note(step)

    def watch(self, step: Step, rollout_id: str) -> RolloutView:
        self.progress.new_rollout()
        deadline = time.monotonic() + self.timings.wave_timeout * len(WAVES) + 30
        while time.monotonic() < deadline:
            self.progress.show_nodes(self.controller.nodes())
            view = self.controller.rollout(rollout_id)
            self.progress.show_rollout(view)
            if view.state in (RolloutState.SUCCEEDED, RolloutState.ABORTED):
                return view
            time.sleep(self.timings.poll)
        raise DemoFailed(step.name, f"rollout {rollout_id} did not finish in time")

    def check_succeeded(self, step: Step, view: RolloutView) -> None:
        if view.state != RolloutState.SUCCEEDED:
            raise DemoFailed(step.name, f"rollout {view.state}: {view.detail or 'no detail'}")
        if len(view.waves) != len(WAVES) or any(wave.nodes == 0 for wave in view.waves):
            raise DemoFailed(step.name, f"expected {len(WAVES)} non-empty waves, got {[w.nodes for w in view.waves]}")
        if set(view.nodes) != set(self.nodes) or set(view.nodes.values()) != {NodeOutcome.SUCCEEDED}:
            raise DemoFailed(step.name, f"not every node succeeded: {dict(view.nodes)}")
        self.wait_versions(step, step.version)

    def check_aborted(self, step: Step, view: RolloutView, before: dict[str, NodeView]) -> str:
        if view.state != RolloutState.ABORTED:
            raise DemoFailed(step.name, f"expected the rollout to abort, it {view.state}")
        first = view.waves[0] if view.waves else None
        if view.current_wave != 0 or first is None or any(w.started_at is not None for w in view.waves[1:]):
            raise DemoFailed(step.name, "the rollout went past wave 1")
        touched = {node for node, outcome in view.nodes.items() if outcome != NodeOutcome.PENDING}
        if self.nodes[0] not in touched or len(touched) != first.nodes:
            raise DemoFailed(step.name, f"wave 1 should be the canary alone, touched: {sorted(touched)}")
        if not touched <= {n for n, o in view.nodes.items() if o in (NodeOutcome.FAILED, NodeOutcome.ROLLED_BACK)}:
            raise DemoFailed(step.name, f"wave 1 nodes did not fail: {dict(view.nodes)}")
        self.check_untouched(step, set(self.nodes) - touched, before)
        baseline = STEPS[STEPS.index(step) - 1].version
        self.wait_versions(step, baseline)
        self.progress.say(f"every node back on {baseline}")
        return (f"{', '.join(sorted(touched))} failed its health check and went back to {baseline}; "
                f"the other {len(self.nodes) - len(touched)} nodes never received {step.version}")  # fmt: skip

    def check_untouched(self, step: Step, untouched: set[str], before: dict[str, NodeView]) -> None:
        for node in sorted(untouched):
            now = next(view for view in self.controller.nodes() if view.id == node)
            on_disk = self.workdir / "agents" / node / "state" / "releases" / step.version
            if (
                step.version in self.progress.versions_seen.get(node, set())
                or now.generation != before[node].generation
                or on_disk.exists()
            ):
                raise DemoFailed(step.name, f"{node} is outside wave 1 but received {step.release}")

    def wait_versions(self, step: Step, version: str) -> None:
        def converged() -> bool:
            nodes = self.controller.nodes()
            self.progress.show_nodes(nodes)
            return len(nodes) == len(self.nodes) and all(node.version == version for node in nodes)

        if not wait_for(converged, self.timings.converge, self.timings.poll):
            versions = {node.id: node.version for node in self.controller.nodes()}
            raise DemoFailed(step.name, f"not every node on {version}: {versions}")

    def delta_note(self, step: Step) -> str | None:
        index = STEPS.index(step)
        if index == 0:
            return None
        store = ReleaseStore(self.store)
        base = store.get(APP_NAME, STEPS[index - 1].version)
        target = store.get(APP_NAME, step.version)
        delta = store.delta_path(base, target)
        if not delta.exists():
            return None
        full = store.artifact_path(target).stat().st_size
        return f"shipped as a {delta.stat().st_size / 1024:.1f} kB delta instead of {full / 1024:.0f} kB"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- summary ------------------------------------------------------------------------------------


COUNTED = (NodeOutcome.SUCCEEDED, NodeOutcome.FAILED, NodeOutcome.UNREACHABLE, NodeOutcome.ROLLED_BACK)


def _seconds(wave: WaveView, view: RolloutView) -> str:
    if wave.started_at is None:
        return "-"
    end = wave.finished_at if wave.finished_at is not None else view.updated
    return f"{end - wave.started_at:.1f}s"


def summary_table(results: list[StepResult]) -> Table:
    """Per rollout and wave; a rollout's state is green when it did what it should, red when not."""
    table = Table(title=f"fleet demo: rollouts of {APP_NAME}", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), show_edge=False)  # fmt: skip
    for column in ("release", "state", "wave"):
        table.add_column(column, no_wrap=True)
    for column in ("nodes", "succeeded", "failed", "unreach-\nable", "rolled\nback", "time"):
        table.add_column(column, justify="right", no_wrap=True)
    for result in results:
        _add_rows(table, result)
    return table


def _add_rows(table: Table, result: StepResult) -> None:
    step, view = result.step, result.view
    style = {None: "green", INTERRUPTED: "yellow"}.get(result.problem, "red")
    if view is None:
        state = "stopped" if result.problem == INTERRUPTED else "-"
        table.add_row(step.version, f"[{style}]{state}[/{style}]", *[""] * 7, end_section=True)
        return
    for wave in view.waves:
        first = wave.index == 0
        counts = [str(wave.counts.get(outcome, 0)) for outcome in COUNTED]
        table.add_row(
            step.version if first else "",
            f"[{style}]{view.state}[/{style}]" if first else "",
            f"{wave.index + 1}/{len(view.waves)}",
            str(wave.nodes),
            *counts,
            _seconds(wave, view),
        )
    table.add_row("", "", "all", str(len(view.nodes)), *[""] * 4, f"{result.seconds:.1f}s", end_section=True)


# --- running it ---------------------------------------------------------------------------------


SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def raise_on_signals() -> dict[int, SignalHandler]:
    """SIGINT and SIGTERM raise Interrupted in the main thread; returns the previous handlers."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}


def ignore_signals() -> None:
    """While cleaning up: a second Ctrl-C must not leave processes behind."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def restore_signals(previous: dict[int, SignalHandler]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def prepare_workdir(workdir: Path | None) -> tuple[Path, bool]:
    """The work dir and whether the demo created it as a temp dir (then it is removed unless --keep)."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="fleet-demo-")).resolve(), True
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise ValueError(f"--workdir {workdir}: not empty")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir, False


def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; the exit code: 0 when every step did what it should, 1 otherwise, 128+signal."""
    workdir, temporary = prepare_workdir(options.workdir)
    demo = Demo(options, console, workdir)
    started = time.monotonic()
    code = 1
    previous = raise_on_signals()
    try:
        code = _run(demo)
    except Interrupted as exc:
        code = 128 + exc.signum
    finally:
        ignore_signals()
        _clean_up(demo)
        _finish(demo, options, temporary, time.monotonic() - started, code)
        restore_signals(previous)
    return code


def _run(demo: Demo) -> int:
    try:
        demo.setup()
        demo.run_steps()
    except DemoFailed as exc:
        demo.failure = str(exc)
        demo.console.print(f"[red bold]demo failed at {exc}[/red bold]", highlight=False)
        return 1
    except Interrupted as exc:
        demo.console.print(f"[yellow]interrupted ({exc}): stopping every process[/yellow]")
        return 128 + exc.signum
    except (httpx.HTTPError, OSError, FleetError) as exc:
        step = demo.results[-1].step.name if demo.results else "start"
        demo.failure = f"{step}: {exc}"
        demo.console.print(f"[red bold]demo failed at {demo.failure}[/red bold]", highlight=False)
        return 1
    return 0


def _clean_up(demo: Demo) -> None:
    if demo.api is not None:
        demo.api.close()
    demo.children.stop_all()
    killed = sweep(demo.workdir)
    if killed:
        demo.console.print(f"[yellow]killed leftover processes {killed}[/yellow]")


def _finish(demo: Demo, options: DemoOptions, temporary: bool, seconds: float, code: int) -> None:
    if demo.results:
        demo.console.print(summary_table(demo.results))
        for result in demo.results:
            starters = [a for a in result.view.actions if a.action == "start_rollout"] if result.view else []
            if starters:
                who = f"started by {starters[0].actor} ({starters[0].via}, request {starters[0].request_id[:8]})"
                demo.console.print(f"{result.step.release}: {who}", highlight=False)
            if result.note:
                demo.console.print(f"{result.step.release}: {result.note}", highlight=False)
    verdict = {0: "[green bold]demo succeeded[/green bold]", 1: "[red bold]demo FAILED[/red bold]"}.get(
        code, "[yellow bold]demo interrupted[/yellow bold]"
    )
    failure = f" at {demo.failure}" if demo.failure else ""
    demo.console.print(f"{verdict} in {seconds:.1f}s with {len(demo.nodes)} agents{failure}", highlight=False)
    if temporary and not options.keep and code != 1:  # a failed demo keeps its logs for a look
        shutil.rmtree(demo.workdir, ignore_errors=True)
        return
    demo.console.print(f"work dir kept: {demo.workdir} (logs: broker.log, controller.log, agents/*/agent.log, "
                       "agents/*/state/workload.log)", highlight=False)  # fmt: skip
