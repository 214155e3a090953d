"""The HTTP API against an in-memory ControllerFacade: routes, status codes, error bodies, metrics, OpenAPI."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fleet.controller.api import ApiServer, create_app, parse_metric_key, serve_in_thread
from fleet.controller.bounds import check_operator_label
from fleet.controller.facade import (
    AckRecord,
    BadRequest,
    CommandView,
    Conflict,
    HealthRecord,
    NodeDetail,
    NodeOutcome,
    NodeStatus,
    NodeView,
    NotFound,
    RolloutRequest,
    RolloutState,
    RolloutView,
    WaveView,
)
from fleet.protocol.errors import ConfigError, TransportError

pytestmark = pytest.mark.timeout(30)

RELEASES = frozenset({"app@1.2.0", "app@1.3.0"})
ACTIONS = frozenset({"restart", "ping", "rollback"})


class MemoryController:
    """A small ControllerFacade: enough behaviour to exercise every route and error of the API.

    Commands gain one ack per read (accepted, then done) and a running rollout finishes one node per
    read, so clients that poll see a trail grow and a rollout end without any clock in the test.
    """

    def __init__(self) -> None:
        now = time.time()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._nodes = {
            view.id: view
            for view in (
                NodeView(id="gw-0001", status=NodeStatus.ONLINE, version="1.1.0", healthy=True, last_seen=now,
                         labels={"ring": "canary", "site": "plant-3"}),
                NodeView(id="gw-0002", status=NodeStatus.ONLINE, version="1.1.0", healthy=True, last_seen=now,
                         labels={"ring": "main", "site": "plant-3"}),
                NodeView(id="gw-0003", status=NodeStatus.OFFLINE, version="1.0.0", last_seen=now - 600,
                         labels={"ring": "main", "site": "plant-7"}),
            )
        }  # fmt: skip
        self._nodes = {
            node: view.model_copy(update={"reported_labels": view.labels}) for node, view in self._nodes.items()
        }
        self._health = {"gw-0001": [HealthRecord(ts=now - 5, healthy=True, detail="all checks passed")]}
        self._commands: dict[str, CommandView] = {}
        self._rollouts: dict[str, RolloutView] = {}

    # ---- nodes and commands ----

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        wanted = (selector or {}).items()
        return [view for view in self._nodes.values() if wanted <= view.labels.items()]

    def node(self, node_id: str) -> NodeDetail:
        view = self._known(node_id)
        commands = [command for command in self._commands.values() if command.node == node_id]
        return NodeDetail(node=view, health_history=self._health.get(node_id, []), commands=commands)

    def send_command(
        self, node_id: str, action: str, args: dict[str, Any] | None = None, expires_in: float = 3600.0
    ) -> CommandView:
        self._known(node_id)
        if action not in ACTIONS:
            raise BadRequest(f"unknown action {action!r}; known: {', '.join(sorted(ACTIONS))}")
        now = time.time()
        command = CommandView(
            id=f"cmd-{next(self._ids)}", node=node_id, action=action, args=args or {}, status="pending",
            created=now, expires_at=now + expires_in, attempts=1,
        )  # fmt: skip
        self._commands[command.id] = command
        return command

    def command(self, command_id: str) -> CommandView:
        with self._lock:
            command = self._commands.get(command_id)
            if command is None:
                raise NotFound(f"no command {command_id!r}")
            trail = ("accepted", "done")
            offline = self._nodes[command.node].status is NodeStatus.OFFLINE  # never answers
            if not offline and len(command.acks) < len(trail):
                status = trail[len(command.acks)]
                detail = "restarting in 1s" if status == "accepted" else None
                acks = [*command.acks, AckRecord(status=status, detail=detail, ts=time.time())]
                command = command.model_copy(update={"acks": acks, "status": status})
                self._commands[command_id] = command
            return command

    def set_labels(self, node_id: str, labels: dict[str, str | None], *, replace_all: bool = False) -> NodeView:
        view = self._known(node_id)
        problems = [problem for key, value in labels.items() if (problem := check_operator_label(key, value))]
        if problems:
            raise BadRequest("; ".join(problems))
        operator = {} if replace_all else dict(view.operator_labels)
        for key, value in labels.items():
            if value is None:
                operator.pop(key, None)
            else:
                operator[key] = value
        effective = view.reported_labels | operator
        self._nodes[node_id] = view.model_copy(update={"operator_labels": operator, "labels": effective})
        return self._nodes[node_id]

    def _known(self, node_id: str) -> NodeView:
        view = self._nodes.get(node_id)
        if view is None:
            raise NotFound(f"no node {node_id!r}")
        return view

    # ---- rollouts ----

    def start_rollout(self, request: RolloutRequest) -> RolloutView:
        if request.release not in RELEASES:
            raise NotFound(f"no release {request.release!r} in the store")
        matched = sorted(view.id for view in self.nodes(request.selector))
        if not matched:
            raise BadRequest(f"selector {request.selector} matches no node")
        for other in self._rollouts.values():
            if other.selector == request.selector and other.state not in {RolloutState.ABORTED, RolloutState.SUCCEEDED}:
                raise Conflict(f"rollout {other.id} is already {other.state.value} for this selector")
        now = time.time()
        waves = [WaveView(index=0, nodes=1, started_at=now), WaveView(index=1, nodes=len(matched) - 1)]
        view = RolloutView(
            id=f"ro-{next(self._ids)}", release=request.release, selector=request.selector,
            state=RolloutState.RUNNING, current_wave=0, waves=waves, created=now, updated=now,
            nodes=dict.fromkeys(matched, NodeOutcome.PENDING),
        )  # fmt: skip
        self._rollouts[view.id] = view
        return view

    def rollouts(self) -> list[RolloutView]:
        return list(self._rollouts.values())

    def rollout(self, rollout_id: str) -> RolloutView:
        with self._lock:
            view = self._rollout(rollout_id)
            if view.state is RolloutState.RUNNING:
                view = self._advance(view)
            return view

    def _advance(self, view: RolloutView) -> RolloutView:
        """One more node succeeds; waves fill in order; the rollout succeeds when none is pending."""
        pending = [node for node, outcome in view.nodes.items() if outcome is NodeOutcome.PENDING]
        outcomes = {**view.nodes, pending[0]: NodeOutcome.SUCCEEDED} if pending else dict(view.nodes)
        done = sum(outcome is NodeOutcome.SUCCEEDED for outcome in outcomes.values())
        waves, start = [], 0
        for wave in view.waves:
            finished = min(max(done - start, 0), wave.nodes)
            waves.append(wave.model_copy(update={"counts": {NodeOutcome.SUCCEEDED: finished}}))
            start += wave.nodes
        current = 0 if done < view.waves[0].nodes else len(view.waves) - 1
        state = RolloutState.SUCCEEDED if len(pending) <= 1 else RolloutState.RUNNING
        update = {"nodes": outcomes, "waves": waves, "current_wave": current, "state": state, "updated": time.time()}
        self._rollouts[view.id] = view.model_copy(update=update)
        return self._rollouts[view.id]

    def pause_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.RUNNING}, RolloutState.PAUSED)

    def resume_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.PAUSED}, RolloutState.RUNNING)

    def abort_rollout(self, rollout_id: str) -> RolloutView:
        return self._move(rollout_id, {RolloutState.RUNNING, RolloutState.PAUSED}, RolloutState.ABORTED)

    def _move(self, rollout_id: str, allowed: set[RolloutState], target: RolloutState) -> RolloutView:
        with self._lock:
            view = self._rollout(rollout_id)
            if view.state not in allowed:
                raise Conflict(f"rollout {rollout_id} is {view.state.value}; cannot go to {target.value}")
            detail = "aborted by operator" if target is RolloutState.ABORTED else None
            view = view.model_copy(update={"state": target, "updated": time.time(), "detail": detail})
            self._rollouts[rollout_id] = view
            return view

    def _rollout(self, rollout_id: str) -> RolloutView:
        view = self._rollouts.get(rollout_id)
        if view is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return view

    # ---- metrics ----

    def metrics(self) -> dict[str, float]:
        values: dict[str, float] = {f'fleet_nodes{{status="{status.value}"}}': 0 for status in NodeStatus}
        for view in self._nodes.values():
            values[f'fleet_nodes{{status="{view.status.value}"}}'] += 1
        values["fleet_commands_pending"] = sum(c.status == "pending" for c in self._commands.values())
        values["fleet_heartbeats_total"] = 1234
        values['fleet_rollouts{state="running"}'] = sum(
            r.state is RolloutState.RUNNING for r in self._rollouts.values()
        )
        values["not a metric{"] = 1  # a controller bug must not break the scrape
        return values


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(MemoryController())) as test_client:
        yield test_client


def errors_by_code(client: TestClient) -> dict[str, float]:
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    return {sample.labels["code"]: sample.value for sample in families["fleet_api_errors"].samples}


# ---- nodes ----


def test_nodes_list_all_and_by_selector(client: TestClient) -> None:
    every = client.get("/nodes")
    assert every.status_code == 200
    assert [node["id"] for node in every.json()] == ["gw-0001", "gw-0002", "gw-0003"]
    plant3 = client.get("/nodes", params={"selector": "site=plant-3"}).json()
    assert [node["id"] for node in plant3] == ["gw-0001", "gw-0002"]
    canary = client.get("/nodes", params={"selector": "ring=canary, site=plant-3"}).json()
    assert [node["id"] for node in canary] == ["gw-0001"]
    assert canary[0]["status"] == "online" and canary[0]["labels"] == {"ring": "canary", "site": "plant-3"}


def test_operator_labels_put_and_patch(client: TestClient) -> None:
    put = client.put("/nodes/gw-0002/labels", json={"ring": "canary", "owner": "team-a"})
    assert put.status_code == 200
    node = put.json()
    assert node["operator_labels"] == {"ring": "canary", "owner": "team-a"}
    assert node["reported_labels"] == {"ring": "main", "site": "plant-3"}
    assert node["labels"] == {"ring": "canary", "site": "plant-3", "owner": "team-a"}  # the operator's ring wins
    patched = client.patch("/nodes/gw-0002/labels", json={"owner": None, "tier": "gold"}).json()
    assert patched["operator_labels"] == {"ring": "canary", "tier": "gold"}
    selected = client.get("/nodes", params={"selector": "ring=canary"}).json()
    assert [view["id"] for view in selected] == ["gw-0001", "gw-0002"]
    assert client.put("/nodes/gw-0002/labels", json={}).json()["operator_labels"] == {}
    assert client.get("/nodes/gw-0002").json()["node"]["labels"] == {"ring": "main", "site": "plant-3"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("put", "/nodes/gw-9999/labels", {"ring": "canary"}, 404, "no node 'gw-9999'"),
        ("patch", "/nodes/gw-0001/labels", {"ring": "can ary"}, 400, "label ring='can ary': the value must be"),
        ("patch", "/nodes/gw-0001/labels", {"a,b": "x"}, 400, "label key 'a,b': 1-63 characters"),
        ("put", "/nodes/gw-0001/labels", {"ring": None}, 422, "body.ring: Input should be a valid string"),
        ("patch", "/nodes/gw-0001/labels", {"ring": 3}, 422, "body.ring: Input should be a valid string"),
        ("patch", "/nodes/gw-0001/labels", ["ring"], 422, "body: Input should be a valid dictionary"),
    ],
)
def test_operator_label_errors(client: TestClient, method: str, path: str, body: Any, status: int, error: str) -> None:
    response = client.request(method.upper(), path, json=body)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)


def test_nodes_malformed_selector_is_400(client: TestClient) -> None:
    response = client.get("/nodes", params={"selector": "ring"})
    assert response.status_code == 400
    assert response.json() == {"error": "selector 'ring': expected key=value[,key=value...], got 'ring'"}


def test_node_detail_and_unknown_node(client: TestClient) -> None:
    detail = client.get("/nodes/gw-0001")
    assert detail.status_code == 200
    body = detail.json()
    assert body["node"]["id"] == "gw-0001"
    assert body["health_history"][0]["detail"] == "all checks passed"
    missing = client.get("/nodes/gw-9999")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no node 'gw-9999'"}


# ---- commands ----


def test_send_command_then_follow_its_acks(client: TestClient) -> None:
    sent = client.post("/nodes/gw-0001/commands", json={"action": "restart", "args": {"delay": 1}, "expires_in": 60})
    assert sent.status_code == 201
    command = sent.json()
    assert command["status"] == "pending" and command["args"] == {"delay": 1} and command["node"] == "gw-0001"
    assert command["expires_at"] == pytest.approx(command["created"] + 60)
    first = client.get(f"/commands/{command['id']}").json()
    second = client.get(f"/commands/{command['id']}").json()
    assert [ack["status"] for ack in first["acks"]] == ["accepted"]
    assert [ack["status"] for ack in second["acks"]] == ["accepted", "done"] and second["status"] == "done"
    assert client.get("/nodes/gw-0001").json()["commands"][0]["id"] == command["id"]


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/nodes/gw-9999/commands", {"action": "restart"}, 404, "no node 'gw-9999'"),
        ("/nodes/gw-0001/commands", {"action": "explode"}, 400,
         "unknown action 'explode'; known: ping, restart, rollback"),
        ("/nodes/gw-0001/commands", {}, 422, "body.action: Field required"),
        ("/nodes/gw-0001/commands", {"action": "ping", "expires_in": -1}, 422,
         "body.expires_in: Input should be greater than 0"),
    ],
)  # fmt: skip
def test_send_command_errors(client: TestClient, path: str, body: dict[str, Any], status: int, error: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status
    assert response.json() == {"error": error}


def test_unknown_command_is_404(client: TestClient) -> None:
    response = client.get("/commands/cmd-404")
    assert response.status_code == 404
    assert response.json() == {"error": "no command 'cmd-404'"}


def test_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = client.post("/nodes/gw-0001/commands", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert list(response.json()) == ["error"] and "\n" not in response.json()["error"]


# ---- rollouts ----


def start(client: TestClient, **overrides: Any) -> httpx2.Response:
    body = {"release": "app@1.2.0", "selector": {"site": "plant-3"}, "waves": ["50%", "100%"], "soak": 0} | overrides
    return client.post("/rollouts", json=body)


def test_rollout_lifecycle(client: TestClient) -> None:
    started = start(client)
    assert started.status_code == 201
    rollout = started.json()
    assert rollout["state"] == "running" and rollout["release"] == "app@1.2.0"
    assert [wave["nodes"] for wave in rollout["waves"]] == [1, 1]
    rid = rollout["id"]
    assert [view["id"] for view in client.get("/rollouts").json()] == [rid]
    assert client.post(f"/rollouts/{rid}/pause").json()["state"] == "paused"
    assert client.get(f"/rollouts/{rid}").json()["state"] == "paused"
    assert client.post(f"/rollouts/{rid}/resume").json()["state"] == "running"
    aborted = client.post(f"/rollouts/{rid}/abort")
    assert aborted.status_code == 200
    assert aborted.json()["state"] == "aborted" and aborted.json()["detail"] == "aborted by operator"


def test_rollout_progress_is_reported_per_wave(client: TestClient) -> None:
    rid = start(client).json()["id"]
    first = client.get(f"/rollouts/{rid}").json()
    assert first["waves"][0]["counts"] == {"succeeded": 1}
    final = client.get(f"/rollouts/{rid}").json()
    assert final["state"] == "succeeded" and final["waves"][1]["counts"] == {"succeeded": 1}


def test_rollout_errors(client: TestClient) -> None:
    unknown_release = start(client, release="app@9.9.9")
    assert (unknown_release.status_code, unknown_release.json()) == (
        404,
        {"error": "no release 'app@9.9.9' in the store"},
    )
    nothing = start(client, selector={"site": "mars"})
    assert (nothing.status_code, nothing.json()) == (400, {"error": "selector {'site': 'mars'} matches no node"})
    rid = start(client).json()["id"]
    twice = start(client)
    assert twice.status_code == 409
    assert twice.json() == {"error": f"rollout {rid} is already running for this selector"}
    resume_running = client.post(f"/rollouts/{rid}/resume")
    assert resume_running.status_code == 409
    assert client.get("/rollouts/ro-404").status_code == 404
    assert client.post("/rollouts/ro-404/abort").json() == {"error": "no rollout 'ro-404'"}
    invalid = start(client, soak=-1)
    assert (invalid.status_code, invalid.json()) == (
        422,
        {"error": "body.soak: Input should be greater than or equal to 0"},
    )
    assert client.post("/rollouts", json={"selector": {}}).json() == {"error": "body.release: Field required"}


def test_routing_errors_keep_the_error_body(client: TestClient) -> None:
    unknown = client.get("/no/such/route")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Not Found: GET /no/such/route"})
    wrong_method = client.delete("/nodes")
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"error": "Method Not Allowed: DELETE /nodes"})


class FailingController(MemoryController):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def nodes(self, selector: dict[str, str] | None = None) -> list[NodeView]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [
        (TransportError("broker 127.0.0.1:8883 unreachable"), 503, "broker 127.0.0.1:8883 unreachable"),
        (RuntimeError("bug\nwith two lines"), 500, "internal error: RuntimeError"),
    ],
)
def test_unexpected_errors_keep_the_body_shape(error: Exception, status: int, body: str) -> None:
    with TestClient(create_app(FailingController(error)), raise_server_exceptions=False) as failing:
        response = failing.get("/nodes")
        assert (response.status_code, response.json()) == (status, {"error": body})
        assert errors_by_code(failing) == {str(status): 1.0}


# ---- service routes ----


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"ok": True}


def test_metrics_parse_and_count_errors_by_code(client: TestClient) -> None:
    client.get("/nodes/gw-9999")
    client.get("/nodes/gw-9998")
    client.get("/nodes", params={"selector": "="})
    client.post("/nodes/gw-0001/commands", json={})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE fleet_nodes gauge" in response.text
    assert "# TYPE fleet_api_errors_total counter" in response.text
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    nodes = {sample.labels["status"]: sample.value for sample in families["fleet_nodes"].samples}
    assert nodes == {"online": 2.0, "stale": 0.0, "offline": 1.0}
    assert families["fleet_commands_pending"].type == "gauge"
    assert families["fleet_heartbeats"].type == "counter"
    assert families["fleet_heartbeats"].samples[0].value == 1234
    assert families["fleet_rollouts"].samples[0].labels == {"state": "running"}
    assert "not a metric" not in response.text
    assert errors_by_code(client) == {"400": 1.0, "404": 2.0, "422": 1.0}


def test_metric_keys_are_parsed_with_their_labels() -> None:
    assert parse_metric_key('fleet_nodes{status="online"}') == ("fleet_nodes", {"status": "online"})
    assert parse_metric_key('x{a="1",b="q\\"z"}') == ("x", {"a": "1", "b": 'q"z'})
    assert parse_metric_key("plain_gauge") == ("plain_gauge", {})
    for bad in ("9lives", "x{a=1}", 'x{a="1"', 'x{a="1",,}'):
        with pytest.raises(ValueError, match="metric key"):
            parse_metric_key(bad)


def test_openapi_describes_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "fleet controller" and schema["info"]["version"]
    paths = schema["paths"]
    assert set(paths) == {
        "/nodes", "/nodes/{node_id}", "/nodes/{node_id}/commands", "/nodes/{node_id}/labels", "/commands/{command_id}",
        "/rollouts", "/rollouts/{rollout_id}", "/rollouts/{rollout_id}/pause",
        "/rollouts/{rollout_id}/resume", "/rollouts/{rollout_id}/abort", "/metrics", "/healthz",
    }  # fmt: skip
    assert set(paths["/rollouts"]) == {"get", "post"}
    created = paths["/rollouts"]["post"]["responses"]
    assert created["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RolloutView"}
    assert created["409"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert {"NodeView", "NodeDetail", "CommandView", "CommandRequest", "RolloutRequest"} <= set(
        schema["components"]["schemas"]
    )


# ---- a real server ----


def test_serve_in_thread_on_port_zero() -> None:
    server = serve_in_thread(create_app(MemoryController()), "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert server.start() is server  # already running: no second bind
        with httpx.Client(base_url=server.url, timeout=5) as http:
            assert http.get("/healthz").json() == {"ok": True}
            assert http.get("/nodes/gw-9999").status_code == 404
        assert any(thread.name == f"fleet-api-{server.port}" for thread in threading.enumerate())
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 5
    assert not any(thread.name == f"fleet-api-{server.port}" for thread in threading.enumerate())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_port_in_use_is_a_one_line_error() -> None:
    first = ApiServer(create_app(MemoryController()), "127.0.0.1", 0).start()
    try:
        with pytest.raises(ConfigError, match=rf"--http 127.0.0.1:{first.port}: cannot listen"):
            ApiServer(create_app(MemoryController()), "127.0.0.1", first.port).start()
    finally:
        first.stop()
