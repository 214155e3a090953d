"""The HTTP API against an in-memory ControllerFacade: routes, roles, audit trail, idempotency, pages,
status codes, error bodies, metrics, OpenAPI; then a real HTTPS server with PKI client certificates.

The real controller process (auth, audit and metrics listener end to end) is tests/fleet/test_api_access.py.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from certs import AccessRole, issue_device, issue_operator, revoke
from fleet.controller.api import ApiServer, TlsFiles, allowed_hosts, create_app, create_metrics_app, serve_in_thread
from fleet.controller.auth import CertificateAuthenticator, HostCheck
from fleet.controller.facade import NodeStatus, NodeView
from fleet.controller.selectors import Selector
from fleet.protocol.errors import ConfigError, TransportError
from tests.conftest import Pki
from tests.fleet.apisupport import Access, MemoryController, bearer, memory_access

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def controller() -> MemoryController:
    return MemoryController()


@pytest.fixture
def access(controller: MemoryController) -> Access:
    return memory_access(controller)


@pytest.fixture
def client(controller: MemoryController, access: Access) -> Iterator[TestClient]:
    """An operator."""
    with TestClient(create_app(controller, access.security), headers=bearer(access.tokens["operator"])) as test:
        yield test


def as_role(client: TestClient, access: Access, role: str) -> dict[str, str]:
    return bearer(access.tokens[role])


def responses_by_code(client: TestClient, access: Access) -> dict[str, float]:
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    return {s.labels["code"]: s.value for s in families["fleet_api_responses"].samples if s.name.endswith("_total")}


def audit(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/audit", params=params)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


# ---- authentication and roles ----


def test_no_credentials_is_401_one_line_json(controller: MemoryController, access: Access) -> None:
    with TestClient(create_app(controller, access.security)) as anonymous:
        for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/rollouts"), ("GET", "/metrics"), ("GET", "/v1/x")):
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (path, response.text)
            assert response.json() == {
                "error": "no credentials: present an operator certificate or send Authorization: Bearer <token>"
            }
            assert response.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.get("/healthz").status_code == 200  # public, and cheap
        assert anonymous.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        ("Bearer fleet_0123456789abcdef_" + "A" * 43, "unknown token"),
        ("Bearer nonsense", "malformed bearer token"),
        ("Basic dXNlcjpwdw==", "Authorization must be 'Bearer <token>'"),
        ("Bearer ", "Authorization must be 'Bearer <token>'"),
    ],
)
def test_bad_tokens_are_401(controller: MemoryController, access: Access, authorization: str, error: str) -> None:
    with TestClient(create_app(controller, access.security), headers={"Authorization": authorization}) as bad:
        response = bad.post("/v1/nodes/gw-0001/commands", json={"action": "restart"})
    assert (response.status_code, response.json()) == (401, {"error": error})
    assert controller.sent == 0


def test_a_token_with_one_wrong_character_is_refused(controller: MemoryController, access: Access) -> None:
    token = access.tokens["admin"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    with TestClient(create_app(controller, access.security), headers=bearer(forged)) as bad:
        assert bad.get("/v1/nodes").json() == {"error": "unknown token"}


def test_expired_and_revoked_tokens_are_401_and_change_nothing(controller: MemoryController, access: Access) -> None:
    tokens = access.security.tokens
    _view, short = tokens.create("short-lived", AccessRole.OPERATOR, 60, "test")
    _view, revoked = tokens.create("revoked", AccessRole.OPERATOR, None, "test")
    tokens.revoke("revoked")
    app = create_app(controller, access.security)
    with TestClient(app, headers=bearer(short)) as early:
        assert early.get("/v1/nodes").status_code == 200
    access.clock.now += 61
    time.sleep(0)  # the token table is re-read at most once a second; expiry is checked on every request
    for token, error in ((short, "token 'short-lived' expired"), (revoked, "token 'revoked' was revoked")):
        with TestClient(app, headers=bearer(token)) as refused:
            response = refused.post("/v1/nodes/gw-0001/commands", json={"action": "restart"})
            assert (response.status_code, response.json()) == (401, {"error": error})
    assert controller.sent == 0


def test_viewer_reads_but_every_write_is_403_audited_and_changes_nothing(
    controller: MemoryController, access: Access
) -> None:
    with TestClient(create_app(controller, access.security), headers=bearer(access.tokens["viewer"])) as viewer:
        assert viewer.get("/v1/nodes").status_code == 200
        writes = [
            ("POST", "/v1/nodes/gw-0001/commands", {"action": "restart"}),
            ("POST", "/v1/rollouts", {"release": "app@1.2.0"}),
            ("PATCH", "/v1/nodes/gw-0001/labels", {"ring": "canary"}),
            ("PUT", "/v1/nodes/gw-0001/labels", {}),
            ("POST", "/v1/rollouts/ro-1/abort", None),
            ("POST", "/v1/commands/cmd-1/cancel", None),
            ("POST", "/v1/tokens", {"name": "x", "role": "admin"}),
            ("DELETE", "/v1/tokens/operator-token", None),
        ]
        for method, path, body in writes:
            response = viewer.request(method, path, json=body)
            assert response.status_code == 403, (path, response.text)
            assert response.json()["error"].startswith("token 'viewer-token' has role viewer; this needs ")
        assert viewer.get("/v1/tokens").status_code == 403
        entries = audit(viewer, outcome="denied")
    assert controller.sent == 0 and controller.rollouts() == []
    assert controller.node("gw-0001").node.operator_labels == {}
    assert len(entries) == len(writes)
    assert {entry["actor"] for entry in entries} == {"viewer-token"}
    assert entries[0]["action"] == "send_command" and entries[0]["target"] == "gw-0001"
    assert entries[0]["status"] == 403 and entries[0]["via"] == "token"


def test_operator_starts_a_rollout_and_the_audit_names_it(client: TestClient) -> None:
    started = client.post("/v1/rollouts", json={"release": "app@1.2.0", "selector": {"site": "plant-3"}})
    assert started.status_code == 201
    rollout = started.json()
    assert [action["actor"] for action in rollout["actions"]] == ["operator-token"]
    client.post(f"/v1/rollouts/{rollout['id']}/pause")
    client.post(f"/v1/rollouts/{rollout['id']}/resume")
    client.post(f"/v1/rollouts/{rollout['id']}/abort")
    view = client.get(f"/v1/rollouts/{rollout['id']}").json()
    assert [(a["action"], a["actor"], a["via"]) for a in view["actions"]] == [
        ("start_rollout", "operator-token", "token"),
        ("pause_rollout", "operator-token", "token"),
        ("resume_rollout", "operator-token", "token"),
        ("abort_rollout", "operator-token", "token"),
    ]
    entries = audit(client, target=rollout["id"])
    assert [entry["action"] for entry in entries] == [a["action"] for a in view["actions"]]
    assert all(entry["outcome"] == "ok" and re.fullmatch(r"[0-9a-f]{32}", entry["request_id"]) for entry in entries)
    assert entries[0]["status"] == 201 and entries[0]["role"] == "operator"
    listed = client.get("/v1/rollouts").json()["items"]
    assert [a["action"] for a in listed[0]["actions"]] == [a["action"] for a in view["actions"]]


def test_failed_changes_are_audited_with_their_reason(client: TestClient) -> None:
    response = client.post("/v1/nodes/gw-9999/commands", json={"action": "restart"}, headers={"X-Request-Id": "r-42"})
    assert response.status_code == 404 and response.headers["x-request-id"] == "r-42"
    (entry,) = audit(client, action="send_command")
    assert (entry["outcome"], entry["status"], entry["target"], entry["request_id"]) == ("failed", 404, None, "r-42")
    assert entry["detail"] == "no node 'gw-9999'"


def test_admin_manages_tokens_and_the_secret_is_shown_once(controller: MemoryController, access: Access) -> None:
    with TestClient(create_app(controller, access.security), headers=bearer(access.tokens["admin"])) as admin:
        created = admin.post("/v1/tokens", json={"name": "ci", "role": "operator", "expires_in": 3600})
        assert created.status_code == 201
        secret = created.json()["token"]
        assert re.fullmatch(r"fleet_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", secret)
        assert created.json()["info"]["created_by"] == "admin-token"
        listed = admin.get("/v1/tokens").json()
        assert "ci" in {token["name"] for token in listed}
        assert secret not in admin.get("/v1/tokens").text and secret not in admin.get("/v1/audit").text
        twice = admin.post("/v1/tokens", json={"name": "ci", "role": "viewer"})
        assert twice.status_code == 409
        with TestClient(create_app(controller, access.security), headers=bearer(secret)) as ci:
            assert ci.get("/v1/whoami").json() == {"name": "ci", "via": "token", "role": "operator"}
            assert admin.delete("/v1/tokens/ci").json()["revoked_at"] is not None
            time.sleep(1.1)  # other controllers sharing the database see a revocation within a second
            assert ci.get("/v1/whoami").status_code == 401
        assert admin.delete("/v1/tokens/ci").status_code == 404
        assert {t["name"] for t in admin.get("/v1/tokens", params={"revoked": "true"}).json()} >= {"ci"}
        assert admin.get("/v1/identities").json()[0]["name"] == "operator"


def test_host_header_must_name_the_server(controller: MemoryController) -> None:
    access = memory_access(controller, hosts=HostCheck.for_listener("127.0.0.1", ["fleet.example.com"], []))
    app = create_app(controller, access.security)
    with TestClient(app, base_url="https://fleet.example.com", headers=bearer(access.tokens["viewer"])) as good:
        assert good.get("/v1/nodes").status_code == 200
    for host in ("evil.example.com", "fleet.example.com.evil.com", ""):
        with TestClient(app, base_url="https://ok", headers={**bearer(access.tokens["viewer"]), "Host": host}) as bad:
            response = bad.get("/healthz")
            assert response.status_code == 400, host
            assert response.json()["error"].startswith("Host ")
    with TestClient(app, base_url="https://127.0.0.1:8080", headers=bearer(access.tokens["viewer"])) as loopback:
        assert loopback.get("/v1/nodes").status_code == 200


def test_host_check_rules() -> None:
    loop = HostCheck.for_listener("127.0.0.1", [], [])
    assert loop.permits("localhost:8080") and loop.permits("[::1]:8080") and loop.permits("127.0.0.1")
    assert not loop.permits("example.com") and not loop.permits(None)
    assert HostCheck.for_listener("0.0.0.0", [], []).permits("anything")
    named = HostCheck.for_listener("0.0.0.0", ["ctl.example.com"], ["alias"])
    assert named.permits("CTL.example.com:443") and named.permits("alias") and not named.permits("10.0.0.9")


def test_body_too_large_is_413_before_anything_runs(client: TestClient, controller: MemoryController) -> None:
    big = {"action": "restart", "args": {"blob": "x" * (1024 * 1024)}}
    response = client.post("/v1/nodes/gw-0001/commands", json=big)
    assert response.status_code == 413 and list(response.json()) == ["error"]
    assert controller.sent == 0


# ---- idempotency ----


def test_a_retried_post_with_the_same_key_creates_one_command(client: TestClient, controller: MemoryController) -> None:
    body = {"action": "restart", "args": {"delay": 1}}
    key = {"Idempotency-Key": "retry-7"}
    first = client.post("/v1/nodes/gw-0001/commands", json=body, headers=key)
    again = client.post("/v1/nodes/gw-0001/commands", json=body, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert controller.sent == 1
    other = client.post("/v1/nodes/gw-0001/commands", json={"action": "ping"}, headers=key)
    assert other.status_code == 422 and "Idempotency-Key 'retry-7' was used for another request" in other.text
    assert client.post("/v1/nodes/gw-0002/commands", json=body, headers=key).status_code == 422  # another target
    assert controller.sent == 1
    fresh = client.post("/v1/nodes/gw-0001/commands", json=body, headers={"Idempotency-Key": "retry-8"})
    assert fresh.json()["id"] != first.json()["id"] and controller.sent == 2
    assert [e["detail"] for e in audit(client, action="send_command")].count("idempotent replay") == 1


def test_idempotent_rollout_start_and_a_stored_error(client: TestClient, controller: MemoryController) -> None:
    key = {"Idempotency-Key": "ro-1"}
    body = {"release": "app@1.2.0", "selector": {"site": "plant-3"}}
    first = client.post("/v1/rollouts", json=body, headers=key)
    second = client.post("/v1/rollouts", json=body, headers=key)
    assert first.status_code == second.status_code == 201 and first.json()["id"] == second.json()["id"]
    assert len(controller.rollouts()) == 1
    missing = {"release": "app@9.9.9"}
    assert client.post("/v1/rollouts", json=missing, headers={"Idempotency-Key": "ro-2"}).status_code == 404
    assert client.post("/v1/rollouts", json=missing, headers={"Idempotency-Key": "ro-2"}).status_code == 404
    bad_key = client.post("/v1/rollouts", json=body, headers={"Idempotency-Key": "has space"})
    assert bad_key.status_code == 400


def test_idempotency_keys_are_per_caller(controller: MemoryController, access: Access) -> None:
    app = create_app(controller, access.security)
    body = {"action": "ping"}
    with (
        TestClient(app, headers=bearer(access.tokens["operator"])) as one,
        TestClient(app, headers=bearer(access.tokens["admin"])) as two,
    ):
        a = one.post("/v1/nodes/gw-0001/commands", json=body, headers={"Idempotency-Key": "k"}).json()
        b = two.post("/v1/nodes/gw-0001/commands", json=body, headers={"Idempotency-Key": "k"}).json()
    assert a["id"] != b["id"] and controller.sent == 2


# ---- nodes: pages, filters, selectors, events ----


def test_nodes_page_and_filter(client: TestClient) -> None:
    every = client.get("/v1/nodes").json()
    assert [node["id"] for node in every["items"]] == ["gw-0001", "gw-0002", "gw-0003"] and every["next_cursor"] is None
    first = client.get("/v1/nodes", params={"limit": 2}).json()
    assert [node["id"] for node in first["items"]] == ["gw-0001", "gw-0002"]
    rest = client.get("/v1/nodes", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [node["id"] for node in rest["items"]] == ["gw-0003"] and rest["next_cursor"] is None
    for params, expected in (
        ({"selector": "site=plant-3"}, ["gw-0001", "gw-0002"]),
        ({"selector": "ring!=canary"}, ["gw-0002", "gw-0003"]),
        ({"selector": "site in (plant-7, plant-9)"}, ["gw-0003"]),
        ({"selector": "site notin (plant-7),ring"}, ["gw-0001", "gw-0002"]),
        ({"selector": "!ring"}, []),
        ({"status": "offline"}, ["gw-0003"]),
        ({"version": "1.1.0", "health": "healthy"}, ["gw-0001", "gw-0002"]),
        ({"health": "unknown"}, ["gw-0003"]),
    ):
        found = client.get("/v1/nodes", params=params).json()["items"]
        assert [node["id"] for node in found] == expected, params


@pytest.mark.parametrize(
    ("params", "status", "error"),
    [
        ({"selector": "ring=(a"}, 400, "selector 'ring=(a': '(' without ')'"),
        ({"selector": "a b c"}, 400, "selector 'a b c': cannot read 'a b c'"),
        ({"cursor": "!!!"}, 400, "cursor '!!!': not a cursor from this list"),
        ({"cursor": "MTIz"}, 400, "cursor 'MTIz': not a cursor from this list"),
        ({"limit": 0}, 422, "query.limit: Input should be greater than or equal to 1"),
        ({"limit": 5000}, 422, "query.limit: Input should be less than or equal to 1000"),
        ({"status": "sleeping"}, 422, "query.status: String should match pattern"),
    ],
)
def test_node_list_bad_input(client: TestClient, params: dict[str, Any], status: int, error: str) -> None:
    response = client.get("/v1/nodes", params=params)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)


def test_selector_parsing() -> None:
    selector = Selector.parse("ring=canary, site!=x ,tier in (a, b),!legacy,zone")
    assert selector is not None and len(selector.requirements) == 5
    assert selector.matches({"ring": "canary", "tier": "a", "zone": "z"})
    assert not selector.matches({"ring": "canary", "tier": "a", "zone": "z", "legacy": "1"})
    assert Selector.parse("ring==canary,site=x") is not None
    assert Selector.parse("ring=canary,site=x").equality() == {"ring": "canary", "site": "x"}  # type: ignore[union-attr]
    assert Selector.parse("") is None


def test_operator_labels_put_and_patch(client: TestClient) -> None:
    put = client.put("/v1/nodes/gw-0002/labels", json={"ring": "canary", "owner": "team-a"})
    assert put.status_code == 200
    node = put.json()
    assert node["operator_labels"] == {"ring": "canary", "owner": "team-a"}
    assert node["reported_labels"] == {"ring": "main", "site": "plant-3"}
    assert node["labels"] == {"ring": "canary", "site": "plant-3", "owner": "team-a"}  # the operator's ring wins
    patched = client.patch("/v1/nodes/gw-0002/labels", json={"owner": None, "tier": "gold"}).json()
    assert patched["operator_labels"] == {"ring": "canary", "tier": "gold"}
    selected = client.get("/v1/nodes", params={"selector": "ring=canary"}).json()["items"]
    assert [view["id"] for view in selected] == ["gw-0001", "gw-0002"]
    assert client.put("/v1/nodes/gw-0002/labels", json={}).json()["operator_labels"] == {}
    assert client.get("/v1/nodes/gw-0002").json()["node"]["labels"] == {"ring": "main", "site": "plant-3"}
    assert [entry["action"] for entry in audit(client, target="gw-0002")] == [
        "replace_node_labels", "change_node_labels", "replace_node_labels",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("put", "/v1/nodes/gw-9999/labels", {"ring": "canary"}, 404, "no node 'gw-9999'"),
        ("patch", "/v1/nodes/gw-0001/labels", {"ring": "can ary"}, 400, "label ring='can ary': the value must be"),
        ("patch", "/v1/nodes/gw-0001/labels", {"a,b": "x"}, 400, "label key 'a,b': 1-63 characters"),
        ("put", "/v1/nodes/gw-0001/labels", {"ring": None}, 422, "body.ring: Input should be a valid string"),
        ("patch", "/v1/nodes/gw-0001/labels", {"ring": 3}, 422, "body.ring: Input should be a valid string"),
        ("patch", "/v1/nodes/gw-0001/labels", ["ring"], 422, "body: Input should be a valid dictionary"),
    ],
)
def test_operator_label_errors(client: TestClient, method: str, path: str, body: Any, status: int, error: str) -> None:
    response = client.request(method.upper(), path, json=body)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)


def test_node_detail_events_and_unknown_node(client: TestClient) -> None:
    body = client.get("/v1/nodes/gw-0001").json()
    assert body["node"]["id"] == "gw-0001"
    assert body["health_history"][-1]["detail"] == "all checks passed"
    assert [event["kind"] for event in body["events"]] == ["update.downloading", "update.installed", "update.healthy"]
    events = client.get("/v1/nodes/gw-0001/events", params={"limit": 2}).json()
    assert [event["kind"] for event in events["items"]] == ["update.downloading", "update.installed"]
    rest = client.get("/v1/nodes/gw-0001/events", params={"cursor": events["next_cursor"]}).json()
    assert [event["kind"] for event in rest["items"]] == ["update.healthy"]
    assert client.get("/v1/nodes/gw-0002/events").json() == {"items": [], "next_cursor": None}
    for path in ("/v1/nodes/gw-9999", "/v1/nodes/gw-9999/events"):
        missing = client.get(path)
        assert (missing.status_code, missing.json()) == (404, {"error": "no node 'gw-9999'"})


# ---- commands ----


def test_send_command_follow_and_cancel(client: TestClient) -> None:
    sent = client.post("/v1/nodes/gw-0001/commands", json={"action": "restart", "args": {"delay": 1}, "expires_in": 60})
    assert sent.status_code == 201
    command = sent.json()
    assert command["status"] == "pending" and command["args"] == {"delay": 1} and command["node"] == "gw-0001"
    assert command["expires_at"] == pytest.approx(command["created"] + 60)
    first = client.get(f"/v1/commands/{command['id']}").json()
    second = client.get(f"/v1/commands/{command['id']}").json()
    assert [ack["status"] for ack in first["acks"]] == ["accepted"]
    assert [ack["status"] for ack in second["acks"]] == ["accepted", "done"] and second["status"] == "done"
    assert client.get("/v1/nodes/gw-0001").json()["commands"][0]["id"] == command["id"]
    done = client.post(f"/v1/commands/{command['id']}/cancel")
    assert done.status_code == 409 and "only a pending command can be cancelled" in done.json()["error"]
    offline = client.post("/v1/nodes/gw-0003/commands", json={"action": "ping"}).json()
    cancelled = client.post(f"/v1/commands/{offline['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.post("/v1/commands/cmd-404/cancel").status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/v1/nodes/gw-9999/commands", {"action": "restart"}, 404, "no node 'gw-9999'"),
        ("/v1/nodes/gw-0001/commands", {"action": "explode"}, 400,
         "unknown action 'explode'; known: ping, restart, rollback"),
        ("/v1/nodes/gw-0001/commands", {}, 422, "body.action: Field required"),
        ("/v1/nodes/gw-0001/commands", {"action": "ping", "expires_in": -1}, 422,
         "body.expires_in: Input should be greater than 0"),
        ("/v1/nodes/gw-0001/commands", {"action": "ping", "colour": "red"}, 422,
         "body.colour: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_send_command_errors(client: TestClient, path: str, body: dict[str, Any], status: int, error: str) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status
    assert response.json() == {"error": error}


def test_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = client.post("/v1/nodes/gw-0001/commands", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert list(response.json()) == ["error"] and "\n" not in response.json()["error"]


# ---- rollouts ----


def start(client: TestClient, **overrides: Any) -> httpx2.Response:
    body = {"release": "app@1.2.0", "selector": {"site": "plant-3"}, "waves": ["50%", "100%"], "soak": 0} | overrides
    return client.post("/v1/rollouts", json=body)


def test_rollout_lifecycle_list_and_filters(client: TestClient) -> None:
    started = start(client)
    assert started.status_code == 201
    rollout = started.json()
    assert rollout["state"] == "running" and rollout["release"] == "app@1.2.0"
    assert [wave["nodes"] for wave in rollout["waves"]] == [1, 1]
    rid = rollout["id"]
    assert [view["id"] for view in client.get("/v1/rollouts").json()["items"]] == [rid]
    assert client.post(f"/v1/rollouts/{rid}/pause").json()["state"] == "paused"
    assert [v["id"] for v in client.get("/v1/rollouts", params={"state": "paused"}).json()["items"]] == [rid]
    assert client.get("/v1/rollouts", params={"state": "running"}).json()["items"] == []
    assert client.get("/v1/rollouts", params={"release": "app@1.3.0"}).json()["items"] == []
    assert client.get("/v1/rollouts", params={"state": "dancing"}).status_code == 422
    assert client.post(f"/v1/rollouts/{rid}/resume").json()["state"] == "running"
    aborted = client.post(f"/v1/rollouts/{rid}/abort")
    assert aborted.status_code == 200
    assert aborted.json()["state"] == "aborted" and aborted.json()["detail"] == "aborted by the operator"


def test_rollout_plan_changes_nothing(client: TestClient, controller: MemoryController) -> None:
    plan = client.post("/v1/rollouts/plan", json={"release": "app@1.2.0", "selector": {"site": "plant-3"}})
    assert plan.status_code == 200
    assert plan.json()["waves"] == [{"number": 1, "nodes": ["gw-0001"]}, {"number": 2, "nodes": ["gw-0002"]}]
    assert plan.json()["canaries"] == ["gw-0001"]
    assert controller.rollouts() == [] and audit(client) == []
    assert client.post("/v1/rollouts/plan", json={"release": "app@9"}).status_code == 404


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
    assert client.post(f"/v1/rollouts/{rid}/resume").status_code == 409
    assert client.get("/v1/rollouts/ro-404").status_code == 404
    assert client.post("/v1/rollouts/ro-404/abort").json() == {"error": "no rollout 'ro-404'"}
    invalid = start(client, soak=-1)
    assert (invalid.status_code, invalid.json()) == (
        422,
        {"error": "body.soak: Input should be greater than or equal to 0"},
    )
    assert client.post("/v1/rollouts", json={"selector": {}}).json() == {"error": "body.release: Field required"}


def test_releases_and_audit_pages(client: TestClient, access: Access) -> None:
    releases = client.get("/v1/releases").json()
    assert [release["label"] for release in releases["items"]] == ["app@1.2.0", "app@1.3.0"]
    assert client.get("/v1/releases", params={"name": "other"}).json()["items"] == []
    for node in ("gw-0001", "gw-0002", "gw-0003"):
        client.post(f"/v1/nodes/{node}/commands", json={"action": "ping"})
        access.clock.now += 1
    first = client.get("/v1/audit", params={"limit": 2}).json()
    rest = client.get("/v1/audit", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert len(first["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None
    since = first["items"][1]["ts"]
    assert len(client.get("/v1/audit", params={"since": since}).json()["items"]) == 2
    assert client.get("/v1/audit", params={"since": -1}).status_code == 422


def test_routing_errors_keep_the_error_body(client: TestClient) -> None:
    unknown = client.get("/v1/no/such/route")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "Not Found: GET /v1/no/such/route"})
    wrong_method = client.delete("/v1/nodes")
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"error": "Method Not Allowed: DELETE /v1/nodes"})
    assert client.get("/nodes").status_code == 404  # the unversioned paths are gone


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
    failing = FailingController(error)
    access = memory_access(failing)
    app = create_app(failing, access.security)
    with TestClient(app, raise_server_exceptions=False, headers=bearer(access.tokens["viewer"])) as client:
        response = client.get("/v1/nodes")
        assert (response.status_code, response.json()) == (status, {"error": body})
        assert responses_by_code(client, access)[str(status)] == 1.0


# ---- bad input anywhere: 4xx and one line, never 5xx ----

_GARBAGE_PATH = ["%00", "a" * 300, "..", "%2F", "é", "-1"]
_GARBAGE_BODY: list[Any] = [
    None,
    [],
    "text",
    12,
    {"x": "y"},
    {"release": 5, "action": []},
    {"name": "!", "role": "god"},
]
_GARBAGE_QUERY = [{"limit": "x"}, {"cursor": "z" * 600}, {"since": "yesterday"}, {"selector": "(((("}, {"state": 1}]


def test_every_operation_answers_bad_input_with_a_4xx_one_line_error(
    controller: MemoryController, access: Access
) -> None:
    app = create_app(controller, access.security)
    schema = app.openapi()
    checked = 0
    with TestClient(app, raise_server_exceptions=False, headers=bearer(access.tokens["admin"])) as admin:
        for path, operations in schema["paths"].items():
            for method in operations:
                for garbage in _GARBAGE_PATH:
                    url = re.sub(r"\{[^}]+\}", garbage, path)
                    for body in _GARBAGE_BODY[:3] if method != "get" else [None]:
                        for query in [{}, *_GARBAGE_QUERY]:
                            response = admin.request(method.upper(), url, json=body, params=query)
                            checked += 1
                            if response.status_code < 400:
                                continue
                            assert response.status_code < 500, (method, url, body, query, response.text)
                            error = response.json()["error"]
                            assert "\n" not in error and len(error) <= 1000
        for body in _GARBAGE_BODY:
            for path in ("/v1/rollouts", "/v1/rollouts/plan", "/v1/tokens", "/v1/nodes/gw-0001/commands"):
                response = admin.post(path, json=body)
                assert 400 <= response.status_code < 500, (path, body, response.text)
    assert checked > 500


# ---- service routes, metrics, OpenAPI ----


def test_healthz(client: TestClient) -> None:
    body = client.get("/healthz").json()
    assert body == {"ok": True, "broker": "connected", "database": "ok", "leader": True, "tick_age": 0.1}


def test_metrics_are_prometheus_families_with_help(client: TestClient, access: Access) -> None:
    client.get("/v1/nodes/gw-9999")
    client.get("/v1/nodes/gw-9998")
    client.get("/v1/nodes", params={"selector": "(("})
    client.post("/v1/nodes/gw-0001/commands", json={})
    start(client)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    for name in (
        "fleet_nodes",
        "fleet_nodes_by_version",
        "fleet_nodes_by_health",
        "fleet_rollout_progress_ratio",
        "fleet_heartbeat_lag_seconds",
        "fleet_command_round_trip_seconds",
        "fleet_rollout_wave_duration_seconds",
        "fleet_build_info",
        "process_resident_memory_bytes",
        "python_info",
        "fleet_certificate_expiry_timestamp_seconds",
        "fleet_api_auth_failures",
    ):
        assert name in families, name  # fmt: skip
    for family in families.values():
        if family.name.startswith("fleet_"):
            assert len(family.documentation) > 20, family.name
    nodes = {sample.labels["status"]: sample.value for sample in families["fleet_nodes"].samples}
    assert nodes == {"online": 2.0, "stale": 0.0, "offline": 1.0}
    assert families["fleet_heartbeat_lag_seconds"].type == "histogram"
    assert families["fleet_heartbeats_received"].type == "counter"
    assert families["fleet_heartbeats_received"].samples[0].value == 1234
    assert families["fleet_build_info"].samples[0].labels["version"] == "9.9.9"
    (progress,) = families["fleet_rollout_progress_ratio"].samples
    assert progress.labels["release"] == "app@1.2.0" and progress.value == 0.0
    assert responses_by_code(client, access) == {"400": 1.0, "404": 2.0, "422": 1.0, "201": 1.0, "200": 1.0}


def test_the_metrics_listener_serves_without_credentials_and_refuses_everything_else(
    controller: MemoryController, access: Access
) -> None:
    app = create_metrics_app(access.security.metrics, controller.health)
    with TestClient(app) as anonymous:
        assert anonymous.get("/metrics").status_code == 200 and "fleet_nodes" in anonymous.get("/metrics").text
        assert anonymous.get("/healthz").json()["ok"] is True
        for method, path in (("POST", "/metrics"), ("DELETE", "/metrics"), ("PUT", "/healthz")):
            assert anonymous.request(method, path).status_code == 405
        for path in ("/v1/nodes", "/v1/rollouts", "/openapi.json", "/"):
            assert anonymous.get(path).status_code == 404
            assert anonymous.post(path, json={"release": "app@1.2.0"}).status_code in (404, 405)
    assert controller.rollouts() == [] and controller.sent == 0
    checked = create_metrics_app(access.security.metrics, controller.health, HostCheck(["localhost"]))
    with TestClient(checked, base_url="http://evil.example") as rebound:
        assert rebound.get("/metrics").status_code == 400


def test_openapi_has_operation_ids_descriptions_and_error_statuses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["info"]["title"] == "fleet controller" and schema["info"]["version"]
    assert {"bearer", "operatorCertificate"} == set(schema["components"]["securitySchemes"])
    operation_ids = []
    for path, operations in schema["paths"].items():
        assert path.startswith("/v1/") or path in ("/metrics", "/healthz"), path
        for method, operation in operations.items():
            operation_ids.append(operation["operationId"])
            assert "_" not in operation["operationId"] or not operation["operationId"].endswith(("_get", "_post"))
            assert len(operation.get("description", "")) > 20, (method, path)
            if path != "/healthz":
                assert {"401", "403", "422"} <= set(operation["responses"]), (method, path)
                assert "Role: " in operation["description"], (method, path)
    assert len(operation_ids) == len(set(operation_ids))
    assert {"list_nodes", "send_command", "start_rollout", "abort_rollout", "list_audit", "create_token",
            "cancel_command", "list_node_events", "list_releases", "plan_rollout"} <= set(operation_ids)  # fmt: skip
    created = schema["paths"]["/v1/rollouts"]["post"]["responses"]
    assert created["201"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/RolloutView"}
    assert created["409"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    for name, component in schema["components"]["schemas"].items():
        if name in ("HTTPValidationError", "ValidationError") or "properties" not in component:
            continue
        for field, spec in component["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404


# ---- a real HTTPS server: client certificates from the PKI ----


def operator_identity(pki: Pki, name: str, access: AccessRole) -> tuple[str, str]:
    paths = pki.paths.operator(name)
    if not paths.cert.exists():
        issue_operator(pki.paths, name, access=access)
    return str(paths.cert), str(paths.key)


@pytest.fixture
def tls_server(pki: Pki, controller: MemoryController) -> Iterator[tuple[ApiServer, Access]]:
    tls = TlsFiles(pki.paths.server_cert, pki.paths.server_key, pki.paths.ca_cert)
    access = memory_access(
        controller, certificates=CertificateAuthenticator(pki.paths), hosts=allowed_hosts("127.0.0.1", tls, [])
    )
    server = serve_in_thread(create_app(controller, access.security), "127.0.0.1", 0, tls=tls)
    try:
        yield server, access
    finally:
        server.stop()


def https(pki: Pki, url: str, cert: tuple[str, str] | None = None, **kwargs: Any) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.paths.ca_cert))
    if cert is not None:
        context.load_cert_chain(*cert)
    return httpx.Client(base_url=url, verify=context, timeout=5, **kwargs)


def test_https_with_operator_certificates_and_roles(pki: Pki, tls_server: tuple[ApiServer, Access]) -> None:
    server, access = tls_server
    assert server.url.startswith("https://127.0.0.1:")
    admin = (str(pki.paths.operator_cert), str(pki.paths.operator_key))
    viewer = operator_identity(pki, "api-viewer", AccessRole.VIEWER)
    with https(pki, server.url, admin) as http:
        assert http.get("/v1/whoami").json() == {"name": "operator", "via": "certificate", "role": "admin"}
        assert http.post("/v1/nodes/gw-0001/commands", json={"action": "ping"}).status_code == 201
    with https(pki, server.url, viewer) as http:
        assert http.get("/v1/whoami").json()["role"] == "viewer"
        assert http.post("/v1/nodes/gw-0001/commands", json={"action": "ping"}).status_code == 403
    with https(pki, server.url) as anonymous:
        assert anonymous.get("/v1/nodes").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
    with https(pki, server.url, headers=bearer(access.tokens["viewer"])) as token:
        assert token.get("/v1/whoami").json() == {"name": "viewer-token", "via": "token", "role": "viewer"}
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    with https(pki, server.url.replace("127.0.0.1", "localhost"), admin) as named:  # a SAN of server.pem
        assert named.get("/v1/nodes").status_code == 200


def test_revoked_operator_and_device_certificates_are_refused(
    pki: Pki, tls_server: tuple[ApiServer, Access], controller: MemoryController
) -> None:
    server, _access = tls_server
    revoked = operator_identity(pki, "api-revoked", AccessRole.ADMIN)
    revoke(pki.paths, "api-revoked")
    time.sleep(1.1)  # the CRL is looked at again at most once a second
    with https(pki, server.url, revoked) as http:
        response = http.post("/v1/nodes/gw-0001/commands", json={"action": "restart"})
        assert (response.status_code, response.json()) == (401, {"error": "certificate of 'api-revoked' is revoked"})
    if not pki.paths.device("gw-api").cert.exists():
        issue_device(pki.paths, "gw-api")
    device = pki.paths.device("gw-api")
    with https(pki, server.url, (str(device.cert), str(device.key))) as http:
        response = http.get("/v1/nodes")
        assert response.status_code == 403
        assert response.json() == {"error": "device certificates have no API access (only operator certificates)"}
    assert controller.sent == 0


def test_serve_in_thread_on_port_zero_without_tls(controller: MemoryController) -> None:
    access = memory_access(controller)
    server = serve_in_thread(create_app(controller, access.security), "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        assert server.start() is server  # already running: no second bind
        with httpx.Client(base_url=server.url, timeout=5, headers=bearer(access.tokens["viewer"])) as http:
            assert http.get("/healthz").json()["ok"] is True
            assert http.get("/v1/nodes/gw-9999").status_code == 404
        assert any(thread.name == f"fleet-api-{server.port}" for thread in threading.enumerate())
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 5
    assert not any(thread.name == f"fleet-api-{server.port}" for thread in threading.enumerate())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=2)


def test_port_in_use_and_bad_tls_files_are_one_line_errors(pki: Pki, controller: MemoryController) -> None:
    app = create_app(controller, memory_access(controller).security)
    first = ApiServer(app, "127.0.0.1", 0).start()
    try:
        with pytest.raises(ConfigError, match=rf"--http 127.0.0.1:{first.port}: cannot listen"):
            ApiServer(app, "127.0.0.1", first.port).start()
    finally:
        first.stop()
    wrong_key = TlsFiles(pki.paths.server_cert, pki.paths.controller_key, pki.paths.ca_cert)
    with pytest.raises(ConfigError, match="cannot load the TLS certificate and key"):
        ApiServer(app, "127.0.0.1", 0, tls=wrong_key).start()


def test_node_view_status_enum_is_stable() -> None:
    assert [status.value for status in NodeStatus] == ["online", "stale", "offline"]
